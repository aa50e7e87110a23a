package db

import (
	"context"
	"fmt"
)

// walPositionSQL is the server's current write-ahead log position as a byte
// offset.
const walPositionSQL = `SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint`

// WALPosition returns the server's current write-ahead log position in
// bytes. The difference between two positions is the WAL written between
// them, by every database of the server: benchmarks divide it by the work
// done to compare the write cost of changes.
func (d *DB) WALPosition(ctx context.Context) (int64, error) {
	var pos int64
	if err := d.pool.QueryRow(ctx, walPositionSQL).Scan(&pos); err != nil {
		return 0, fmt.Errorf("wal position: %w", mapError(err))
	}
	return pos, nil
}
