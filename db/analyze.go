package db

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// analyzeLockClass is the first key of the transaction advisory locks under
// which one instance at a time analyzes a table; the second is the table's
// name hashed, so instances skip only the table another one is analyzing.
const analyzeLockClass int32 = 0x616e6c7a // "anlz"

// staleTablesSQL finds the tables every message writes whose statistics are
// missing or old: changed rows since the last ANALYZE of at least $1, and
// of at least the fraction $2 of the rows the statistics counted (reltuples
// is -1 before the first ANALYZE, so then $1 alone decides). It leaves a
// table to autovacuum unless autovacuum cannot be counted on for it: the
// table was never analyzed (a fresh install, before autovacuum's first
// visit), autovacuum is off (for the server or the table), or its last
// ANALYZE is older than three of autovacuum's rounds.
//
// $1 minimum changed rows, $2 fraction.
const staleTablesSQL = `
SELECT s.relname
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname = current_schema()
  AND s.relname IN ('messages', 'recipients', 'attempts', 'events')
  AND s.n_mod_since_analyze >= greatest($1::bigint, $2::float8 * c.reltuples)
  AND (greatest(s.last_analyze, s.last_autoanalyze) IS NULL
       OR NOT current_setting('autovacuum')::boolean
       OR coalesce(c.reloptions, '{}') @> ARRAY['autovacuum_enabled=false']
       OR greatest(s.last_analyze, s.last_autoanalyze)
          < now() - 3 * current_setting('autovacuum_naptime')::interval)
ORDER BY s.relname`

// AnalyzeStale runs ANALYZE on each of the tables every message writes
// (messages, recipients, attempts, events) whose statistics are missing or
// stale: at least minChanged rows inserted, updated or deleted since its
// last ANALYZE, and at least fraction of the rows counted then, where
// autovacuum cannot be counted on to analyze it (see staleTablesSQL). It
// returns the tables it analyzed. A table another instance is analyzing,
// or autovacuum is working on, is skipped.
//
// Why: PostgreSQL keeps the plan of a prepared statement that it made
// without the parameters' values (a generic plan) until the statistics of
// its tables change. A plan made while a table was new and small scans it
// whole, which stays cheap only while the table stays small. Autovacuum's
// ANALYZE replaces such plans, but it first comes round up to a minute
// (autovacuum_naptime) after a fresh install has begun taking mail, and
// never on a server that runs with autovacuum off. Between the two, the
// claim and the outcome statements grew slower with every message.
func (d *DB) AnalyzeStale(ctx context.Context, minChanged int64, fraction float64) ([]string, error) {
	rows, _ := d.pool.Query(ctx, staleTablesSQL, minChanged, fraction)
	stale, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("find tables with stale statistics: %w", mapError(err))
	}
	var analyzed []string
	for _, table := range stale {
		done := false
		err := d.inTx(ctx, func(tx pgx.Tx) error {
			err := tx.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", analyzeLockClass, table).Scan(&done)
			if err != nil || !done {
				return err
			}
			// SKIP_LOCKED: a table autovacuum is working on is left for
			// the next check. A plain ANALYZE would wait for its lock and,
			// after deadlock_timeout, have PostgreSQL cancel the vacuum.
			_, err = tx.Exec(ctx, "ANALYZE (SKIP_LOCKED) "+pgx.Identifier{table}.Sanitize())
			return err
		})
		if err != nil {
			return analyzed, fmt.Errorf("analyze %s: %w", table, mapError(err))
		}
		if done {
			analyzed = append(analyzed, table)
		}
	}
	return analyzed, nil
}
