package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Recipient kinds.
const (
	KindTo  = "to"
	KindCc  = "cc"
	KindBcc = "bcc"
	// KindEnvelope is a recipient given only in the envelope, as
	// SendRawMessage does.
	KindEnvelope = "envelope"
)

// DefaultIdempotencyTTL is how long an idempotency key is kept when
// Idempotency.TTL is zero.
const DefaultIdempotencyTTL = 24 * time.Hour

// NewRecipient is one envelope recipient of a message being stored.
type NewRecipient struct {
	// ID is made by the caller (uuid.NewV7).
	ID uuid.UUID
	// Address is the envelope address, local@domain, domain as an A-label.
	Address string
	// Domain is the domain of Address, lowercased.
	Domain string
	// Kind is one of to, cc, bcc, envelope.
	Kind string
}

// Idempotency ties a stored message to a caller's idempotency key. Keys are
// scoped to the message's project.
type Idempotency struct {
	// Key is the caller's idempotency key.
	Key string
	// RequestHash identifies the request; a reuse of Key with a different
	// hash is a conflict.
	RequestHash []byte
	// Response is what a replay of the request returns.
	Response []byte
	// TTL is how long the key is kept. Zero means DefaultIdempotencyTTL.
	TTL time.Duration
	// Amend, when set, makes the Response to keep once the insert found
	// some of the message's recipients suppressed, which the caller cannot
	// know beforehand, so that a replay answers what the first call was
	// told. It runs inside the transaction; an error fails the group.
	Amend func(suppressed []SuppressedRecipient) ([]byte, error)
}

// NewMessage is a message to store together with its recipients.
type NewMessage struct {
	// ID is made by the caller (uuid.NewV7).
	ID uuid.UUID
	// ProjectID owns the message; uuid.Nil means the default project.
	ProjectID uuid.UUID
	// APIKeyID is the key the message was sent with; uuid.Nil for none.
	APIKeyID        uuid.UUID
	MessageIDHeader string
	EnvelopeFrom    string
	FromHeader      string
	Subject         string
	// Raw is the complete message as it will be sent.
	Raw      []byte
	Tags     []string
	Metadata map[string]string
	// SendAt delays delivery: when it is later than Now the recipients
	// start as scheduled. Zero means now.
	SendAt time.Time
	// Now is the time the message is accepted at, against which SendAt is
	// compared; zero means the database's clock. A caller that has already
	// told its client whether the message is scheduled passes the time it
	// decided that by, so the stored state agrees with its answer.
	Now        time.Time
	Recipients []NewRecipient
	// Idempotency is nil when the request carried no idempotency key.
	Idempotency *Idempotency
}

// InsertResult is what InsertMessage did.
type InsertResult struct {
	// Replayed is set when the idempotency key was already used for the same
	// request: nothing was written and Response is the first call's.
	Replayed bool
	Response []byte
	// Suppressed are the recipients stored suppressed because their
	// address was on the project's suppression list, in the order given.
	// Empty when none was, and for a replay.
	Suppressed []SuppressedRecipient
}

// SuppressedRecipient is a recipient the intake did not queue because an
// entry of its project's suppression list matched its address.
type SuppressedRecipient struct {
	RecipientID uuid.UUID
	Reason      SuppressionReason
}

// Message is a stored message and the state of its recipients.
type Message struct {
	ID        uuid.UUID
	ProjectID uuid.UUID
	// APIKeyID is uuid.Nil when the message was sent without an API key.
	APIKeyID uuid.UUID
	// Status is derived from the recipients; see MessagePartiallyDelivered.
	Status          string
	MessageIDHeader string
	EnvelopeFrom    string
	FromHeader      string
	Subject         string
	Size            int64
	Tags            []string
	Metadata        map[string]string
	// SendAt is nil when the message was not scheduled.
	SendAt    *time.Time
	CreatedAt time.Time
	// UpdatedAt is the latest change of the message's recipients; once the
	// message is final, when it became final.
	UpdatedAt time.Time
	// RawPurgedAt is when retention emptied the message's raw body, nil
	// while the body is kept. Size still says how large it was.
	RawPurgedAt *time.Time
	// Recipients are in the order they were given.
	Recipients []Recipient
	// Attempts are oldest first. Only GetMessage fills them.
	Attempts []Attempt
}

// Recipient is one envelope recipient and its delivery state.
type Recipient struct {
	ID        uuid.UUID
	MessageID uuid.UUID
	Address   string
	Domain    string
	Kind      string
	Status    string
	// Attempts counts the delivery attempts made so far.
	Attempts int
	// NextAttemptAt is nil once the recipient is final.
	NextAttemptAt *time.Time
	// The last reply: zero and empty before the first attempt.
	LastCode         int
	LastEnhancedCode string
	LastText         string
	DeliveredAt      *time.Time
	CreatedAt        time.Time
	UpdatedAt        time.Time
	// SuppressionReason is why a suppressed recipient was not sent to: the
	// reason of the suppression list entry that matched its address. Empty
	// for every other status.
	SuppressionReason SuppressionReason
}

// Attempt is one SMTP attempt of one recipient.
type Attempt struct {
	ID           uuid.UUID
	RecipientID  uuid.UUID
	StartedAt    time.Time
	Duration     time.Duration
	MXHost       string
	IP           string
	TLS          bool
	TLSVersion   string
	Code         int
	EnhancedCode string
	Text         string
	// Outcome is delivered, deferred, bounced, failed or ambiguous.
	Outcome string
	// Source is AttemptSourceRemote when the reply is the server's, or
	// AttemptSourceLocal when it was made up here.
	Source string
	// TLSCipher, TLSVerified, TLSPolicy and TLSPolicyFailure are as in
	// NewAttempt.
	TLSCipher        string
	TLSVerified      bool
	TLSPolicy        string
	TLSPolicyFailure string
}

// Cursor is the position of a message in the newest-first listing order.
type Cursor struct {
	CreatedAt time.Time
	ID        uuid.UUID
}

// ListMessagesParams filters and pages ListMessages. Zero fields do not
// filter.
type ListMessagesParams struct {
	// ProjectID is the project whose messages are listed. Required.
	ProjectID uuid.UUID
	// Statuses keeps messages in one of these statuses.
	Statuses []string
	// Recipient is an envelope address, matched without regard to case.
	Recipient string
	// Tags keeps messages carrying at least one of these tags.
	Tags []string
	// CreatedAfter keeps messages created at or after it.
	CreatedAfter *time.Time
	// CreatedBefore keeps messages created before it.
	CreatedBefore *time.Time
	// Limit is the page size. Zero or less means DefaultListLimit.
	Limit int
	// After continues a listing after the message it points at.
	After *Cursor
}

// DefaultListLimit is the ListMessages page size when Limit is not set.
const DefaultListLimit = 20

func (p NewMessage) validate() error {
	if p.ID == uuid.Nil {
		return errors.New("ID is required")
	}
	if p.EnvelopeFrom == "" {
		return errors.New("EnvelopeFrom is required")
	}
	if len(p.Recipients) == 0 {
		return errors.New("Recipients: at least one is required")
	}
	for i, r := range p.Recipients {
		switch {
		case r.ID == uuid.Nil:
			return fmt.Errorf("Recipients[%d].ID is required", i)
		case r.Address == "":
			return fmt.Errorf("Recipients[%d].Address is required", i)
		case r.Domain == "":
			return fmt.Errorf("Recipients[%d].Domain is required", i)
		}
		switch r.Kind {
		case KindTo, KindCc, KindBcc, KindEnvelope:
		default:
			return fmt.Errorf("Recipients[%d].Kind %q is not to, cc, bcc or envelope", i, r.Kind)
		}
	}
	if p.Idempotency != nil {
		if p.Idempotency.Key == "" {
			return errors.New("Idempotency.Key is required")
		}
		if p.Idempotency.TTL < 0 {
			return errors.New("Idempotency.TTL must not be negative")
		}
	}
	return nil
}

// InsertMessage stores a message, its recipients (queued, or scheduled when
// SendAt is in the future) and its "accepted" event ("scheduled" too when
// scheduled), all in one transaction. It is InsertMessages with one message;
// see there for idempotency keys.
func (d *DB) InsertMessage(ctx context.Context, p NewMessage) (InsertResult, error) {
	out, err := d.InsertMessages(ctx, []NewMessage{p})
	if err != nil {
		return InsertResult{}, err
	}
	return out[0].Result, out[0].Err
}

const messageColumns = `
m.id, m.project_id, m.api_key_id, m.status, m.message_id_header, m.envelope_from, m.from_header, m.subject,
m.size_bytes, m.tags, m.metadata, m.send_at, m.created_at, m.updated_at, m.raw_purged_at`

const recipientColumns = `
r.id, r.message_id, r.address, r.domain, r.kind, r.status, r.attempts, r.next_attempt_at,
coalesce(r.last_code, 0), coalesce(r.last_enhanced_code, ''), coalesce(r.last_text, ''),
r.delivered_at, r.created_at, r.updated_at, coalesce(r.suppression_reason, '')`

const attemptColumns = `
a.id, a.recipient_id, a.started_at, a.duration, a.mx_host, a.ip, a.tls, a.tls_version,
a.code, a.enhanced_code, a.text, a.outcome, a.source,
a.tls_cipher, a.tls_verified, a.tls_policy, a.tls_policy_failure`

// A message is read with its recipients (and attempts) as arrays of records
// in one statement, so that they all come from one snapshot whether the
// statement runs on the pool or inside a caller's READ COMMITTED
// transaction.
const (
	recipientRecords = `ARRAY(SELECT ROW(` + recipientColumns + `) FROM recipients r
    WHERE r.message_id = m.id ORDER BY r.position)`
	attemptRecords = `ARRAY(SELECT ROW(` + attemptColumns + `) FROM attempts a
    WHERE a.message_id = m.id ORDER BY a.started_at, a.id)`
)

const getMessageSQL = `SELECT ` + messageColumns + `, ` + recipientRecords + `, ` + attemptRecords + `
FROM messages m WHERE m.id = $1 AND m.project_id = $2`

// GetMessage returns a message of a project with its recipients and
// attempts, or ErrNotFound (also when the message is another project's).
func (d *DB) GetMessage(ctx context.Context, projectID, id uuid.UUID) (Message, error) {
	m, err := d.getMessage(ctx, projectID, id)
	if err != nil {
		return Message{}, fmt.Errorf("get message %s: %w", id, mapError(err))
	}
	return m, nil
}

func (d *DB) getMessage(ctx context.Context, projectID, id uuid.UUID) (Message, error) {
	rows, _ := d.pool.Query(ctx, getMessageSQL, id, projectID)
	return pgx.CollectExactlyOneRow(rows, func(row pgx.CollectableRow) (Message, error) {
		var (
			rs []recipientRecord
			as []attemptRecord
		)
		m, err := scanMessage(row, &rs, &as)
		if err != nil {
			return Message{}, err
		}
		m.Recipients = recipientsOf(rs)
		if len(as) > 0 {
			m.Attempts = make([]Attempt, len(as))
			for i, a := range as {
				m.Attempts[i] = a.Attempt
			}
		}
		return m, nil
	})
}

// scanMessage scans messageColumns and then any extra columns into extra.
func scanMessage(row pgx.CollectableRow, extra ...any) (Message, error) {
	var m Message
	var apiKeyID *uuid.UUID
	err := row.Scan(append([]any{&m.ID, &m.ProjectID, &apiKeyID, &m.Status, &m.MessageIDHeader,
		&m.EnvelopeFrom, &m.FromHeader, &m.Subject, &m.Size, &m.Tags, &m.Metadata, &m.SendAt,
		&m.CreatedAt, &m.UpdatedAt, &m.RawPurgedAt}, extra...)...)
	if apiKeyID != nil {
		m.APIKeyID = *apiKeyID
	}
	return m, err
}

// recipientRecord scans one ROW(recipientColumns) of an array.
type recipientRecord struct {
	Recipient
	fields []any
}

// ScanNull refuses a NULL record: ARRAY(SELECT ROW(...)) never holds one.
func (r *recipientRecord) ScanNull() error { return errors.New("recipient record is NULL") }

// ScanIndex returns where the i-th column of recipientColumns goes.
func (r *recipientRecord) ScanIndex(i int) any {
	if r.fields == nil {
		r.fields = r.Recipient.scanFields()
	}
	if i >= len(r.fields) {
		return nil // skipped; TestRecordFieldsMatchColumns keeps the lists in step
	}
	return r.fields[i]
}

// scanFields are the destinations of recipientColumns, in order.
func (r *Recipient) scanFields() []any {
	return []any{&r.ID, &r.MessageID, &r.Address, &r.Domain, &r.Kind, &r.Status, &r.Attempts,
		&r.NextAttemptAt, &r.LastCode, &r.LastEnhancedCode, &r.LastText, &r.DeliveredAt,
		&r.CreatedAt, &r.UpdatedAt, &r.SuppressionReason}
}

func recipientsOf(rs []recipientRecord) []Recipient {
	if len(rs) == 0 {
		return nil
	}
	out := make([]Recipient, len(rs))
	for i, r := range rs {
		out[i] = r.Recipient
	}
	return out
}

// attemptRecord scans one ROW(attemptColumns) of an array.
type attemptRecord struct {
	Attempt
	fields []any
}

// ScanNull refuses a NULL record: ARRAY(SELECT ROW(...)) never holds one.
func (a *attemptRecord) ScanNull() error { return errors.New("attempt record is NULL") }

// ScanIndex returns where the i-th column of attemptColumns goes.
func (a *attemptRecord) ScanIndex(i int) any {
	if a.fields == nil {
		a.fields = a.Attempt.scanFields()
	}
	if i >= len(a.fields) {
		return nil // skipped; TestRecordFieldsMatchColumns keeps the lists in step
	}
	return a.fields[i]
}

// scanFields are the destinations of attemptColumns, in order.
func (a *Attempt) scanFields() []any {
	return []any{&a.ID, &a.RecipientID, &a.StartedAt, &a.Duration, &a.MXHost, &a.IP, &a.TLS,
		&a.TLSVersion, &a.Code, &a.EnhancedCode, &a.Text, &a.Outcome, &a.Source,
		&a.TLSCipher, &a.TLSVerified, &a.TLSPolicy, &a.TLSPolicyFailure}
}

// The listing query is put together from these fragments; only the filters
// in use are added, so every combination gets a plan that can use its index.
const (
	listMessagesSelect = `SELECT ` + messageColumns + `, ` + recipientRecords + ` FROM messages m`
	listFilterProject  = `m.project_id = @project_id`
	listFilterStatus   = `m.status = ANY(@statuses::text[])`
	// lower(address) is what the expression index of migration 00015 holds;
	// addresses are ASCII (A-label domains, ASCII local parts), so lower()
	// is the same under every collation.
	listFilterRecipient = `m.id IN (SELECT r.message_id FROM recipients r WHERE lower(r.address) = lower(@recipient))`
	// Overlap (&&) keeps messages with any of the tags, and the GIN index
	// serves it. The second clause lets the planner use the partial tag
	// index (migration 00007); it never changes the result.
	listFilterTag         = `m.tags && @tags::text[] AND m.tags <> '{}'`
	listFilterAfterTime   = `m.created_at >= @created_after`
	listFilterBeforeTime  = `m.created_at < @created_before`
	listFilterCursor      = `(m.created_at, m.id) < (@cursor_created_at::timestamptz, @cursor_id::uuid)`
	listMessagesOrderedBy = ` ORDER BY m.created_at DESC, m.id DESC LIMIT @limit`
)

// ListMessages returns the messages that pass every filter in p, newest
// first (by created_at, then id), with their recipients but no attempts.
// A page after p.After starts right behind that message.
func (d *DB) ListMessages(ctx context.Context, p ListMessagesParams) ([]Message, error) {
	if p.ProjectID == uuid.Nil {
		return nil, errors.New("list messages: ProjectID is required")
	}
	query, args := listMessagesQuery(p)
	rows, _ := d.pool.Query(ctx, query, args)
	msgs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Message, error) {
		var rs []recipientRecord
		m, err := scanMessage(row, &rs)
		if err != nil {
			return Message{}, err
		}
		m.Recipients = recipientsOf(rs)
		return m, nil
	})
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", mapError(err))
	}
	return msgs, nil
}

func listMessagesQuery(p ListMessagesParams) (string, pgx.NamedArgs) {
	limit := p.Limit
	if limit <= 0 {
		limit = DefaultListLimit
	}
	// The project comes first: every listing index leads with it.
	args := pgx.NamedArgs{"limit": limit, "project_id": p.ProjectID}
	where := []string{listFilterProject}
	if len(p.Statuses) > 0 {
		where = append(where, listFilterStatus)
		args["statuses"] = p.Statuses
	}
	if p.Recipient != "" {
		where = append(where, listFilterRecipient)
		args["recipient"] = p.Recipient
	}
	if len(p.Tags) > 0 {
		where = append(where, listFilterTag)
		args["tags"] = p.Tags
	}
	if p.CreatedAfter != nil {
		where = append(where, listFilterAfterTime)
		args["created_after"] = *p.CreatedAfter
	}
	if p.CreatedBefore != nil {
		where = append(where, listFilterBeforeTime)
		args["created_before"] = *p.CreatedBefore
	}
	if p.After != nil {
		where = append(where, listFilterCursor)
		args["cursor_created_at"] = p.After.CreatedAt
		args["cursor_id"] = p.After.ID
	}
	query := listMessagesSelect
	for i, w := range where {
		if i == 0 {
			query += " WHERE " + w
		} else {
			query += " AND " + w
		}
	}
	return query + listMessagesOrderedBy, args
}

// The cancel statements only reach recipients of a message of the project
// ($2), so canceling another project's message changes nothing.
const lockCancelableSQL = `
SELECT id FROM recipients
WHERE message_id = (SELECT id FROM messages WHERE id = $1 AND project_id = $2)
  AND status IN ('scheduled', 'queued', 'sending', 'deferred')
ORDER BY id
FOR NO KEY UPDATE`

// A waiting recipient is canceled at once; one in flight is only marked, and
// its outcome decides (see RecordOutcomes). A row already marked is left
// alone, so canceling twice changes nothing.
//
// $1 message id, $2 its project, $3 the payload of the canceled events.
const cancelRecipientsSQL = `
WITH upd AS (
    UPDATE recipients
    SET status = CASE WHEN status = 'sending' THEN status ELSE 'canceled' END,
        next_attempt_at = CASE WHEN status = 'sending' THEN next_attempt_at END,
        cancel_requested_at = coalesce(cancel_requested_at, now()),
        updated_at = now()
    WHERE message_id = (SELECT id FROM messages WHERE id = $1 AND project_id = $2)
      AND status IN ('scheduled', 'queued', 'sending', 'deferred')
      AND NOT (status = 'sending' AND cancel_requested_at IS NOT NULL)
    RETURNING id, message_id, status
), new_events AS (
    SELECT $2::uuid AS project_id, message_id, id AS recipient_id, status AS type, $3::jsonb AS details
    FROM upd WHERE status = 'canceled'
), ` + writeEventsCTE + `
SELECT count(*) FROM upd WHERE status = 'canceled'`

// CancelMessage cancels the recipients of a message that are still waiting
// (scheduled, queued, deferred), each with a "canceled" event. Recipients
// being sent get a cancel request instead: if their attempt ends delivered or
// bounced that stands, anything else becomes canceled. It returns the message
// as it is afterwards with the number of recipients it canceled (not those
// only marked: their attempt's outcome ends them), ErrNothingToCancel when
// every recipient was already final (nothing is changed), or ErrNotFound
// (also when the message is another project's, which is left untouched).
func (d *DB) CancelMessage(ctx context.Context, projectID, id uuid.UUID) (Message, int, error) {
	payload, err := encodePayload(EventPayload{})
	if err != nil {
		return Message{}, 0, fmt.Errorf("cancel message %s: %w", id, err)
	}
	var canceled int
	b := &pgx.Batch{}
	b.Queue(lockCancelableSQL, id, projectID)
	b.Queue(cancelRecipientsSQL, id, projectID, payload)
	err = d.sendChange(ctx, b, projectMessagesWithIDs(projectID, []uuid.UUID{id}), func(br pgx.BatchResults) error {
		// The rows locked are the recipients not yet final.
		locked, err := br.Exec()
		if err != nil {
			return err
		}
		if err := br.QueryRow().Scan(&canceled); err != nil {
			return err
		}
		// The message lock finds the message, or there is none.
		tag, err := br.Exec()
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrNotFound
		}
		if locked.RowsAffected() == 0 {
			// Nothing was updated either, and the batch's transaction
			// commits no change.
			return ErrNothingToCancel
		}
		return nil
	})
	if err != nil {
		return Message{}, 0, fmt.Errorf("cancel message %s: %w", id, mapError(err))
	}
	m, err := d.getMessage(ctx, projectID, id)
	if err != nil {
		return Message{}, 0, fmt.Errorf("cancel message %s: %w", id, mapError(err))
	}
	return m, canceled, nil
}

// nullUUID is NULL for uuid.Nil, for nullable foreign keys.
func nullUUID(id uuid.UUID) *uuid.UUID {
	if id == uuid.Nil {
		return nil
	}
	return &id
}

// nonNilBytes keeps a nil slice from becoming NULL in a NOT NULL column.
func nonNilBytes(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}
