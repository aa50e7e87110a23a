package db

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// renewLeasesSQL extends, in one statement, every lease still held by one of
// the owners. Rows whose lease was taken over (rescued, claimed again) no
// longer carry the owner and are left alone: renewal never revives a lost
// lease.
//
// $1 owners, $2 lease length in microseconds, $3 now or NULL.
const renewLeasesSQL = `
UPDATE recipients
SET lease_until = coalesce($3::timestamptz, now()) + $2::bigint * interval '1 microsecond'
WHERE status = 'sending' AND lease_owner = ANY($1::text[])`

// RenewLeases extends the leases the given owners hold to now (zero means the
// database's clock) plus leaseFor, and returns how many recipients it
// renewed. It is the heartbeat of a live dispatcher: a process that stops
// calling it loses its recipients to the rescuer within one lease.
func (d *DB) RenewLeases(ctx context.Context, owners []string, leaseFor time.Duration, now time.Time) (int64, error) {
	if len(owners) == 0 {
		return 0, nil
	}
	if leaseFor <= 0 {
		return 0, errors.New("renew leases: leaseFor must be positive")
	}
	tag, err := d.pool.Exec(ctx, renewLeasesSQL, owners, leaseFor.Microseconds(), nowParam(now))
	if err != nil {
		return 0, fmt.Errorf("renew leases: %w", mapError(err))
	}
	return tag.RowsAffected(), nil
}
