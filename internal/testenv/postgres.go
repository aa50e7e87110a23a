// Package testenv starts the real dependencies tests run against: a fresh
// PostgreSQL database per test, and loopback DNS and SMTP servers.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/pgserver"
)

// DatabaseURLEnv names the environment variable that points tests at a
// PostgreSQL server. The user in it must be allowed to create databases.
// The value "embedded" makes the tests start their own server.
const DatabaseURLEnv = "POSTHASTE_TEST_DATABASE_URL"

// localServerURL is tried when DatabaseURLEnv is not set.
const localServerURL = "postgres://postgres@127.0.0.1:5432/postgres"

// server is the choice of serverURL, made once per test process: probing
// can take seconds, and a server started for the tests must be started only
// once.
var server = sync.OnceValues(func() (string, error) {
	return serverURL(context.Background())
})

// serverURL chooses the PostgreSQL server for this test process and returns
// a URL for a user that may create databases: DatabaseURLEnv if set, else a
// server on 127.0.0.1:5432 if it answers quickly, else an embedded server
// started from the machine's PostgreSQL binaries (stopped by Main).
func serverURL(ctx context.Context) (string, error) {
	switch u := os.Getenv(DatabaseURLEnv); u {
	case "":
	case "embedded":
		return startEmbedded(ctx)
	default:
		return u, nil
	}
	probeCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, probeErr := pgx.Connect(probeCtx, localServerURL)
	if probeErr == nil {
		_ = conn.Close(probeCtx)
		return localServerURL, nil
	}
	u, err := startEmbedded(ctx)
	if err != nil {
		return "", fmt.Errorf("no PostgreSQL server answered at %s (%v), and no embedded one could be started (%w); "+
			"install the PostgreSQL server binaries, start a server there (user postgres, trust authentication), "+
			"or set %s to a server where the user may create databases",
			localServerURL, probeErr, err, DatabaseURLEnv)
	}
	return u, nil
}

// embedded is the PostgreSQL this test process started, if any.
var embedded struct {
	mu  sync.Mutex
	srv *pgserver.Server
	dir string
}

func startEmbedded(ctx context.Context) (string, error) {
	embedded.mu.Lock()
	defer embedded.mu.Unlock()
	dir, err := os.MkdirTemp("", "posthaste-testpg-")
	if err != nil {
		return "", err
	}
	// When tests run as root the server runs as another user, which must be
	// able to enter the directory.
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	srv, err := pgserver.Start(ctx, pgserver.Config{DataDir: dir + "/cluster", Database: "postgres"})
	if err != nil {
		_ = os.RemoveAll(dir)
		return "", err
	}
	embedded.srv, embedded.dir = srv, dir
	return srv.URL(), nil
}

// EmptyDatabase returns the URL of a new, empty database (no migrations
// applied) that is dropped when the test ends.
func EmptyDatabase(t testing.TB) string {
	t.Helper()
	admin, err := server()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	name := "posthaste_test_" + randomHex(t, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// template0 cannot have connections, so nothing can hold it open and
	// make CREATE DATABASE fail; the C locale exists on every server.
	create := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize() +
		" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
	if err := adminExec(ctx, admin, create); err != nil {
		t.Fatalf("testenv: create database %s (server chosen by %s, else %s): %v",
			name, DatabaseURLEnv, localServerURL, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		drop := "DROP DATABASE IF EXISTS " + pgx.Identifier{name}.Sanitize() + " WITH (FORCE)"
		if err := adminExec(ctx, admin, drop); err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
		}
	})
	u, err := withDatabase(admin, name)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return u
}

// Database returns the URL of a new database with every migration applied.
// Each call makes its own database, so tests may commit, LISTEN and run in
// parallel, across packages too; it is dropped when the test ends.
func Database(t testing.TB) string {
	t.Helper()
	u := EmptyDatabase(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := db.Migrate(ctx, u); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return u
}

// DB returns an open pool on a new migrated database (see Database), closed
// when the test ends.
func DB(t testing.TB) *db.DB {
	t.Helper()
	u := Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := db.Open(ctx, u)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(d.Close)
	return d
}

func adminExec(ctx context.Context, admin, sql string) error {
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}

// withDatabase returns the connection string admin with its database
// replaced by name. It accepts both URLs and keyword/value strings.
func withDatabase(admin, name string) (string, error) {
	if strings.HasPrefix(admin, "postgres://") || strings.HasPrefix(admin, "postgresql://") {
		u, err := url.Parse(admin)
		if err != nil {
			return "", fmt.Errorf("parse %s: %w", DatabaseURLEnv, err)
		}
		u.Path = "/" + name
		u.RawPath = ""
		return u.String(), nil
	}
	// In a keyword/value string the last setting of a keyword wins.
	return admin + " dbname=" + name, nil
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("testenv: random database name: %v", err)
	}
	return hex.EncodeToString(b)
}
