package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// renewLeasesSQL extends, in one statement, every lease still held by one of
// the owners, and counts the rows renewed per owner. Rows whose lease was
// taken over (rescued, claimed again) no longer carry the owner and are left
// alone: renewal never revives a lost lease. An owner missing from the result
// holds nothing any more.
//
// $1 owners, $2 lease length in microseconds, $3 now or NULL.
const renewLeasesSQL = `
WITH upd AS (
    UPDATE recipients
    SET lease_until = coalesce($3::timestamptz, now()) + $2::bigint * interval '1 microsecond'
    WHERE status = 'sending' AND lease_owner = ANY($1::text[])
    RETURNING lease_owner
)
SELECT lease_owner, count(*) FROM upd GROUP BY lease_owner`

// RenewLeases extends the leases the given owners hold to now (zero means the
// database's clock) plus leaseFor, and returns how many recipients it renewed
// for each owner that still holds any; owners that hold none are left out. It
// is the heartbeat of a live dispatcher: a process that stops calling it
// loses its recipients to the rescuer within one lease.
func (d *DB) RenewLeases(ctx context.Context, owners []string, leaseFor time.Duration, now time.Time) (map[string]int, error) {
	if len(owners) == 0 {
		return map[string]int{}, nil
	}
	if leaseFor <= 0 {
		return nil, errors.New("renew leases: leaseFor must be positive")
	}
	rows, _ := d.pool.Query(ctx, renewLeasesSQL, owners, leaseFor.Microseconds(), nowParam(now))
	held := make(map[string]int, len(owners))
	var owner string
	var n int
	_, err := pgx.ForEachRow(rows, []any{&owner, &n}, func() error {
		held[owner] = n
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("renew leases of %d owners: %w", len(owners), mapError(err))
	}
	return held, nil
}
