package bench

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/internal/pgserver"
	"github.com/posthaste/posthaste/internal/testenv"
)

// startProfiledPostgres starts a PostgreSQL with pg_stat_statements loaded,
// as the run does for --pg-stat-statements.
func startProfiledPostgres(t *testing.T) *pgserver.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := pgserver.FindBinDir(ctx); errors.Is(err, pgserver.ErrNoBinaries) {
		t.Skip("no PostgreSQL server binaries on this machine")
	}
	// Run as root, the server runs as another user, which must be able to
	// enter the directory: testing.T.TempDir's parent is private.
	dir, err := os.MkdirTemp("", "posthaste-bench-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	srv, err := pgserver.Start(ctx, pgserver.Config{
		DataDir:  filepath.Join(dir, "pg"),
		Settings: map[string]string{"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "top"},
	})
	if err != nil && strings.Contains(err.Error(), "pg_stat_statements") {
		t.Skipf("this PostgreSQL has no pg_stat_statements: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Stop(context.Background()) })
	return srv
}

func connectTo(t *testing.T, u string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// TestStatementProfile checks the profile counts the statements of the
// database since the reset, and leaves out other databases' statements and
// the run's own.
func TestStatementProfile(t *testing.T) {
	t.Parallel()
	srv := startProfiledPostgres(t)
	ctx := context.Background()
	p, err := openPGStats(ctx, srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.close(ctx) })

	conn := connectTo(t, srv.URL())
	if _, err := conn.Exec(ctx, "CREATE TABLE bench_profile (id int PRIMARY KEY, pad text)"); err != nil {
		t.Fatal(err)
	}
	// Counted before the reset, so not in the profile.
	if _, err := conn.Exec(ctx, "SELECT 'before the reset'"); err != nil {
		t.Fatal(err)
	}
	if !p.resetStatements(ctx) {
		t.Fatalf("resetStatements failed: %v", p.notes)
	}
	for i := range 10 {
		if _, err := conn.Exec(ctx, "INSERT INTO bench_profile\n  VALUES ($1, repeat('x', 100))", i); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.Exec(ctx, "SELECT count(*) FROM bench_profile"); err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(srv.URL())
	u.Path = "/postgres"
	if _, err := connectTo(t, u.String()).Exec(ctx, "SELECT 'another database'"); err != nil {
		t.Fatal(err)
	}
	var s pgSnapshot
	p.readWAL(ctx, &s)

	st, err := p.topStatements(ctx, 10, 5)
	if err != nil {
		t.Fatal(err)
	}
	if st.Database != "posthaste" || st.Distinct < 2 || st.TotalExecMs <= 0 {
		t.Errorf("profile of %q: %d statements, %g ms", st.Database, st.Distinct, st.TotalExecMs)
	}
	var insert *Statement
	var share float64
	for i, s := range st.Top {
		share += s.SharePercent
		switch {
		case strings.HasPrefix(s.Query, "INSERT INTO bench_profile"):
			insert = &st.Top[i]
		case strings.Contains(s.Query, "another database"), strings.Contains(s.Query, "before the reset"), strings.Contains(s.Query, "posthaste bench"):
			t.Errorf("profile lists %q", s.Query)
		}
		if i > 0 && s.TotalMs > st.Top[i-1].TotalMs {
			t.Errorf("statement %d has more time than the one before", i)
		}
	}
	if share < 99.9 || share > 100.1 {
		t.Errorf("shares of every statement sum to %g%%", share)
	}
	if insert == nil {
		t.Fatalf("no INSERT in %+v", st.Top)
	}
	if insert.Query != "INSERT INTO bench_profile VALUES ($1, repeat($2, $3))" {
		t.Errorf("query text %q, want it on one line", insert.Query)
	}
	if insert.Calls != 10 || *insert.CallsPerMessage != 2 || insert.RowsPerCall != 1 {
		t.Errorf("insert: %d calls, %g per message, %g rows per call; want 10, 2, 1", insert.Calls, *insert.CallsPerMessage, insert.RowsPerCall)
	}
	if *insert.WALBytesPerMessage <= 0 || *insert.BlocksDirtiedPerMessage <= 0 || insert.MeanMs <= 0 {
		t.Errorf("insert: %g WAL bytes and %g dirtied blocks per message, %g ms mean; want positive",
			*insert.WALBytesPerMessage, *insert.BlocksDirtiedPerMessage, insert.MeanMs)
	}

	st, err = p.topStatements(ctx, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Top) != 1 || st.Distinct < 2 || st.Top[0].CallsPerMessage != nil {
		t.Errorf("top 1 of nothing accepted: %d listed of %d, %v calls per message", len(st.Top), st.Distinct, st.Top[0].CallsPerMessage)
	}
}

// TestStatementsNotLoaded checks a server without pg_stat_statements
// loaded gets a note that says how, and no error.
func TestStatementsNotLoaded(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dbURL := testenv.Database(t)
	var preload string
	if err := connectTo(t, dbURL).QueryRow(ctx, "SELECT current_setting('shared_preload_libraries')").Scan(&preload); err != nil {
		t.Fatal(err)
	}
	if listHas(preload, "pg_stat_statements") {
		t.Skip("the test database has pg_stat_statements loaded")
	}
	p, err := openPGStats(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.close(ctx) })
	if p.resetStatements(ctx) {
		t.Fatal("resetStatements succeeded without the library loaded")
	}
	if n := strings.Join(p.notes, "\n"); !strings.Contains(n, "shared_preload_libraries") || !strings.Contains(n, "--pg-stat-statements") {
		t.Errorf("notes %q do not say how to load it", n)
	}
}

func TestOneLine(t *testing.T) {
	t.Parallel()
	if got := oneLine("SELECT\n\t a,  b\nFROM t ", 100); got != "SELECT a, b FROM t" {
		t.Errorf("oneLine = %q", got)
	}
	if got := oneLine(strings.Repeat("é", 20), 10); got != strings.Repeat("é", 7)+"..." {
		t.Errorf("oneLine cut = %q", got)
	}
	if !listHas(`auto_explain, "pg_stat_statements"`, "pg_stat_statements") || listHas("pg_stat_statements_x", "pg_stat_statements") {
		t.Error("listHas")
	}
}
