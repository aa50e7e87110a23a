package db

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/migrations"
)

// WithTracer installs t on every connection of the pool, so that each
// statement can be observed (internal/telemetry traces them). Defaults to
// no tracer.
func WithTracer(t pgx.QueryTracer) OpenOption {
	return func(cfg *pgxpool.Config) { cfg.ConnConfig.Tracer = t }
}

// PoolStat is a snapshot of the connection pool, for metrics.
func (d *DB) PoolStat() *pgxpool.Stat { return d.root.Stat() }

// QueueDepth counts the recipients waiting or in flight by status
// (scheduled, queued, sending, deferred) and says how long the oldest due
// one has waited past its next_attempt_at (0 when none is due). Both run
// on the partial indexes the claim and the rescuer use, so a scrape stays
// cheap with a large queue.
func (d *DB) QueueDepth(ctx context.Context, now time.Time) (map[string]int64, time.Duration, error) {
	rows, err := d.pool.Query(ctx, queueDepthSQL)
	if err != nil {
		return nil, 0, fmt.Errorf("queue depth: %w", mapError(err))
	}
	counts := map[string]int64{StatusScheduled: 0, StatusQueued: 0, StatusSending: 0, StatusDeferred: 0}
	for rows.Next() {
		var status string
		var n int64
		if err := rows.Scan(&status, &n); err != nil {
			rows.Close()
			return nil, 0, fmt.Errorf("queue depth: %w", mapError(err))
		}
		counts[status] = n
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("queue depth: %w", mapError(err))
	}
	var oldest *time.Time
	if err := d.pool.QueryRow(ctx, oldestDueSQL, now).Scan(&oldest); err != nil {
		return nil, 0, fmt.Errorf("oldest due recipient: %w", mapError(err))
	}
	var age time.Duration
	if oldest != nil {
		age = max(0, now.Sub(*oldest))
	}
	return counts, age, nil
}

// queueDepthSQL counts each state on a partial index that holds exactly
// its rows: waiting rows on the claim's two (first attempts, retries),
// sending rows on the rescuer's.
const queueDepthSQL = `
SELECT status, sum(n)::bigint FROM (
    SELECT status, count(*) AS n FROM recipients
    WHERE status IN ('scheduled', 'queued', 'deferred') AND attempts = 0
    GROUP BY status
    UNION ALL
    SELECT status, count(*) FROM recipients
    WHERE status IN ('scheduled', 'queued', 'deferred') AND attempts > 0
    GROUP BY status
    UNION ALL
    SELECT 'sending', count(*) FROM recipients
    WHERE status = 'sending'
) c
GROUP BY status`

// oldestDueSQL takes the oldest due row of each of the claim's two lists,
// each the first entry of its partial index.
const oldestDueSQL = `
SELECT least(
    (SELECT min(next_attempt_at) FROM recipients
     WHERE status IN ('queued', 'scheduled', 'deferred') AND attempts = 0 AND next_attempt_at <= $1),
    (SELECT min(next_attempt_at) FROM recipients
     WHERE status IN ('queued', 'scheduled', 'deferred') AND attempts > 0 AND next_attempt_at <= $1))`

// ErrMigrationsBehind is returned by CheckMigrations when the database's
// schema is older than the binary's migrations, as after a rollback.
var ErrMigrationsBehind = errors.New("database schema is behind the binary's migrations")

// CheckMigrations compares the highest migration applied to the database
// with the highest one embedded in the binary. It returns an error wrapping
// ErrMigrationsBehind, with both versions, when the database is behind: an
// instance serving on an older schema fails in ways that are hard to tell
// apart from bugs. A database ahead of the binary (a newer instance migrated
// it during a rolling upgrade) is fine: migrations only add.
func (d *DB) CheckMigrations(ctx context.Context) error {
	want, err := EmbeddedMigrationVersion()
	if err != nil {
		return err
	}
	var have *int64
	if err := d.pool.QueryRow(ctx, appliedVersionSQL).Scan(&have); err != nil {
		return fmt.Errorf("read applied migration version: %w", mapError(err))
	}
	if have == nil || *have < want {
		got := int64(0)
		if have != nil {
			got = *have
		}
		return fmt.Errorf("%w: applied version %d, binary has %d", ErrMigrationsBehind, got, want)
	}
	return nil
}

// appliedVersionSQL reads goose's table the way goose does: the latest row
// per version says whether it is applied, and a rolled-back migration
// leaves no applied row behind.
const appliedVersionSQL = `SELECT max(version_id) FROM goose_db_version WHERE is_applied AND version_id > 0`

// EmbeddedMigrationVersion is the number of the newest migration embedded
// in the binary.
func EmbeddedMigrationVersion() (int64, error) {
	names, err := fs.Glob(migrations.FS, "*.sql")
	if err != nil {
		return 0, fmt.Errorf("list migrations: %w", err)
	}
	var newest int64
	for _, name := range names {
		num, _, ok := strings.Cut(name, "_")
		if !ok {
			continue
		}
		v, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			continue
		}
		newest = max(newest, v)
	}
	if newest == 0 {
		return 0, errors.New("list migrations: none embedded")
	}
	return newest, nil
}
