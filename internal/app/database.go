package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/posthaste/posthaste/internal/pgserver"
)

// embeddedURLFile is written next to the embedded cluster while serve runs, so
// that `posthaste keys` and `posthaste migrate` reach the running server
// instead of trying to start a second one on the same data directory.
const embeddedURLFile = "embedded-database.url"

// DefaultDataDir is where the embedded database lives when --data-dir is not
// given: /var/lib/posthaste for root (a directory other system users can
// traverse, which the unprivileged database user needs), else the user's data
// directory.
func DefaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/posthaste"
	}
	if dir := os.Getenv("XDG_DATA_HOME"); dir != "" {
		return filepath.Join(dir, "posthaste")
	}
	if u, err := user.Current(); err == nil && u.HomeDir != "" {
		return filepath.Join(u.HomeDir, ".local", "share", "posthaste")
	}
	return "posthaste-data"
}

// Database is the PostgreSQL the process uses: a configured one, or an
// embedded one that it started and must stop.
type Database struct {
	URL      string
	embedded *pgserver.Server
	urlFile  string
}

// ErrNoDatabase is returned by OpenExistingDatabase when the data directory
// holds no embedded database.
var ErrNoDatabase = errors.New("no database in the data directory")

// OpenDatabase returns url when it is set. Otherwise it reuses an embedded
// server another posthaste process runs on dataDir, or starts one, running
// initdb first when dataDir holds none.
func OpenDatabase(ctx context.Context, url, dataDir string, logger *slog.Logger) (*Database, error) {
	return openDatabase(ctx, url, dataDir, logger, false)
}

// OpenExistingDatabase is OpenDatabase for commands that only make sense
// against existing data (keys, projects): when no URL is given and dataDir
// holds no embedded database, it creates nothing and returns an error
// wrapping ErrNoDatabase, since a mistyped --data-dir would otherwise get a
// new, empty database.
func OpenExistingDatabase(ctx context.Context, url, dataDir string, logger *slog.Logger) (*Database, error) {
	return openDatabase(ctx, url, dataDir, logger, true)
}

func openDatabase(ctx context.Context, url, dataDir string, logger *slog.Logger, existing bool) (*Database, error) {
	if url != "" {
		return &Database{URL: url}, nil
	}
	if dataDir == "" {
		dataDir = DefaultDataDir()
	}
	urlFile := filepath.Join(dataDir, embeddedURLFile)
	if b, err := os.ReadFile(urlFile); err == nil && reachable(ctx, string(b)) {
		return &Database{URL: string(b)}, nil
	}
	if existing {
		ok, err := pgserver.Exists(embeddedDir(dataDir))
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("%w %s (start posthaste serve there first, or pass --database-url)", ErrNoDatabase, dataDir)
		}
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("create data directory %s: %w", dataDir, err)
	}
	logger.Info("no database configured: starting the embedded PostgreSQL", "data_dir", dataDir)
	srv, err := pgserver.Start(ctx, pgserver.Config{
		DataDir: embeddedDir(dataDir),
		Logger:  logger,
	})
	if err != nil {
		return nil, fmt.Errorf("start embedded database: %w", err)
	}
	if err := os.WriteFile(urlFile, []byte(srv.URL()), 0o600); err != nil {
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		return nil, errors.Join(fmt.Errorf("write %s: %w", urlFile, err), srv.Stop(stopCtx))
	}
	return &Database{URL: srv.URL(), embedded: srv, urlFile: urlFile}, nil
}

// embeddedDir is where the embedded cluster lives inside a data directory.
func embeddedDir(dataDir string) string { return filepath.Join(dataDir, "postgres") }

// Embedded reports whether this process started the database.
func (d *Database) Embedded() bool { return d.embedded != nil }

// Close stops the embedded server if this process started it.
func (d *Database) Close(ctx context.Context) error {
	if d.embedded == nil {
		return nil
	}
	_ = os.Remove(d.urlFile)
	if err := d.embedded.Stop(ctx); err != nil {
		return fmt.Errorf("stop embedded database: %w", err)
	}
	return nil
}

// Backoff between attempts to reach a database that is not up yet.
const (
	databaseRetryFirst = 250 * time.Millisecond
	databaseRetryMax   = 5 * time.Second
)

// waitForDatabase returns once the database at url accepts a connection.
// A database that is not up yet is normal when the process starts together
// with it (a compose file, a pod); failing at once would only make the
// supervisor restart the process in a loop. It retries with a capped,
// doubling backoff until wait has passed (a negative wait tries once).
// Errors that waiting cannot fix (a malformed URL, a refused password, a
// database that does not exist) are returned at once.
func waitForDatabase(ctx context.Context, url string, wait time.Duration, logger *slog.Logger) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("parse database url: %w", err)
	}
	start := time.Now()
	deadline := start.Add(wait)
	delay := databaseRetryFirst
	for attempt := 1; ; attempt++ {
		err := connectOnce(ctx, cfg)
		if err == nil {
			if attempt > 1 {
				logger.InfoContext(ctx, "database is up", "waited", time.Since(start).Round(time.Millisecond))
			}
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("wait for database: %w", ctx.Err())
		}
		if !worthWaiting(err) {
			return fmt.Errorf("connect to database: %w", err)
		}
		left := time.Until(deadline)
		if left <= 0 {
			if wait <= 0 {
				return fmt.Errorf("connect to database: %w", err)
			}
			return fmt.Errorf("database not reachable after waiting %s: %w", wait, err)
		}
		delay = min(delay, left)
		logger.WarnContext(ctx, "waiting for database", "error", err, "retry_in", delay.Round(time.Millisecond), "give_up_in", left.Round(time.Second))
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for database: %w", ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, databaseRetryMax)
	}
}

// databaseAttemptTimeout bounds one attempt, so that a server that drops
// packets rather than refusing them is retried, and logged, like any other.
const databaseAttemptTimeout = 10 * time.Second

// connectOnce opens and closes one connection.
func connectOnce(ctx context.Context, cfg *pgx.ConnConfig) error {
	ctx, cancel := context.WithTimeout(ctx, databaseAttemptTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// worthWaiting reports whether a failed connection may succeed later: the
// server is not listening or still starting, rather than refusing us.
func worthWaiting(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "28"): // invalid_authorization_specification, invalid_password
			return false
		case pgErr.Code == "3D000": // invalid_catalog_name: no such database
			return false
		}
	}
	return true
}

func reachable(ctx context.Context, url string) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return false
	}
	_ = conn.Close(ctx)
	return true
}
