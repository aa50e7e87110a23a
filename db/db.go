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

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ErrNotFound is returned when the requested row does not exist.
var ErrNotFound = errors.New("not found")

// ErrIdempotencyConflict is returned when an idempotency key that is still
// live is used again for a request with a different hash.
var ErrIdempotencyConflict = errors.New("idempotency key reused with a different request")

// ErrUnavailable is wrapped into errors caused by the database being
// unreachable: refused or broken connections, a server shutting down.
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

// Open connects a pool to the database at url (a postgres:// URL or a
// keyword/value string) and checks that the server answers.
func Open(ctx context.Context, url string) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
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
// ErrNotFound, a connection that cannot be made or was lost wraps
// ErrUnavailable. Anything else, including context errors, is returned as it
// is.
func mapError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if unavailable(err) {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

func unavailable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "08"): // connection exception
			return true
		case pgErr.Code == "57P01", // admin_shutdown
			pgErr.Code == "57P02", // crash_shutdown
			pgErr.Code == "57P03", // cannot_connect_now
			pgErr.Code == "53300": // too_many_connections
			return true
		}
		return false
	}
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	return errors.Is(err, pgconn.ErrConnClosed) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed)
}
