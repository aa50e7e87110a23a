package db

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Webhook delivery states. Pending and sending are unfinished; delivered
// and failed are final until a retry is asked for.
const (
	// WebhookPending waits for its next attempt.
	WebhookPending = "pending"
	// WebhookSending is leased by a sender that is posting it.
	WebhookSending = "sending"
	// WebhookDelivered was answered with a 2xx.
	WebhookDelivered = "delivered"
	// WebhookFailed was given up after the last scheduled attempt.
	WebhookFailed = "failed"
)

// EventEndpointDisabled is the webhook event type sent to a project's
// other endpoints when one of its endpoints was disabled for failing too
// long. It is not in the message event feed: it is about an endpoint.
const EventEndpointDisabled EventType = "endpoint.disabled"

// WebhookEventTypes lists every event type an endpoint can subscribe to:
// the message events and endpoint.disabled.
func WebhookEventTypes() []EventType {
	return append(slices.Clone(EventTypes), EventEndpointDisabled)
}

// WebhookEndpoint is a URL of a project that receives its events.
type WebhookEndpoint struct {
	ID        uuid.UUID
	ProjectID uuid.UUID
	URL       string
	// Description is a label for people.
	Description string
	// EventTypes are the event types sent; empty means all.
	EventTypes []string
	// Enabled endpoints get new events and have their deliveries sent.
	Enabled bool
	// Secret signs every request ("whsec_" and base64).
	Secret string
	// PreviousSecret signs alongside Secret until PreviousSecretExpiresAt;
	// empty when there is none.
	PreviousSecret          string
	PreviousSecretExpiresAt *time.Time
	// ConsecutiveFailures counts the failed attempts since the last
	// success, and FailingSince is when the first of them was made.
	ConsecutiveFailures int
	FailingSince        *time.Time
	// DisabledAt and DisabledReason record the last time the endpoint was
	// disabled for failing; cleared when it is enabled again.
	DisabledAt     *time.Time
	DisabledReason string
	CreatedAt      time.Time
	UpdatedAt      time.Time
}

// NewWebhookEndpointParams is an endpoint to store. The caller validates
// the URL and the event types and makes the secret.
type NewWebhookEndpointParams struct {
	ProjectID   uuid.UUID
	URL         string
	Description string
	EventTypes  []string
	Enabled     bool
	Secret      string
}

// UpdateWebhookEndpointParams changes the fields that are set (non-nil).
type UpdateWebhookEndpointParams struct {
	ProjectID   uuid.UUID
	ID          uuid.UUID
	URL         *string
	Description *string
	EventTypes  *[]string
	// Enabled true on a disabled endpoint enables it and starts a new run
	// of failures from zero, clearing DisabledAt and DisabledReason.
	Enabled *bool
}

const webhookEndpointColumns = `w.id, w.project_id, w.url, w.description, w.event_types, w.enabled, w.secret,
    coalesce(w.previous_secret, ''), w.previous_secret_expires_at, w.consecutive_failures, w.failing_since,
    w.disabled_at, w.disabled_reason, w.created_at, w.updated_at`

const (
	createWebhookEndpointSQL = `
INSERT INTO webhook_endpoints AS w (id, project_id, url, description, event_types, enabled, secret)
VALUES (@id, @project_id, @url, @description, @event_types, @enabled, @secret)
RETURNING ` + webhookEndpointColumns

	getWebhookEndpointSQL = `
SELECT ` + webhookEndpointColumns + ` FROM webhook_endpoints w WHERE w.id = $1 AND w.project_id = $2`

	listWebhookEndpointsSQL = `
SELECT ` + webhookEndpointColumns + ` FROM webhook_endpoints w WHERE w.project_id = $1 ORDER BY w.created_at, w.id`

	// Enabling a disabled endpoint starts afresh: the failures before were
	// why it was off, and counting them on would disable it again at the
	// first failure.
	updateWebhookEndpointSQL = `
UPDATE webhook_endpoints w SET
    url = coalesce(@url, w.url),
    description = coalesce(@description, w.description),
    event_types = CASE WHEN @set_event_types::boolean THEN @event_types::text[] ELSE w.event_types END,
    enabled = coalesce(@enabled::boolean, w.enabled),
    consecutive_failures = CASE WHEN @enabled::boolean AND NOT w.enabled THEN 0 ELSE w.consecutive_failures END,
    failing_since = CASE WHEN @enabled::boolean AND NOT w.enabled THEN NULL ELSE w.failing_since END,
    disabled_at = CASE WHEN @enabled::boolean THEN NULL ELSE w.disabled_at END,
    disabled_reason = CASE WHEN @enabled::boolean THEN '' ELSE w.disabled_reason END,
    updated_at = now()
WHERE w.id = @id AND w.project_id = @project_id
RETURNING ` + webhookEndpointColumns

	// Deliveries go with the endpoint (ON DELETE CASCADE).
	deleteWebhookEndpointSQL = `DELETE FROM webhook_endpoints WHERE id = $1 AND project_id = $2`

	// The old secret keeps signing until the grace period ends. Rotating
	// twice within it drops the oldest secret: only two ever sign.
	rotateWebhookSecretSQL = `
UPDATE webhook_endpoints w SET
    previous_secret = w.secret,
    previous_secret_expires_at = now() + @grace_us::bigint * interval '1 microsecond',
    secret = @secret,
    updated_at = now()
WHERE w.id = @id AND w.project_id = @project_id
RETURNING ` + webhookEndpointColumns
)

func scanWebhookEndpoint(row pgx.CollectableRow) (WebhookEndpoint, error) {
	var w WebhookEndpoint
	err := row.Scan(&w.ID, &w.ProjectID, &w.URL, &w.Description, &w.EventTypes, &w.Enabled, &w.Secret,
		&w.PreviousSecret, &w.PreviousSecretExpiresAt, &w.ConsecutiveFailures, &w.FailingSince,
		&w.DisabledAt, &w.DisabledReason, &w.CreatedAt, &w.UpdatedAt)
	if w.EventTypes == nil {
		w.EventTypes = []string{}
	}
	return w, err
}

// CreateWebhookEndpoint stores an endpoint. An unknown project is
// ErrNotFound.
func (d *DB) CreateWebhookEndpoint(ctx context.Context, p NewWebhookEndpointParams) (WebhookEndpoint, error) {
	if p.ProjectID == uuid.Nil {
		return WebhookEndpoint{}, errors.New("create webhook endpoint: project is required")
	}
	id, err := uuid.NewV7()
	if err != nil {
		return WebhookEndpoint{}, fmt.Errorf("create webhook endpoint: new id: %w", err)
	}
	types := p.EventTypes
	if types == nil {
		types = []string{}
	}
	rows, _ := d.pool.Query(ctx, createWebhookEndpointSQL, pgx.NamedArgs{
		"id": id, "project_id": p.ProjectID, "url": p.URL, "description": p.Description,
		"event_types": types, "enabled": p.Enabled, "secret": p.Secret,
	})
	w, err := pgx.CollectExactlyOneRow(rows, scanWebhookEndpoint)
	if err != nil {
		if isForeignKeyViolation(err) {
			return WebhookEndpoint{}, fmt.Errorf("create webhook endpoint: project %s: %w", p.ProjectID, ErrNotFound)
		}
		return WebhookEndpoint{}, fmt.Errorf("create webhook endpoint: %w", mapError(err))
	}
	return w, nil
}

// GetWebhookEndpoint returns an endpoint of a project; another project's
// endpoint is ErrNotFound, like an unknown id.
func (d *DB) GetWebhookEndpoint(ctx context.Context, projectID, id uuid.UUID) (WebhookEndpoint, error) {
	rows, _ := d.pool.Query(ctx, getWebhookEndpointSQL, id, projectID)
	w, err := pgx.CollectExactlyOneRow(rows, scanWebhookEndpoint)
	if err != nil {
		return WebhookEndpoint{}, fmt.Errorf("webhook endpoint %s: %w", id, mapError(err))
	}
	return w, nil
}

// ListWebhookEndpoints returns every endpoint of a project, oldest first.
func (d *DB) ListWebhookEndpoints(ctx context.Context, projectID uuid.UUID) ([]WebhookEndpoint, error) {
	rows, _ := d.pool.Query(ctx, listWebhookEndpointsSQL, projectID)
	ws, err := pgx.CollectRows(rows, scanWebhookEndpoint)
	if err != nil {
		return nil, fmt.Errorf("list webhook endpoints: %w", mapError(err))
	}
	return ws, nil
}

// UpdateWebhookEndpoint changes the fields p sets and returns the endpoint
// as it then stands, or ErrNotFound.
func (d *DB) UpdateWebhookEndpoint(ctx context.Context, p UpdateWebhookEndpointParams) (WebhookEndpoint, error) {
	args := pgx.NamedArgs{
		"id": p.ID, "project_id": p.ProjectID, "url": p.URL, "description": p.Description,
		"enabled": p.Enabled, "set_event_types": p.EventTypes != nil, "event_types": []string{},
	}
	if p.EventTypes != nil && *p.EventTypes != nil {
		args["event_types"] = *p.EventTypes
	}
	rows, _ := d.pool.Query(ctx, updateWebhookEndpointSQL, args)
	w, err := pgx.CollectExactlyOneRow(rows, scanWebhookEndpoint)
	if err != nil {
		return WebhookEndpoint{}, fmt.Errorf("update webhook endpoint %s: %w", p.ID, mapError(err))
	}
	return w, nil
}

// DeleteWebhookEndpoint deletes an endpoint and its deliveries, or returns
// ErrNotFound.
func (d *DB) DeleteWebhookEndpoint(ctx context.Context, projectID, id uuid.UUID) error {
	tag, err := d.pool.Exec(ctx, deleteWebhookEndpointSQL, id, projectID)
	if err != nil {
		return fmt.Errorf("delete webhook endpoint %s: %w", id, mapError(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("delete webhook endpoint %s: %w", id, ErrNotFound)
	}
	return nil
}

// RotateWebhookSecret makes secret the endpoint's signing secret; the
// current one keeps signing alongside it for grace. Unknown is ErrNotFound.
func (d *DB) RotateWebhookSecret(ctx context.Context, projectID, id uuid.UUID, secret string, grace time.Duration) (WebhookEndpoint, error) {
	rows, _ := d.pool.Query(ctx, rotateWebhookSecretSQL, pgx.NamedArgs{
		"id": id, "project_id": projectID, "secret": secret, "grace_us": grace.Microseconds(),
	})
	w, err := pgx.CollectExactlyOneRow(rows, scanWebhookEndpoint)
	if err != nil {
		return WebhookEndpoint{}, fmt.Errorf("rotate webhook secret of %s: %w", id, mapError(err))
	}
	return w, nil
}

// The fan-out. The cursor row is locked for the whole transaction that
// reads the events after it, writes their deliveries and moves it: another
// instance's fan-out waits on the lock and then reads the moved cursor, so
// each event is fanned out once, and a crash before the commit leaves both
// the cursor and the deliveries as they were.
const (
	lockFanOutCursorSQL = `SELECT txid, event_id FROM webhook_fanout_cursor FOR UPDATE`

	moveFanOutCursorSQL = `UPDATE webhook_fanout_cursor SET txid = $1::xid8, event_id = $2, updated_at = now()`

	// One delivery per event and matching endpoint. The endpoint must be
	// enabled and exist when the event was written: a new endpoint gets
	// events from its creation on, not a backlog the fan-out had yet to
	// read. The body is built here once, so every attempt sends the same
	// bytes; created_at is RFC 3339 in UTC. ON CONFLICT makes a second
	// fan-out of an event harmless should one ever happen.
	fanOutWebhooksSQL = `
INSERT INTO webhook_deliveries (id, endpoint_id, project_id, event_id, event_type, event_txid, event_seq, message_id, body)
SELECT gen_random_uuid(), w.id, e.project_id, e.id::text, e.type, e.txid, e.id, e.message_id,
    jsonb_build_object(
        'id', e.id::text,
        'type', e.type,
        'created_at', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', jsonb_strip_nulls(jsonb_build_object(
            'message_id', e.message_id,
            'recipient_id', e.recipient_id,
            'recipient', r.address,
            'tags', m.tags,
            'metadata', m.metadata)) || e.details
    )::text
FROM events e
JOIN webhook_endpoints w ON w.project_id = e.project_id
    AND w.enabled
    AND (cardinality(w.event_types) = 0 OR e.type = ANY (w.event_types))
    AND w.created_at <= e.created_at
JOIN messages m ON m.id = e.message_id
LEFT JOIN recipients r ON r.id = e.recipient_id
WHERE e.id = ANY (@event_ids::bigint[])
ORDER BY e.txid, e.id, w.id
ON CONFLICT (endpoint_id, event_id) DO NOTHING`
)

// FanOutResult says what one FanOutWebhooks call did.
type FanOutResult struct {
	// Events is how many events were read from the feed.
	Events int
	// Deliveries is how many deliveries were created for them.
	Deliveries int
}

// FanOutWebhooks reads up to limit events after the stored fan-out cursor,
// creates one delivery per event and matching enabled endpoint, and moves
// the cursor past them, all in one transaction. Instances take turns on the
// cursor's row lock, so an event is fanned out exactly once whatever
// crashes or restarts in between. Events fewer than limit means the feed
// was read to its end.
func (d *DB) FanOutWebhooks(ctx context.Context, limit int) (FanOutResult, error) {
	var res FanOutResult
	err := d.InTx(ctx, func(tx *DB) error {
		var after EventCursor
		if err := tx.pool.QueryRow(ctx, lockFanOutCursorSQL).Scan(&after.txid, &after.id); err != nil {
			return fmt.Errorf("lock cursor: %w", mapError(err))
		}
		events, next, err := tx.ReadEvents(ctx, ReadEventsParams{After: after, Limit: limit})
		if err != nil {
			return err
		}
		res.Events = len(events)
		if len(events) == 0 {
			return nil
		}
		ids := make([]int64, len(events))
		for i, e := range events {
			ids[i] = e.ID
		}
		tag, err := tx.pool.Exec(ctx, fanOutWebhooksSQL, pgx.NamedArgs{"event_ids": ids})
		if err != nil {
			return fmt.Errorf("insert deliveries: %w", mapError(err))
		}
		res.Deliveries = int(tag.RowsAffected())
		if _, err := tx.pool.Exec(ctx, moveFanOutCursorSQL, next.txid, next.id); err != nil {
			return fmt.Errorf("move cursor: %w", mapError(err))
		}
		return nil
	})
	if err != nil {
		return FanOutResult{}, fmt.Errorf("fan out webhooks: %w", err)
	}
	return res, nil
}

// WebhookDelivery is one event to send to one endpoint, and how its
// sending went.
type WebhookDelivery struct {
	ID         uuid.UUID
	EndpointID uuid.UUID
	ProjectID  uuid.UUID
	// EventID is the id sent as webhook-id and in the body.
	EventID   string
	EventType string
	// MessageID is the event's message; uuid.Nil for endpoint events.
	MessageID uuid.UUID
	State     string
	// Attempts counts the attempts made (since the last manual retry).
	Attempts      int
	NextAttemptAt time.Time
	// The last attempt: when, the HTTP status (0 when no response came),
	// how long it took and what went wrong (empty on success).
	LastAttemptAt  *time.Time
	LastStatusCode int
	LastLatency    time.Duration
	LastError      string
	CreatedAt      time.Time
}

const webhookDeliveryColumns = `d.id, d.endpoint_id, d.project_id, d.event_id, d.event_type, d.message_id, d.state,
    d.attempts, d.next_attempt_at, d.last_attempt_at, coalesce(d.last_status_code, 0), coalesce(d.last_latency_ms, 0),
    d.last_error, d.created_at`

func scanWebhookDelivery(row pgx.CollectableRow) (WebhookDelivery, error) {
	var (
		w         WebhookDelivery
		messageID *uuid.UUID
		latencyMS int64
	)
	err := row.Scan(&w.ID, &w.EndpointID, &w.ProjectID, &w.EventID, &w.EventType, &messageID, &w.State,
		&w.Attempts, &w.NextAttemptAt, &w.LastAttemptAt, &w.LastStatusCode, &latencyMS,
		&w.LastError, &w.CreatedAt)
	if messageID != nil {
		w.MessageID = *messageID
	}
	w.LastLatency = time.Duration(latencyMS) * time.Millisecond
	return w, err
}

// WebhookJob is a claimed delivery with what sending it needs.
type WebhookJob struct {
	WebhookDelivery
	// LeaseOwner is the claim's owner, for RecordWebhookAttempt.
	LeaseOwner string
	URL        string
	// Secrets sign the request, the current one first; two during a
	// rotation's grace period.
	Secrets []string
	// Body is the exact JSON to post.
	Body []byte
}

// ClaimWebhooksParams says how many deliveries to claim and for how long.
type ClaimWebhooksParams struct {
	// Owner names this claim in the lease; unique per call.
	Owner string
	Limit int
	// LeaseFor is how long the rows stay leased before RescueWebhooks may
	// take them back.
	LeaseFor time.Duration
	// Now is the time the claim runs at; zero means the database's clock.
	Now time.Time
}

// claimWebhooksSQL leases due deliveries of enabled endpoints, oldest due
// first. A delivery whose message has an earlier event still unfinished
// (pending or sending) for the same endpoint is held back, so one message's
// events reach an endpoint in feed order: event N+1 goes only once event N
// was delivered or finally failed. Deliveries of a disabled endpoint wait
// until it is enabled again.
const claimWebhooksSQL = `
WITH picked AS (
    SELECT d.id FROM webhook_deliveries d
    JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.enabled
    WHERE d.state = 'pending' AND d.next_attempt_at <= coalesce(@now, now())
      AND NOT EXISTS (
          SELECT 1 FROM webhook_deliveries p
          WHERE d.message_id IS NOT NULL
            AND p.endpoint_id = d.endpoint_id AND p.message_id = d.message_id
            AND p.state IN ('pending', 'sending')
            AND (p.event_txid, p.event_seq) < (d.event_txid, d.event_seq))
    ORDER BY d.next_attempt_at, d.event_txid, d.event_seq
    LIMIT @limit
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d SET
    state = 'sending',
    lease_owner = @owner,
    lease_until = coalesce(@now, now()) + @lease_us::bigint * interval '1 microsecond',
    attempts = d.attempts + 1
FROM picked, webhook_endpoints w
WHERE d.id = picked.id AND w.id = d.endpoint_id
RETURNING ` + webhookDeliveryColumns + `, d.body, w.url, w.secret,
    CASE WHEN w.previous_secret_expires_at > coalesce(@now, now()) THEN w.previous_secret ELSE '' END`

// ClaimWebhooks leases up to p.Limit due deliveries for p.Owner. Each
// claim counts as an attempt.
func (d *DB) ClaimWebhooks(ctx context.Context, p ClaimWebhooksParams) ([]WebhookJob, error) {
	if p.Owner == "" || p.Limit <= 0 || p.LeaseFor <= 0 {
		return nil, errors.New("claim webhooks: owner, limit and lease are required")
	}
	rows, _ := d.pool.Query(ctx, claimWebhooksSQL, pgx.NamedArgs{
		"owner": p.Owner, "limit": p.Limit, "lease_us": p.LeaseFor.Microseconds(), "now": nowParam(p.Now),
	})
	jobs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (WebhookJob, error) {
		var (
			j         WebhookJob
			messageID *uuid.UUID
			latencyMS int64
			body      string
			secret    string
			previous  string
		)
		err := row.Scan(&j.ID, &j.EndpointID, &j.ProjectID, &j.EventID, &j.EventType, &messageID, &j.State,
			&j.Attempts, &j.NextAttemptAt, &j.LastAttemptAt, &j.LastStatusCode, &latencyMS,
			&j.LastError, &j.CreatedAt, &body, &j.URL, &secret, &previous)
		if messageID != nil {
			j.MessageID = *messageID
		}
		j.LastLatency = time.Duration(latencyMS) * time.Millisecond
		j.Body = []byte(body)
		j.Secrets = []string{secret}
		if previous != "" {
			j.Secrets = append(j.Secrets, previous)
		}
		j.LeaseOwner = p.Owner
		return j, err
	})
	if err != nil {
		return nil, fmt.Errorf("claim webhooks: %w", mapError(err))
	}
	return jobs, nil
}

// WebhookAttempt is the outcome of one attempt of a claimed delivery.
type WebhookAttempt struct {
	ID         uuid.UUID
	LeaseOwner string
	// Delivered: the endpoint answered 2xx.
	Delivered bool
	// NextAttemptAt is when to try again after a failure; zero means the
	// delivery has failed for good.
	NextAttemptAt time.Time
	// At is when the attempt was made; zero means the database's clock.
	At         time.Time
	StatusCode int
	Latency    time.Duration
	Error      string
	// An endpoint is disabled when this attempt failed and its run of
	// failures, including this one, began at least DisableAfter ago, or
	// counts at least DisableAfterFailures; zero leaves that rule out.
	DisableAfter         time.Duration
	DisableAfterFailures int
}

// WebhookAttemptResult says what RecordWebhookAttempt did.
type WebhookAttemptResult struct {
	// Recorded is false when the lease was lost (the delivery was rescued
	// or deleted): nothing was written.
	Recorded bool
	// Disabled is set when this failure disabled the endpoint.
	Disabled bool
}

const (
	// Outcomes are fenced on the lease owner, like recipients' (see
	// docs/architecture.md): a sender that lost its lease writes nothing.
	// A success ends the endpoint's run of failures; the endpoint row is
	// only written when there was one, so a healthy endpoint costs no
	// write per delivery.
	recordWebhookSuccessSQL = `
WITH d AS (
    UPDATE webhook_deliveries SET
        state = 'delivered', lease_owner = NULL, lease_until = NULL,
        last_attempt_at = coalesce(@at, now()), last_status_code = @status_code,
        last_latency_ms = @latency_ms, last_error = ''
    WHERE id = @id AND lease_owner = @owner AND state = 'sending'
    RETURNING endpoint_id
), ep AS (
    UPDATE webhook_endpoints w SET consecutive_failures = 0, failing_since = NULL
    FROM d
    WHERE w.id = d.endpoint_id AND (w.consecutive_failures <> 0 OR w.failing_since IS NOT NULL)
)
SELECT count(*) FROM d`

	// A failure adds to the endpoint's run of failures and returns it, for
	// the disabling rule. The endpoint's row lock orders concurrent
	// failures of one endpoint.
	recordWebhookFailureSQL = `
WITH d AS (
    UPDATE webhook_deliveries SET
        state = CASE WHEN @next::timestamptz IS NULL THEN 'failed' ELSE 'pending' END,
        next_attempt_at = coalesce(@next::timestamptz, next_attempt_at),
        lease_owner = NULL, lease_until = NULL,
        last_attempt_at = coalesce(@at, now()), last_status_code = nullif(@status_code::integer, 0),
        last_latency_ms = @latency_ms, last_error = @error
    WHERE id = @id AND lease_owner = @owner AND state = 'sending'
    RETURNING endpoint_id
)
UPDATE webhook_endpoints w SET
    consecutive_failures = w.consecutive_failures + 1,
    failing_since = coalesce(w.failing_since, coalesce(@at, now()))
FROM d
WHERE w.id = d.endpoint_id
RETURNING w.id, w.project_id, w.url, w.enabled, w.consecutive_failures,
    w.failing_since <= coalesce(@at, now()) - @disable_after_us::bigint * interval '1 microsecond'`

	disableWebhookEndpointSQL = `
UPDATE webhook_endpoints SET enabled = false, disabled_at = coalesce(@at, now()), disabled_reason = @reason, updated_at = now()
WHERE id = @id AND enabled
RETURNING disabled_at`

	// endpoint.disabled goes to the project's other enabled endpoints that
	// take it; the disabled one is not asked. It has no message, so no
	// ordering applies to it.
	fanOutEndpointEventSQL = `
INSERT INTO webhook_deliveries (id, endpoint_id, project_id, event_id, event_type, event_txid, event_seq, message_id, body)
SELECT gen_random_uuid(), w.id, w.project_id, @event_id, @event_type, pg_current_xact_id(), 0, NULL, @body
FROM webhook_endpoints w
WHERE w.project_id = @project_id AND w.enabled AND w.id <> @endpoint_id
  AND (cardinality(w.event_types) = 0 OR @event_type = ANY (w.event_types))`
)

// RecordWebhookAttempt writes the outcome of an attempt, fenced on the
// lease, and keeps the endpoint's run of failures: a success ends it, a
// failure extends it and may disable the endpoint (see WebhookAttempt),
// which is recorded on the endpoint and sent as an endpoint.disabled event
// to the project's other endpoints, in the same transaction.
func (d *DB) RecordWebhookAttempt(ctx context.Context, a WebhookAttempt) (WebhookAttemptResult, error) {
	var res WebhookAttemptResult
	args := pgx.NamedArgs{
		"id": a.ID, "owner": a.LeaseOwner, "at": nowParam(a.At), "status_code": a.StatusCode,
		"latency_ms": a.Latency.Milliseconds(),
	}
	if a.Delivered {
		var n int
		if err := d.pool.QueryRow(ctx, recordWebhookSuccessSQL, args).Scan(&n); err != nil {
			return res, fmt.Errorf("record webhook delivery %s: %w", a.ID, mapError(err))
		}
		res.Recorded = n > 0
		return res, nil
	}
	args["next"] = nowParam(a.NextAttemptAt)
	args["error"] = a.Error
	args["disable_after_us"] = a.DisableAfter.Microseconds()
	err := d.atomic(ctx, func(tx *DB) error {
		var (
			endpointID, projectID uuid.UUID
			url                   string
			enabled, longEnough   bool
			failures              int
		)
		err := tx.pool.QueryRow(ctx, recordWebhookFailureSQL, args).Scan(&endpointID, &projectID, &url, &enabled, &failures, &longEnough)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return mapError(err)
		}
		res.Recorded = true
		var reason string
		switch {
		case !enabled:
		case a.DisableAfter > 0 && longEnough:
			reason = fmt.Sprintf("every attempt failed for %s (%d in a row)", a.DisableAfter, failures)
		case a.DisableAfterFailures > 0 && failures >= a.DisableAfterFailures:
			reason = fmt.Sprintf("%d attempts in a row failed", failures)
		}
		if reason == "" {
			return nil
		}
		if a.Error != "" {
			reason += "; last: " + a.Error
		}
		var disabledAt time.Time
		err = tx.pool.QueryRow(ctx, disableWebhookEndpointSQL, pgx.NamedArgs{"id": endpointID, "at": nowParam(a.At), "reason": reason}).Scan(&disabledAt)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // disabled meanwhile by someone else
		}
		if err != nil {
			return fmt.Errorf("disable endpoint: %w", mapError(err))
		}
		res.Disabled = true
		return tx.fanOutEndpointEvent(ctx, projectID, EventEndpointDisabled, disabledAt, map[string]any{
			"endpoint_id": endpointID, "url": url, "reason": reason,
		}, endpointID)
	})
	if err != nil {
		return res, fmt.Errorf("record webhook delivery %s: %w", a.ID, err)
	}
	return res, nil
}

// fanOutEndpointEvent creates deliveries of an event about an endpoint,
// which the message event feed does not carry.
func (d *DB) fanOutEndpointEvent(ctx context.Context, projectID uuid.UUID, typ EventType, at time.Time, data map[string]any, endpointID uuid.UUID) error {
	id, err := uuid.NewV7()
	if err != nil {
		return fmt.Errorf("new event id: %w", err)
	}
	body, err := json.Marshal(map[string]any{
		"id": "evt_" + id.String(), "type": typ, "created_at": at.UTC().Format(time.RFC3339Nano), "data": data,
	})
	if err != nil {
		return fmt.Errorf("encode %s event: %w", typ, err)
	}
	_, err = d.pool.Exec(ctx, fanOutEndpointEventSQL, pgx.NamedArgs{
		"event_id": "evt_" + id.String(), "event_type": string(typ), "body": string(body),
		"project_id": projectID, "endpoint_id": endpointID,
	})
	if err != nil {
		return fmt.Errorf("fan out %s event: %w", typ, mapError(err))
	}
	return nil
}

// rescueWebhooksSQL returns deliveries whose lease ran out (a crashed or
// frozen sender) to pending, due at once. The attempt they were claimed for
// still counts.
const rescueWebhooksSQL = `
UPDATE webhook_deliveries SET state = 'pending', lease_owner = NULL, lease_until = NULL
WHERE state = 'sending' AND lease_until < coalesce($1, now())`

// RescueWebhooks returns deliveries with an expired lease to pending and
// says how many there were.
func (d *DB) RescueWebhooks(ctx context.Context, now time.Time) (int, error) {
	tag, err := d.pool.Exec(ctx, rescueWebhooksSQL, nowParam(now))
	if err != nil {
		return 0, fmt.Errorf("rescue webhooks: %w", mapError(err))
	}
	return int(tag.RowsAffected()), nil
}

// WebhookDeliveryCursor is a position in an endpoint's delivery log.
type WebhookDeliveryCursor struct {
	CreatedAt time.Time
	ID        uuid.UUID
}

// ListWebhookDeliveriesParams selects one page of an endpoint's log.
type ListWebhookDeliveriesParams struct {
	ProjectID  uuid.UUID
	EndpointID uuid.UUID
	// State keeps deliveries in that state; empty keeps all.
	State string
	// Before continues after the last row of the previous page.
	Before *WebhookDeliveryCursor
	Limit  int
}

const listWebhookDeliveriesSQL = `
SELECT ` + webhookDeliveryColumns + ` FROM webhook_deliveries d
WHERE d.endpoint_id = @endpoint_id AND d.project_id = @project_id
  AND (@state::text = '' OR d.state = @state)
  AND (NOT @paged::boolean OR (d.created_at, d.id) < (@before_created_at::timestamptz, @before_id::uuid))
ORDER BY d.created_at DESC, d.id DESC
LIMIT @limit`

// ListWebhookDeliveries returns an endpoint's deliveries, newest first.
// The caller checks that the endpoint is the project's; another project's
// endpoint lists nothing.
func (d *DB) ListWebhookDeliveries(ctx context.Context, p ListWebhookDeliveriesParams) ([]WebhookDelivery, error) {
	args := pgx.NamedArgs{
		"endpoint_id": p.EndpointID, "project_id": p.ProjectID, "state": p.State, "limit": p.Limit,
		"paged": p.Before != nil, "before_created_at": time.Time{}, "before_id": uuid.Nil,
	}
	if p.Before != nil {
		args["before_created_at"], args["before_id"] = p.Before.CreatedAt, p.Before.ID
	}
	rows, _ := d.pool.Query(ctx, listWebhookDeliveriesSQL, args)
	out, err := pgx.CollectRows(rows, scanWebhookDelivery)
	if err != nil {
		return nil, fmt.Errorf("list webhook deliveries: %w", mapError(err))
	}
	return out, nil
}

const (
	getWebhookDeliverySQL = `
SELECT ` + webhookDeliveryColumns + ` FROM webhook_deliveries d
WHERE d.id = $1 AND d.endpoint_id = $2 AND d.project_id = $3`

	// A retry starts the schedule over: the delivery is due at once and
	// gets every scheduled attempt again. Unfinished ones are left alone.
	retryWebhookDeliverySQL = `
UPDATE webhook_deliveries d SET state = 'pending', attempts = 0, next_attempt_at = now()
WHERE d.id = $1 AND d.endpoint_id = $2 AND d.project_id = $3 AND d.state IN ('failed', 'delivered')
RETURNING ` + webhookDeliveryColumns
)

// RetryWebhookDelivery makes a finished delivery (failed, or delivered to
// send it again) pending and due now, and returns it; one that is pending
// or sending already is returned as it is. Unknown is ErrNotFound.
func (d *DB) RetryWebhookDelivery(ctx context.Context, projectID, endpointID, id uuid.UUID) (WebhookDelivery, error) {
	rows, _ := d.pool.Query(ctx, retryWebhookDeliverySQL, id, endpointID, projectID)
	w, err := pgx.CollectExactlyOneRow(rows, scanWebhookDelivery)
	if errors.Is(err, pgx.ErrNoRows) {
		rows, _ = d.pool.Query(ctx, getWebhookDeliverySQL, id, endpointID, projectID)
		w, err = pgx.CollectExactlyOneRow(rows, scanWebhookDelivery)
	}
	if err != nil {
		return WebhookDelivery{}, fmt.Errorf("retry webhook delivery %s: %w", id, mapError(err))
	}
	return w, nil
}
