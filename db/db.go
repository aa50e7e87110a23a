// Package db owns every SQL statement Posthaste runs: the message store, the
// delivery queue (claims under leases, outcomes, rescue), idempotency keys,
// API keys and the outbox wake-up channel. It is the only package that talks
// to PostgreSQL; callers get the row types defined here.
//
// Concurrency rests on two rules that every statement here keeps. Recipient
// rows are locked either in id order or with SKIP LOCKED, and message rows
// are locked last, in id order, just before messages.status is recomputed;
// together they leave no lock cycle between workers. The recomputation runs
// as its own statement after those locks are held, so under READ COMMITTED
// it sees every recipient change committed by whoever held them before.
package db

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/puddle/v2"
)

// ErrNotFound is returned when the requested row does not exist.
var ErrNotFound = errors.New("not found")

// ErrIdempotencyConflict is returned when an idempotency key that is still
// live is used again for a request with a different hash.
var ErrIdempotencyConflict = errors.New("idempotency key reused with a different request")

// ErrUnavailable is wrapped into errors caused by the database being
// unreachable: refused, timed-out or broken connections, a server shutting
// down, a DB that was closed.
var ErrUnavailable = errors.New("database unavailable")

// Recipient statuses. The first four are waiting or in flight; the last four
// are final.
const (
	// StatusScheduled waits for the message's send_at.
	StatusScheduled = "scheduled"
	// StatusQueued is due for its first attempt (or again after a lease was
	// given back).
	StatusQueued = "queued"
	// StatusSending is leased by a worker that is delivering it.
	StatusSending = "sending"
	// StatusDeferred waits for a retry after a temporary failure.
	StatusDeferred = "deferred"
	// StatusDelivered was accepted by the receiving server.
	StatusDelivered = "delivered"
	// StatusBounced was refused permanently by the receiving server.
	StatusBounced = "bounced"
	// StatusFailed was given up: too old, too many tries, or undeliverable.
	StatusFailed = "failed"
	// StatusCanceled was canceled by the caller before it was delivered.
	StatusCanceled = "canceled"
)

// MessagePartiallyDelivered is the message status when its recipients are
// all final, not all alike, and at least one was delivered.
const MessagePartiallyDelivered = "partially_delivered"

// DB is the Posthaste database: a pgx connection pool and the statements run
// on it. It is safe for concurrent use.
type DB struct {
	pool *pgxpool.Pool
}

// Querier is what a statement runs on: the pool, or a transaction begun on it.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

var (
	_ Querier = (*pgxpool.Pool)(nil)
	_ Querier = (pgx.Tx)(nil)
)

// DefaultConnectTimeout bounds each attempt to open a connection when the
// connection string sets no connect_timeout. Without a bound, a database
// host that drops packets would hold every caller until the operating
// system gives up on TCP, minutes later, instead of answering Unavailable.
const DefaultConnectTimeout = 10 * time.Second

// Open connects a pool to the database at url (a postgres:// URL or a
// keyword/value string) and checks that the server answers. A url without
// connect_timeout (or with 0) gets DefaultConnectTimeout.
func Open(ctx context.Context, url string) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	boundConnect(cfg.ConnConfig)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", mapError(err))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("ping database: %w", mapError(err))
	}
	return &DB{pool: pool}, nil
}

// boundConnect gives cfg DefaultConnectTimeout unless it has a timeout.
func boundConnect(cfg *pgx.ConnConfig) {
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
}

// Ping checks that the database answers a round trip on a pooled
// connection. Its error wraps ErrUnavailable when the database cannot be
// reached or the DB was closed.
func (d *DB) Ping(ctx context.Context) error {
	if err := d.pool.Ping(ctx); err != nil {
		return fmt.Errorf("ping database: %w", mapError(err))
	}
	return nil
}

// Close closes every connection of the pool, waiting for the ones in use to
// be given back.
func (d *DB) Close() {
	d.pool.Close()
}

// inTx runs fn in a transaction, committing when it returns nil.
func (d *DB) inTx(ctx context.Context, fn func(tx pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, d.pool, fn)
}

// mapError turns pgx errors into the package's sentinels: no rows becomes
// ErrNotFound, and a database that cannot be reached (see unavailable) wraps
// ErrUnavailable, so the API answers "retry later" rather than "internal
// error". Anything else, including the caller's own cancellation or
// deadline, is returned as it is.
func mapError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	if unavailable(err) {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// unavailable reports whether err means the database could not be used at
// all, as opposed to refusing one statement.
//
// The order matters. A caller that canceled is never the database's fault.
// A failed connection attempt is always the database's (refused, timed out,
// shutting down, failing authentication): it wraps the server's PgError or a
// context deadline too, so it is recognised before those. A deadline met
// while a statement runs is the caller's, even though pgx reports it through
// a net.Error timeout.
func unavailable(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "08"): // connection exception
			return true
		case pgErr.Code == "57P01", // admin_shutdown
			pgErr.Code == "57P02", // crash_shutdown
			pgErr.Code == "57P03", // cannot_connect_now
			pgErr.Code == "53300", // too_many_connections
			// A pooled connection to a primary that was demoted in a
			// failover: writes fail until the pool reaches the new one.
			pgErr.Code == "25006": // read_only_sql_transaction
			return true
		}
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	// pgxpool hands out puddle's sentinel, unwrapped, once the DB is closed;
	// a request that arrives during shutdown finds no database to use.
	return errors.Is(err, puddle.ErrClosedPool) ||
		errors.Is(err, pgconn.ErrConnClosed) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed)
}
