package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// ProjectLimits are a project's overrides of the configured rate limits.
// A nil field keeps the default; 0 is no limit.
type ProjectLimits struct {
	// RequestsPerSecond is the request rate of each of the project's keys
	// that has none of its own, per instance.
	RequestsPerSecond *int
	// RecipientsPerDay is the most recipients the project may send to per
	// UTC day, over every instance.
	RecipientsPerDay *int64
}

// addRecipientsSQL counts n more recipients for a project's day unless
// that would pass the limit, in one statement: the row is created on the
// first use of the day, and the WHERE of the conflict branch makes the
// check and the increment one atomic step, so concurrent calls on any
// instance can never push the count past the limit together. No row comes
// back when the limit would be passed.
//
// $1 project, $2 day, $3 n, $4 limit.
const addRecipientsSQL = `
INSERT INTO project_daily_usage AS u (project_id, day, recipients) VALUES ($1, $2, $3)
ON CONFLICT (project_id, day) DO UPDATE SET recipients = u.recipients + EXCLUDED.recipients
WHERE u.recipients + EXCLUDED.recipients <= $4
RETURNING recipients`

// refundRecipientsSQL takes back recipients counted for a send that was
// not stored after all.
//
// $1 project, $2 day, $3 n.
const refundRecipientsSQL = `
UPDATE project_daily_usage SET recipients = greatest(0, recipients - $3)
WHERE project_id = $1 AND day = $2`

const projectUsageSQL = `
SELECT recipients FROM project_daily_usage WHERE project_id = $1 AND day = $2`

const setProjectLimitsSQL = `
UPDATE projects SET requests_per_second = $2, recipients_per_day = $3 WHERE id = $1`

// ErrLimitExceeded is returned when counting would pass a limit; nothing
// was counted.
var ErrLimitExceeded = errors.New("limit exceeded")

// UsageDay is the UTC day t falls on, as the daily counters key it.
func UsageDay(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

// AddProjectRecipients counts n recipients for projectID on the UTC day
// of day, unless the day's count would pass limit: then nothing is counted
// and the error is ErrLimitExceeded. It returns the day's new count.
func (d *DB) AddProjectRecipients(ctx context.Context, projectID uuid.UUID, day time.Time, n int, limit int64) (int64, error) {
	if int64(n) > limit {
		return 0, fmt.Errorf("count %d recipients for project %s: %w", n, projectID, ErrLimitExceeded)
	}
	var total int64
	err := d.pool.QueryRow(ctx, addRecipientsSQL, projectOrDefault(projectID), UsageDay(day), n, limit).Scan(&total)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("count %d recipients for project %s: %w", n, projectID, ErrLimitExceeded)
	}
	if err != nil {
		return 0, fmt.Errorf("count %d recipients for project %s: %w", n, projectID, mapError(err))
	}
	return total, nil
}

// RefundProjectRecipients takes back n recipients counted on day's UTC
// day for a send that was not stored.
func (d *DB) RefundProjectRecipients(ctx context.Context, projectID uuid.UUID, day time.Time, n int) error {
	if _, err := d.pool.Exec(ctx, refundRecipientsSQL, projectOrDefault(projectID), UsageDay(day), n); err != nil {
		return fmt.Errorf("refund %d recipients for project %s: %w", n, projectID, mapError(err))
	}
	return nil
}

// ProjectRecipients returns the recipients counted for projectID on day's
// UTC day.
func (d *DB) ProjectRecipients(ctx context.Context, projectID uuid.UUID, day time.Time) (int64, error) {
	var n int64
	err := d.pool.QueryRow(ctx, projectUsageSQL, projectOrDefault(projectID), UsageDay(day)).Scan(&n)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read recipients of project %s: %w", projectID, mapError(err))
	}
	return n, nil
}

// SetProjectLimits stores a project's overrides of the rate limits. An
// unknown project is ErrNotFound.
func (d *DB) SetProjectLimits(ctx context.Context, projectID uuid.UUID, l ProjectLimits) error {
	if l.RequestsPerSecond != nil && *l.RequestsPerSecond < 0 || l.RecipientsPerDay != nil && *l.RecipientsPerDay < 0 {
		return fmt.Errorf("set limits of project %s: limits must not be negative", projectID)
	}
	tag, err := d.pool.Exec(ctx, setProjectLimitsSQL, projectOrDefault(projectID), l.RequestsPerSecond, l.RecipientsPerDay)
	if err != nil {
		return fmt.Errorf("set limits of project %s: %w", projectID, mapError(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("set limits of project %s: %w", projectID, ErrNotFound)
	}
	return nil
}
