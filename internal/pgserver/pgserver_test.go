//go:build unix

package pgserver

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// dataDir returns a path for a cluster inside a fresh temporary directory.
// When the tests run as root the server runs as another user, which must be
// able to reach the path: testing.T.TempDir makes its parent 0700.
func dataDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if os.Geteuid() == 0 {
		top := filepath.Clean(os.TempDir())
		for p := dir; p != top && p != filepath.Dir(p); p = filepath.Dir(p) {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm()&0o001 == 0 {
				if err := os.Chmod(p, fi.Mode().Perm()|0o011); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	return filepath.Join(dir, "pg")
}

// requireBinaries skips the test when the machine has no PostgreSQL server.
func requireBinaries(t *testing.T) {
	t.Helper()
	if _, err := findBinDir(context.Background(), "", ""); errors.Is(err, ErrNoBinaries) {
		t.Skip("no PostgreSQL server binaries on this machine")
	}
}

func start(t *testing.T, cfg Config) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = s.Stop(context.Background()) })
	return s
}

func connect(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func TestStartStopRestart(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	ctx := context.Background()
	dir := dataDir(t)

	s := start(t, Config{DataDir: dir})
	u, err := url.Parse(s.URL())
	if err != nil {
		t.Fatalf("URL %q: %v", s.URL(), err)
	}
	pw, _ := u.User.Password()
	if u.Scheme != "postgres" || u.User.Username() != "posthaste" || pw == "" ||
		u.Hostname() != "127.0.0.1" || u.Path != "/posthaste" || u.RawQuery != "sslmode=disable" {
		t.Fatalf("URL() = %q, want postgres://posthaste:<password>@127.0.0.1:<port>/posthaste?sslmode=disable", s.URL())
	}

	conn := connect(t, s.URL())
	if _, err := conn.Exec(ctx, "CREATE TABLE survivors (name text PRIMARY KEY)"); err != nil {
		t.Fatalf("create table: %v", err)
	}
	if _, err := conn.Exec(ctx, "INSERT INTO survivors VALUES ('first')"); err != nil {
		t.Fatalf("insert: %v", err)
	}
	var user, addr string
	if err := conn.QueryRow(ctx, "SELECT current_user, host(inet_server_addr())").Scan(&user, &addr); err != nil {
		t.Fatalf("query: %v", err)
	}
	if user != "posthaste" || addr != "127.0.0.1" {
		t.Fatalf("connected as %q to %q", user, addr)
	}
	// Nothing but loopback, and no Unix socket.
	var listen, sockets string
	if err := conn.QueryRow(ctx, "SELECT current_setting('listen_addresses'), current_setting('unix_socket_directories')").Scan(&listen, &sockets); err != nil {
		t.Fatalf("settings: %v", err)
	}
	if listen != "127.0.0.1" || sockets != "" {
		t.Fatalf("listen_addresses=%q unix_socket_directories=%q", listen, sockets)
	}
	if err := conn.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}

	// A second server on the same directory is refused, and the first one
	// keeps working.
	if s2, err := Start(ctx, Config{DataDir: dir}); err == nil {
		_ = s2.Stop(ctx)
		t.Fatal("second Start on a running DataDir succeeded")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Start: %v, want a DataDir in use error", err)
	}
	ping(t, s.URL())

	fi, err := os.Stat(filepath.Join(dir, "password"))
	if err != nil {
		t.Fatalf("password file: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("password file mode %v, want 0600", fi.Mode().Perm())
	}
	if os.Geteuid() == 0 {
		wantOwner(t, filepath.Join(dir, "pgdata"), Config{}.WithDefaults().RunAs)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "postgres.log")); err != nil || !strings.Contains(string(b), "ready to accept connections") {
		t.Errorf("postgres.log lacks the ready line (err %v)", err)
	}

	if err := s.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := s.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if c, err := pgx.Connect(ctx, s.URL()); err == nil {
		_ = c.Close(ctx)
		t.Fatal("connected after Stop")
	}

	s2 := start(t, Config{DataDir: dir})
	if s2.URL() == "" {
		t.Fatal("empty URL")
	}
	var name string
	if err := connect(t, s2.URL()).QueryRow(ctx, "SELECT name FROM survivors").Scan(&name); err != nil {
		t.Fatalf("table after restart: %v", err)
	}
	if name != "first" {
		t.Fatalf("row after restart = %q", name)
	}
	if err := s2.Stop(ctx); err != nil {
		t.Fatalf("Stop after restart: %v", err)
	}

	// The password cannot be recreated for an existing cluster.
	if err := os.Remove(filepath.Join(dir, "password")); err != nil {
		t.Fatal(err)
	}
	if s3, err := Start(ctx, Config{DataDir: dir}); err == nil {
		_ = s3.Stop(ctx)
		t.Fatal("Start without the password file succeeded")
	} else if !strings.Contains(err.Error(), "password file") {
		t.Fatalf("Start without the password file: %v", err)
	}
}

func ping(t *testing.T, url string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	if err := conn.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
}

func wantOwner(t *testing.T, path, name string) {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatalf("look up %s: %v", name, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if uid := strconv.FormatUint(uint64(fi.Sys().(*syscall.Stat_t).Uid), 10); uid != u.Uid {
		t.Errorf("%s is owned by uid %s, want %s (%s)", path, uid, u.Uid, name)
	}
}

// recordHandler collects log records and signals when one has a message.
type recordHandler struct {
	mu   sync.Mutex
	msgs []string
	want string
	hit  chan struct{}
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recordHandler) WithGroup(string) slog.Handler            { return h }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.msgs = append(h.msgs, r.Message)
	if r.Message == h.want {
		select {
		case h.hit <- struct{}{}:
		default:
		}
	}
	return nil
}

func (h *recordHandler) has(prefix string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, m := range h.msgs {
		if strings.HasPrefix(m, prefix) {
			return true
		}
	}
	return false
}

// TestRecoversFromCrash kills every server process, as a power cut or an OOM
// kill would, leaving a stale postmaster.pid; the next Start recovers.
func TestRecoversFromCrash(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	ctx := context.Background()
	dir := dataDir(t)
	h := &recordHandler{want: "embedded postgres exited unexpectedly", hit: make(chan struct{}, 1)}

	s := start(t, Config{DataDir: dir, Logger: slog.New(h)})
	if !h.has("postgres: ") {
		t.Error("the server's own log lines did not reach the logger")
	}
	conn := connect(t, s.URL())
	if _, err := conn.Exec(ctx, "CREATE TABLE t (v int); INSERT INTO t VALUES (42)"); err != nil {
		t.Fatalf("write: %v", err)
	}
	_ = conn.Close(ctx)

	// The server runs in its own process group.
	if err := syscall.Kill(-s.proc.pid(), syscall.SIGKILL); err != nil {
		t.Fatalf("kill: %v", err)
	}
	select {
	case <-h.hit:
	case <-time.After(time.Minute):
		t.Fatal("the crash was not logged")
	}
	if _, err := os.Stat(filepath.Join(dir, "pgdata", "postmaster.pid")); err != nil {
		t.Fatalf("want a stale postmaster.pid: %v", err)
	}
	if err := s.Stop(ctx); err == nil || !strings.Contains(err.Error(), "already exited") {
		t.Fatalf("Stop after the crash = %v, want an already exited error", err)
	}

	s2 := start(t, Config{DataDir: dir})
	var v int
	if err := connect(t, s2.URL()).QueryRow(ctx, "SELECT v FROM t").Scan(&v); err != nil || v != 42 {
		t.Fatalf("after recovery: v=%d err=%v", v, err)
	}
}

func TestFixedPortAndDatabase(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()

	s := start(t, Config{DataDir: dataDir(t), Port: port, Database: "mail-test"})
	u, _ := url.Parse(s.URL())
	if u.Port() != strconv.Itoa(port) || u.Path != "/mail-test" {
		t.Fatalf("URL() = %q, want port %d and database mail-test", s.URL(), port)
	}
	var db string
	if err := connect(t, s.URL()).QueryRow(context.Background(), "SELECT current_database()").Scan(&db); err != nil || db != "mail-test" {
		t.Fatalf("current_database = %q, %v", db, err)
	}
}

// TestSettings checks extra settings reach the server, and that they belong
// to one start: the next start without them runs with the defaults.
func TestSettings(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	ctx := context.Background()
	dir := dataDir(t)
	s := start(t, Config{DataDir: dir, Settings: map[string]string{"work_mem": "7MB", "application_name": "with spaces, and = signs"}})
	conn := connect(t, s.URL())
	var workMem, appName string
	if err := conn.QueryRow(ctx, "SELECT current_setting('work_mem'), current_setting('application_name')").Scan(&workMem, &appName); err != nil {
		t.Fatal(err)
	}
	if workMem != "7MB" || appName != "with spaces, and = signs" {
		t.Errorf("work_mem %q, application_name %q; want the settings given", workMem, appName)
	}
	_ = conn.Close(ctx)
	if err := s.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	s = start(t, Config{DataDir: dir})
	if err := connect(t, s.URL()).QueryRow(ctx, "SELECT current_setting('work_mem')").Scan(&workMem); err != nil {
		t.Fatal(err)
	}
	if workMem == "7MB" {
		t.Error("work_mem kept from the previous start")
	}
}

// TestPortInUse checks a failed start leaves nothing behind: no process
// holding the cluster, no lock on DataDir.
func TestPortInUse(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	ctx := context.Background()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := dataDir(t)
	_, err = Start(ctx, Config{DataDir: dir, Port: busy.Addr().(*net.TCPAddr).Port})
	if err == nil || !strings.Contains(err.Error(), "Address already in use") {
		t.Fatalf("Start on a busy port = %v, want the server's bind error", err)
	}
	s := start(t, Config{DataDir: dir})
	ping(t, s.URL())
}

func TestNoBinaries(t *testing.T) {
	t.Parallel()
	dir := dataDir(t)
	_, err := Start(context.Background(), Config{DataDir: dir, BinDir: t.TempDir()})
	if !errors.Is(err, ErrNoBinaries) {
		t.Fatalf("Start = %v, want ErrNoBinaries", err)
	}
	if !strings.Contains(err.Error(), "apt-get install postgresql") || !strings.Contains(err.Error(), "POSTHASTE_DATABASE_URL") {
		t.Errorf("error %q does not say what to install", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("DataDir was created although Start failed: %v", err)
	}
}

func TestWrongMajorVersion(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	dir := dataDir(t)
	if err := os.MkdirAll(filepath.Join(dir, "pgdata"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pgdata", "PG_VERSION"), []byte("8.4\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Start(context.Background(), Config{DataDir: dir})
	if err == nil || !strings.Contains(err.Error(), "PostgreSQL 8.4") {
		t.Fatalf("Start = %v, want an error naming the cluster's version", err)
	}
}

func TestUnreachableDataDir(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("only root hands the data directory to another user")
	}
	requireBinaries(t)
	private := filepath.Join(dataDir(t), "private")
	if err := os.MkdirAll(private, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := Start(context.Background(), Config{DataDir: filepath.Join(private, "pg")})
	if err == nil {
		t.Fatal("Start succeeded under a directory its user cannot enter")
	}
	for _, want := range []string{"DataDir:", "not reachable", private, "chmod o+x"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

func TestForeignDataDir(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	dir := dataDir(t)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Start(context.Background(), Config{DataDir: dir})
	if err == nil || !strings.Contains(err.Error(), "notes.txt") {
		t.Fatalf("Start = %v, want a refusal naming the foreign file", err)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     Config
		wantErr string // prefix; "" = valid
	}{
		{"minimal", Config{DataDir: "/var/lib/posthaste"}, ""},
		{"no data dir", Config{}, "DataDir:"},
		{"negative port", Config{DataDir: "d", Port: -1}, "Port:"},
		{"port too big", Config{DataDir: "d", Port: 65536}, "Port:"},
		{"long database name", Config{DataDir: "d", Database: strings.Repeat("x", 64)}, "Database:"},
		{"NUL in database name", Config{DataDir: "d", Database: "a\x00b"}, "Database:"},
		{"negative start timeout", Config{DataDir: "d", StartTimeout: -time.Second}, "StartTimeout:"},
		{"qualified setting", Config{DataDir: "d", Settings: map[string]string{"pg_stat_statements.track": "top", "work_mem": ""}}, ""},
		{"setting name with a space", Config{DataDir: "d", Settings: map[string]string{"work mem": "1MB"}}, "Settings:"},
		{"setting name with =", Config{DataDir: "d", Settings: map[string]string{"a=b": "1"}}, "Settings:"},
		{"setting name from a digit", Config{DataDir: "d", Settings: map[string]string{"1x": "1"}}, "Settings:"},
		{"empty setting name", Config{DataDir: "d", Settings: map[string]string{"": "1"}}, "Settings:"},
		{"setting pgserver owns", Config{DataDir: "d", Settings: map[string]string{"Listen_Addresses": "*"}}, "Settings:"},
		{"line break in a value", Config{DataDir: "d", Settings: map[string]string{"work_mem": "1MB\nport=1"}}, "Settings:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.cfg.WithDefaults().validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("validate: %v", err)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
				t.Fatalf("validate = %v, want an error starting %q", err, tt.wantErr)
			}
			if _, err := Start(context.Background(), tt.cfg); err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Start = %v, want the validation error", err)
			}
		})
	}
}

func TestWithDefaults(t *testing.T) {
	t.Parallel()
	c := Config{DataDir: "d"}.WithDefaults()
	want := "posthaste"
	if _, err := user.Lookup("postgres"); err == nil {
		want = "postgres"
	}
	if c.RunAs != want || c.Database != "posthaste" || c.Port != 0 || c.BinDir != "" ||
		c.StartTimeout != 2*time.Minute || c.Logger == nil {
		t.Fatalf("WithDefaults() = %+v", c)
	}
}

func TestDiscover(t *testing.T) {
	t.Parallel()
	requireBinaries(t)
	ctx := context.Background()
	dir, err := findBinDir(ctx, "", "")
	if err != nil {
		t.Fatalf("findBinDir: %v", err)
	}
	if !hasServerBinaries(dir) {
		t.Fatalf("%s lacks initdb or postgres", dir)
	}
	major, err := majorVersion(ctx, dir)
	if err != nil {
		t.Fatalf("majorVersion: %v", err)
	}
	if got, err := findBinDir(ctx, "", major); err != nil || !hasServerBinaries(got) {
		t.Fatalf("findBinDir for version %s = %q, %v", major, got, err)
	}
	if _, err := findBinDir(ctx, "", "7.4"); err == nil || !strings.Contains(err.Error(), "PostgreSQL 7.4") {
		t.Fatalf("findBinDir for 7.4 = %v, want an error", err)
	}
}

func TestParseMajor(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n", "15"},
		{"postgres (PostgreSQL) 17.2\n", "17"},
		{"postgres (PostgreSQL) 9.6.24\n", "9.6"},
		{"postgres (PostgreSQL) 18beta1\n", "18"},
		{"postgres (PostgreSQL) 19devel\n", "19"},
	}
	for _, tt := range tests {
		if got, err := parseMajor(tt.in); err != nil || got != tt.want {
			t.Errorf("parseMajor(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	if _, err := parseMajor("postgres 15"); err == nil {
		t.Error("parseMajor accepted output without (PostgreSQL)")
	}
}

func TestByVersionDesc(t *testing.T) {
	t.Parallel()
	got := byVersionDesc([]string{
		"/usr/lib/postgresql/9.6/bin",
		"/usr/lib/postgresql/15/bin",
		"/usr/lib/postgresql/10/bin",
		"/opt/homebrew/opt/postgresql/bin",
		"/usr/lib/postgresql/16/bin",
	})
	want := []string{
		"/usr/lib/postgresql/16/bin",
		"/usr/lib/postgresql/15/bin",
		"/usr/lib/postgresql/10/bin",
		"/usr/lib/postgresql/9.6/bin",
		"/opt/homebrew/opt/postgresql/bin",
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("byVersionDesc = %v\nwant %v", got, want)
	}
}

func TestParseLogLine(t *testing.T) {
	t.Parallel()
	pid, sev, msg, ok := parseLogLine("2025-01-02 03:04:05.678 UTC [42] LOG:  database system is ready to accept connections")
	if !ok || pid != "42" || sev != "LOG" || msg != "database system is ready to accept connections" {
		t.Fatalf("parseLogLine = %q %q %q %v", pid, sev, msg, ok)
	}
	if _, _, _, ok := parseLogLine("\tcontinuation of a statement"); ok {
		t.Fatal("parsed a line without a prefix")
	}
	if _, _, _, ok := parseLogLine("2025-01-02 03:04:05.678 UTC [42] some text: not a severity:  x"); ok {
		t.Fatal("parsed a lower-case severity")
	}
}
