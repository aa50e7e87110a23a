// Package pgserver runs a private PostgreSQL server as a child process: the
// database `posthaste serve` uses when no database URL is configured, and the
// last resort of the test harness. It owns the cluster's directory (initdb on
// first start, the superuser password, the server log), the process (start,
// readiness, shutdown) and, when running as root, handing both to an
// unprivileged user, because initdb and postgres refuse to run as root.
//
// The server listens on 127.0.0.1 only and has no Unix socket.
package pgserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrNoBinaries is returned, wrapped with where it looked, when no PostgreSQL
// server binaries (initdb and postgres) are found.
var ErrNoBinaries = errors.New("no PostgreSQL server binaries (initdb, postgres) found: " +
	"install them (Debian/Ubuntu: apt-get install postgresql; Fedora/RHEL: dnf install postgresql-server; " +
	"Alpine: apk add postgresql; macOS: brew install postgresql) or set POSTHASTE_DATABASE_URL to use an existing server")

const (
	// superuser is the role initdb creates and the URL connects as.
	superuser = "posthaste"
	// createdUser is the system user made when running as root and no
	// "postgres" user exists.
	createdUser = "posthaste"
	// portAttempts bounds the retries when a picked free port is taken
	// before postgres binds it.
	portAttempts = 5
)

// Config configures the embedded server.
type Config struct {
	// DataDir is the directory that holds the cluster (DataDir/pgdata), its
	// superuser password (DataDir/password, mode 0600) and the log of the
	// latest run (DataDir/postgres.log); it survives restarts. It must be
	// empty, missing, or a directory an earlier Start made. Defaults to
	// nothing: it is required.
	DataDir string
	// BinDir is the directory with the PostgreSQL server binaries (initdb,
	// postgres). When discovering, only binaries of an existing cluster's
	// major version qualify. Defaults to discovery: `pg_config --bindir`,
	// /usr/lib/postgresql/<highest>/bin, /usr/local/pgsql/bin,
	// /opt/homebrew/opt/postgresql*/bin, then postgres on PATH.
	BinDir string
	// Port is the TCP port on 127.0.0.1. Defaults to 0: a free port picked
	// at each start.
	Port int
	// RunAs is the unprivileged system user that owns DataDir and runs initdb
	// and postgres when this process runs as root; ignored otherwise.
	// Defaults to "postgres" if that user exists, else "posthaste", created
	// with useradd --system --no-create-home when missing.
	RunAs string
	// Database is the database created if missing and named in URL.
	// Defaults to "posthaste".
	Database string
	// StartTimeout bounds the wait for the launched server to accept
	// connections, which includes crash recovery after an unclean stop.
	// Defaults to 2m.
	StartTimeout time.Duration
	// Settings are extra server settings, passed as -c name=value at each
	// launch, e.g. {"shared_preload_libraries": "pg_stat_statements"} for a
	// benchmark that profiles statements. They do not persist in the
	// cluster: a later start without them runs with the defaults again. The
	// settings Start itself owns (the address, port, socket and log
	// format) cannot be overridden. Defaults to none.
	Settings map[string]string
	// Logger receives the server's own log lines and lifecycle events.
	// Defaults to discarding.
	Logger *slog.Logger
}

// ownSettings are the settings startPostgres fixes: changing them would
// break how Start reaches and supervises the server.
var ownSettings = []string{"listen_addresses", "port", "unix_socket_directories", "logging_collector", "log_line_prefix", "data_directory"}

// WithDefaults returns the config with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.RunAs == "" {
		c.RunAs = createdUser
		if _, err := user.Lookup("postgres"); err == nil {
			c.RunAs = "postgres"
		}
	}
	if c.Database == "" {
		c.Database = "posthaste"
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = 2 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

func (c Config) validate() error {
	if c.DataDir == "" {
		return errors.New("DataDir: required")
	}
	if c.Port < 0 || c.Port > 65535 {
		return fmt.Errorf("Port: %d is not between 0 and 65535", c.Port)
	}
	if c.RunAs == "" {
		return errors.New("RunAs: must not be empty")
	}
	// NAMEDATALEN is 64, so identifiers keep at most 63 bytes.
	if c.Database == "" || len(c.Database) > 63 || strings.ContainsRune(c.Database, 0) {
		return fmt.Errorf("Database: %q is not a valid database name (1 to 63 bytes, no NUL)", c.Database)
	}
	if c.StartTimeout < 0 {
		return fmt.Errorf("StartTimeout: must not be negative, got %s", c.StartTimeout)
	}
	for name, value := range c.Settings {
		if err := validSetting(name, value); err != nil {
			return fmt.Errorf("Settings: %w", err)
		}
	}
	return nil
}

// validSetting checks one extra setting. Names are PostgreSQL's GUC names,
// optionally qualified by an extension ("pg_stat_statements.track"); the
// server rejects unknown names and bad values itself, at launch.
func validSetting(name, value string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("%q is not a setting name (1 to 63 bytes)", name)
	}
	for i, r := range name {
		ok := r == '_' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') ||
			(i > 0 && (r == '.' || (r >= '0' && r <= '9')))
		if !ok {
			return fmt.Errorf("%q is not a setting name (letters, digits, _ and .)", name)
		}
	}
	if slices.Contains(ownSettings, strings.ToLower(name)) {
		return fmt.Errorf("%s is set by pgserver itself", name)
	}
	// A value goes into one argv element, so only NUL cannot be passed;
	// a newline would also end up in the server log as if it were a line.
	if strings.ContainsAny(value, "\x00\n\r") {
		return fmt.Errorf("%s: the value contains a NUL or a line break", name)
	}
	return nil
}

// Server is a running PostgreSQL server started by Start.
type Server struct {
	url   string
	log   *slog.Logger
	proc  *process
	out   *logWriter
	lock  *os.File    // held on DataDir/lock while the server runs
	ready atomic.Bool // set once the server accepted a connection

	stopOnce sync.Once
	stopErr  error
}

// Start prepares DataDir (initdb on the first start), launches postgres,
// waits until it accepts connections and creates the database if missing. If
// any step fails, nothing is left running. ctx bounds the whole start; the
// server itself runs until Stop.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("pgserver config: %w", err)
	}
	log := cfg.Logger
	root, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("DataDir: %w", err)
	}
	// Ownership changes and the reachability check apply to the real path.
	if real, err := filepath.EvalSymlinks(root); err == nil {
		root = real
	}
	dir := layout{root: root}

	own, err := resolveOwner(ctx, cfg.RunAs, log)
	if err != nil {
		return nil, err
	}
	// Binaries first: without them nothing should be created on disk.
	wantMajor, err := dir.clusterVersion()
	if err != nil {
		return nil, err
	}
	bin, err := findBinDir(ctx, cfg.BinDir, wantMajor)
	if err != nil {
		return nil, err
	}
	if err := dir.prepare(own, log); err != nil {
		return nil, err
	}
	lock, err := lockDir(dir.lockFile(), own)
	if err != nil {
		return nil, err
	}
	s := &Server{log: log, lock: lock}
	if err := s.start(ctx, cfg, bin, dir, own); err != nil {
		_ = s.release()
		return nil, err
	}
	return s, nil
}

func (s *Server) start(ctx context.Context, cfg Config, bin string, dir layout, own *owner) error {
	initialized, err := dir.initialized()
	if err != nil {
		return err
	}
	password, err := dir.password(initialized, own)
	if err != nil {
		return err
	}
	if !initialized {
		if err := initdb(ctx, bin, dir, own, s.log); err != nil {
			return err
		}
	}
	if s.out, err = newLogWriter(dir.logFile(), own, s.log); err != nil {
		return err
	}
	port, err := s.launch(ctx, cfg, bin, dir, own, password)
	if err != nil {
		return err
	}
	if err := createDatabase(ctx, adminURL(password, port), cfg.Database); err != nil {
		s.abort(ctx)
		return err
	}
	s.url = connURL(password, port, cfg.Database)
	s.log.Info("embedded postgres ready",
		"data_dir", dir.root, "bin_dir", bin, "port", port, "database", cfg.Database, "pid", s.proc.pid())
	return nil
}

// release closes the log and gives up DataDir, after the process is gone.
func (s *Server) release() error {
	var errs []error
	if s.out != nil {
		if err := s.out.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close postgres log: %w", err))
		}
	}
	if err := s.lock.Close(); err != nil {
		errs = append(errs, fmt.Errorf("release data directory lock: %w", err))
	}
	return errors.Join(errs...)
}

// launch starts postgres and waits until it accepts connections, picking
// another port when an automatically chosen one was taken in between.
func (s *Server) launch(ctx context.Context, cfg Config, bin string, dir layout, own *owner, password string) (int, error) {
	for attempt := 1; ; attempt++ {
		port := cfg.Port
		if port == 0 {
			var err error
			if port, err = freePort(); err != nil {
				return 0, err
			}
		}
		s.out.resetTail()
		proc, err := startPostgres(bin, dir, port, cfg.Settings, own, s.out, s.onExit)
		if err != nil {
			return 0, err
		}
		s.proc = proc
		err = waitReady(ctx, proc, adminURL(password, port), cfg.StartTimeout)
		if err == nil {
			s.ready.Store(true)
			return port, nil
		}
		s.abort(ctx)
		tail := s.out.tail()
		if cfg.Port == 0 && attempt < portAttempts && strings.Contains(tail, "Address already in use") {
			s.log.Warn("embedded postgres port taken, trying another", "port", port)
			continue
		}
		if tail != "" {
			return 0, fmt.Errorf("start postgres on 127.0.0.1:%d: %w; server output:\n%s", port, err, tail)
		}
		return 0, fmt.Errorf("start postgres on 127.0.0.1:%d: %w", port, err)
	}
}

// onExit reports a server that ends without Stop: the service loses its
// database, and the log says why. An exit during Start is Start's error.
func (s *Server) onExit(err error) {
	if !s.ready.Load() {
		return
	}
	s.log.Error("embedded postgres exited unexpectedly", "err", err, "output", s.out.tail())
}

// URL returns the connection URL:
// postgres://posthaste:<password>@127.0.0.1:<port>/<database>?sslmode=disable.
func (s *Server) URL() string { return s.url }

// Stop shuts the server down with a fast shutdown (roll back open
// transactions, checkpoint, exit) and waits for it to exit. If ctx ends
// first, the server is told to quit immediately (crash recovery runs on the
// next start) and then killed. Stop may be called more than once; later calls
// wait for the first and return its result.
func (s *Server) Stop(ctx context.Context) error {
	s.stopOnce.Do(func() {
		s.stopErr = errors.Join(s.stopProcess(ctx), s.release())
	})
	return s.stopErr
}

func (s *Server) stopProcess(ctx context.Context) error {
	err := s.proc.stop(ctx)
	if err != nil {
		return fmt.Errorf("stop postgres: %w", err)
	}
	return nil
}

// abort stops a server whose start failed. It gets time for a fast shutdown
// even when ctx is already over, so the cluster is left clean.
func (s *Server) abort(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.stopProcess(ctx); err != nil {
		s.log.Debug("embedded postgres: stop after failed start", "err", err)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	return port, nil
}

func connURL(password string, port int, database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(superuser, password),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// adminURL names the "postgres" database, which initdb always creates.
func adminURL(password string, port int) string {
	return connURL(password, port, "postgres")
}

// waitReady polls until the server accepts an authenticated connection, the
// process exits, or the timeout passes.
func waitReady(ctx context.Context, proc *process, connString string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// An exit also ends a connection attempt in progress: if another program
	// holds the port, it may accept the attempt and never answer.
	ctx, cancelExited := context.WithCancelCause(ctx)
	defer cancelExited(nil)
	errExited := errors.New("postgres exited before accepting connections")
	go func() {
		select {
		case <-proc.done:
			cancelExited(errExited)
		case <-ctx.Done():
		}
	}()

	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		attemptCtx, cancelAttempt := context.WithTimeout(ctx, 5*time.Second)
		conn, err := pgx.Connect(attemptCtx, connString)
		cancelAttempt()
		if err == nil {
			return conn.Close(ctx)
		}
		// A wrong password (SQLSTATE class 28) will not fix itself.
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "28") {
			return fmt.Errorf("connect: %w (does DataDir's password file belong to this cluster?)", err)
		}
		select {
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), errExited) {
				return fmt.Errorf("%w: %w", errExited, proc.waitErr)
			}
			return fmt.Errorf("postgres did not accept connections: %w (last attempt: %v)", ctx.Err(), err)
		case <-tick.C:
		}
	}
}

func createDatabase(ctx context.Context, adminURL, name string) error {
	if name == "postgres" {
		return nil
	}
	conn, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return fmt.Errorf("connect to create database %s: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	err = conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists)
	if err != nil {
		return fmt.Errorf("look up database %s: %w", name, err)
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P04" { // duplicate_database: made in between
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	return nil
}

// childEnv is the environment of initdb and postgres: libpq variables such as
// PGPORT would change what the server does, and the C locale keeps its
// messages in English so errors can be recognized.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "PG") || strings.HasPrefix(name, "LC_") || name == "LANG" || name == "LANGUAGE" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C", "LANG=C")
}
