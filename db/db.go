// Package db owns every SQL statement Posthaste runs: the message store, the
// delivery queue (claims under leases, outcomes, rescue), the event log,
// idempotency keys, API keys and the outbox wake-up channel. It is the only
// package that talks to PostgreSQL; callers get the row types defined here.
//
// A DB runs its statements on the pool, or, inside InTx, on one
// transaction; the methods are the same either way, so several changes can
// be composed into one transaction.
//
// Concurrency rests on two rules that every statement here keeps. Recipient
// rows are locked either in id order or with SKIP LOCKED, and message rows
// are locked last, in id order, just before messages.status is recomputed
// (by sendChange, the one path every state change takes); together they
// leave no lock cycle between workers. The recomputation runs as its own
// statement after those locks are held, so under READ COMMITTED it sees
// every recipient change committed by whoever held them before.
//
// Each method keeps the rules on its own, inside InTx too. A transaction
// composed of several changes, though, still holds the message locks of the
// first when the next one locks recipients, and its recipient locks from
// different calls are not in one id order: against a concurrent worker that
// can close a cycle. PostgreSQL then aborts one of the two with a deadlock
// error (SQLSTATE 40P01) rather than waiting forever, so a caller that
// composes several changes of recipients others may be working on must be
// ready to run its transaction again.
package db

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
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

// ErrNothingToCancel is returned by CancelMessage when every recipient of the
// message is already final, so canceling would change nothing.
var ErrNothingToCancel = errors.New("nothing to cancel")

// ErrIdempotencyConflict is returned when an idempotency key that is still
// live is used again for a request with a different hash.
var ErrIdempotencyConflict = errors.New("idempotency key reused with a different request")

// ErrUnavailable is wrapped into errors caused by the database being
// unreachable: refused, timed-out or broken connections, a server shutting
// down, a DB that was closed.
var ErrUnavailable = errors.New("database unavailable")

// Recipient statuses. The first four are waiting or in flight; the last five
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
	// StatusSuppressed was never sent: its address was on the project's
	// suppression list when the message was accepted.
	StatusSuppressed = "suppressed"
)

// MessagePartiallyDelivered is the message status when its recipients are
// all final, not all alike, and at least one was delivered.
const MessagePartiallyDelivered = "partially_delivered"

// DB is the Posthaste database: the statements Posthaste runs, bound to the
// executor they run on. The DB returned by Open runs each method on the
// connection pool and is safe for concurrent use; the DB that InTx hands to
// its function runs them in one transaction and belongs to that function.
type DB struct {
	// pool is what statements run on: the connection pool, or the
	// transaction this DB is bound to.
	pool executor
	// root is the connection pool itself, for what a transaction cannot
	// do: open a connection of its own, ping, close.
	root *pgxpool.Pool
	// tx is the transaction this DB is bound to; nil on the pool.
	tx pgx.Tx
}

// Querier is what a statement runs on: the pool, or a transaction begun on it.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// executor is a Querier that can begin a transaction: on the pool a real
// one, on a transaction a savepoint.
type executor interface {
	Querier
	Begin(ctx context.Context) (pgx.Tx, error)
}

var (
	_ executor = (*pgxpool.Pool)(nil)
	_ executor = (pgx.Tx)(nil)
)

// DefaultConnectTimeout bounds each attempt to open a connection when the
// connection string sets no connect_timeout. Without a bound, a database
// host that drops packets would hold every caller until the operating
// system gives up on TCP, minutes later, instead of answering Unavailable.
const DefaultConnectTimeout = 10 * time.Second

// OpenOption changes how Open sets up the pool.
type OpenOption func(*pgxpool.Config)

// WithMaxConns sizes the pool: at most n connections at once. Without it
// the pool takes pool_max_conns from the URL, else pgxpool's default (the
// larger of 4 and the number of CPUs). n < 1 changes nothing.
func WithMaxConns(n int) OpenOption {
	return func(cfg *pgxpool.Config) {
		if n >= 1 {
			cfg.MaxConns = int32(min(n, math.MaxInt32))
		}
	}
}

// Open connects a pool to the database at url (a postgres:// URL or a
// keyword/value string) and checks that the server answers. A url without
// connect_timeout (or with 0) gets DefaultConnectTimeout.
func Open(ctx context.Context, url string, opts ...OpenOption) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	for _, opt := range opts {
		opt(cfg)
	}
	boundConnect(cfg.ConnConfig)
	fastUUIDs(cfg)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", mapError(err))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("ping database: %w", mapError(err))
	}
	return &DB{pool: pool, root: pool}, nil
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
	if err := d.root.Ping(ctx); err != nil {
		return fmt.Errorf("ping database: %w", mapError(err))
	}
	return nil
}

// Close closes every connection of the pool, waiting for the ones in use to
// be given back. On a DB bound to a transaction it does nothing: the pool
// belongs to the DB that Open returned, and closing it from inside one of
// its transactions would wait for that transaction forever.
func (d *DB) Close() {
	if d.tx != nil {
		return
	}
	d.root.Close()
}

// InTx runs fn with a DB bound to one transaction and commits when fn
// returns nil; when fn returns an error or panics, everything fn did is
// rolled back and fn's error is returned as it is. The tx DB runs every
// method of DB in that transaction, so several changes commit together or
// not at all. It must not be used after fn returns, nor by several
// goroutines at once: a transaction is one connection.
//
// On a DB that is already bound to a transaction, InTx opens a savepoint:
// fn's work is still committed only with the outer transaction, but an
// error in fn undoes just fn's work, and the caller may handle the error and
// go on with the outer transaction.
//
// The transaction is READ COMMITTED, which the status recomputation relies
// on (see the package comment).
func (d *DB) InTx(ctx context.Context, fn func(tx *DB) error) error {
	tx, err := d.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin transaction: %w", mapError(err))
	}
	// Rollback after Commit is a no-op; after a panic or an error it undoes
	// fn's work, with a context of its own so that a canceled ctx still
	// gives the connection back clean.
	defer func() {
		rbCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = tx.Rollback(rbCtx)
	}()
	if err := fn(&DB{pool: tx, root: d.root, tx: tx}); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit transaction: %w", mapError(err))
	}
	return nil
}

// atomic runs fn so that its statements commit together: on the pool in a
// transaction of its own, on a transaction-bound DB in that transaction. No
// savepoint is needed there: a statement that fails aborts the caller's
// transaction anyway, and the methods' other errors (an idempotency
// conflict) come before anything was written.
func (d *DB) atomic(ctx context.Context, fn func(tx *DB) error) error {
	if d.tx != nil {
		return fn(d)
	}
	return d.InTx(ctx, fn)
}

// inTx runs fn in a transaction, committing when it returns nil; on a
// transaction-bound DB, in a savepoint.
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
