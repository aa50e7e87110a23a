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
	UpdatedAt time.Time
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
	// Status is a message status.
	Status string
	// Recipient is an envelope address, matched exactly.
	Recipient string
	// Tag must be one of the message's tags.
	Tag string
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
// scheduled), all in one transaction.
//
// With Idempotency set, the key is taken first. If it is already held and
// has not expired, nothing is written: the same request hash gives a result
// with Replayed set, a different one ErrIdempotencyConflict. An expired key
// is taken over. Callers racing with one key wait for each other, and exactly
// one of them stores a message.
func (d *DB) InsertMessage(ctx context.Context, p NewMessage) (InsertResult, error) {
	if err := p.validate(); err != nil {
		return InsertResult{}, fmt.Errorf("insert message: %w", err)
	}
	if p.Idempotency == nil {
		if err := insertMessage(ctx, d.pool, p); err != nil {
			return InsertResult{}, fmt.Errorf("insert message %s: %w", p.ID, mapError(err))
		}
		return InsertResult{}, nil
	}
	var res InsertResult
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		var err error
		res, err = takeIdempotencyKey(ctx, tx, projectOrDefault(p.ProjectID), p.ID, *p.Idempotency)
		if err != nil || res.Replayed {
			return err
		}
		return insertMessage(ctx, tx, p)
	})
	if err != nil {
		if errors.Is(err, ErrIdempotencyConflict) {
			return InsertResult{}, fmt.Errorf("insert message %s: %w", p.ID, err)
		}
		return InsertResult{}, fmt.Errorf("insert message %s: %w", p.ID, mapError(err))
	}
	return res, nil
}

const insertMessageSQL = `
WITH m AS (
    INSERT INTO messages (id, project_id, api_key_id, status, message_id_header, envelope_from, from_header,
        subject, raw, size_bytes, tags, metadata, send_at)
    VALUES ($1, $17, $2, CASE WHEN $11::timestamptz > coalesce($16::timestamptz, now()) THEN 'scheduled' ELSE 'queued' END,
        $3, $4, $5, $6, $7, $8, $9, $10, $11)
    RETURNING id, status, send_at
), r AS (
    INSERT INTO recipients (id, message_id, position, address, domain, kind, status, next_attempt_at)
    SELECT u.id, m.id, u.position, u.address, u.domain, u.kind, m.status,
        CASE WHEN m.status = 'scheduled' THEN m.send_at ELSE now() END
    FROM m, unnest($12::uuid[], $13::text[], $14::text[], $15::text[])
        WITH ORDINALITY AS u(id, address, domain, kind, position)
)
INSERT INTO events (message_id, type, details)
SELECT m.id, 'accepted', jsonb_build_object('recipients', cardinality($12::uuid[])) FROM m
UNION ALL
SELECT m.id, 'scheduled', jsonb_build_object('send_at', m.send_at) FROM m WHERE m.status = 'scheduled'`

// insertMessage writes the message, its recipients and events in one batch;
// on the pool the batch is its own transaction.
func insertMessage(ctx context.Context, q Querier, p NewMessage) error {
	n := len(p.Recipients)
	ids := make([]uuid.UUID, n)
	addrs := make([]string, n)
	domains := make([]string, n)
	kinds := make([]string, n)
	for i, r := range p.Recipients {
		ids[i], addrs[i], domains[i], kinds[i] = r.ID, r.Address, r.Domain, r.Kind
	}
	var sendAt *time.Time
	if !p.SendAt.IsZero() {
		sendAt = &p.SendAt
	}
	tags := p.Tags
	if tags == nil {
		tags = []string{}
	}
	metadata := p.Metadata
	if metadata == nil {
		metadata = map[string]string{}
	}
	b := &pgx.Batch{}
	b.Queue(insertMessageSQL,
		p.ID, nullUUID(p.APIKeyID), p.MessageIDHeader, p.EnvelopeFrom, p.FromHeader,
		p.Subject, nonNilBytes(p.Raw), int64(len(p.Raw)), tags, metadata, sendAt,
		ids, addrs, domains, kinds, nowParam(p.Now), projectOrDefault(p.ProjectID))
	b.Queue(deriveStatusByID, []uuid.UUID{p.ID})
	return q.SendBatch(ctx, b).Close()
}

const messageColumns = `
m.id, m.project_id, m.api_key_id, m.status, m.message_id_header, m.envelope_from, m.from_header, m.subject,
m.size_bytes, m.tags, m.metadata, m.send_at, m.created_at, m.updated_at`

const recipientColumns = `
r.id, r.message_id, r.address, r.domain, r.kind, r.status, r.attempts, r.next_attempt_at,
coalesce(r.last_code, 0), coalesce(r.last_enhanced_code, ''), coalesce(r.last_text, ''),
r.delivered_at, r.created_at, r.updated_at`

const attemptColumns = `
a.id, a.recipient_id, a.started_at, a.duration, a.mx_host, a.ip, a.tls, a.tls_version,
a.code, a.enhanced_code, a.text, a.outcome, a.source`

// Another project's message is not found, exactly like an unknown id.
const getMessageSQL = `SELECT ` + messageColumns + ` FROM messages m WHERE m.id = $1 AND m.project_id = $2`

const getRecipientsSQL = `
SELECT ` + recipientColumns + ` FROM recipients r
WHERE r.message_id = ANY($1::uuid[])
ORDER BY r.message_id, r.position`

const getAttemptsSQL = `
SELECT ` + attemptColumns + ` FROM attempts a
WHERE a.message_id = $1
ORDER BY a.started_at, a.id`

// A read that spans several statements runs in one REPEATABLE READ
// transaction, so a message, its recipients and its attempts come from the
// same snapshot. BEGIN and COMMIT ride in the batch: one round trip.
const (
	beginSnapshotSQL = `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`
	commitSQL        = `COMMIT`
)

// GetMessage returns a message of a project with its recipients and
// attempts, or ErrNotFound (also when the message is another project's).
func (d *DB) GetMessage(ctx context.Context, projectID, id uuid.UUID) (Message, error) {
	m, err := d.getMessage(ctx, projectID, id)
	if err != nil {
		return Message{}, fmt.Errorf("get message %s: %w", id, mapError(err))
	}
	return m, nil
}

// getMessage runs on the pool only: its batch begins and commits its own
// transaction.
func (d *DB) getMessage(ctx context.Context, projectID, id uuid.UUID) (Message, error) {
	b := &pgx.Batch{}
	b.Queue(beginSnapshotSQL)
	b.Queue(getMessageSQL, id, projectID)
	b.Queue(getRecipientsSQL, []uuid.UUID{id})
	b.Queue(getAttemptsSQL, id)
	b.Queue(commitSQL)
	br := d.pool.SendBatch(ctx, b)
	defer br.Close()

	if _, err := br.Exec(); err != nil {
		return Message{}, err
	}
	rows, _ := br.Query()
	m, err := pgx.CollectExactlyOneRow(rows, scanMessage)
	if err != nil {
		return Message{}, err
	}
	rows, _ = br.Query()
	m.Recipients, err = pgx.CollectRows(rows, scanRecipient)
	if err != nil {
		return Message{}, err
	}
	rows, _ = br.Query()
	m.Attempts, err = pgx.CollectRows(rows, scanAttempt)
	if err != nil {
		return Message{}, err
	}
	if _, err := br.Exec(); err != nil {
		return Message{}, err
	}
	return m, br.Close()
}

func scanMessage(row pgx.CollectableRow) (Message, error) {
	var m Message
	var apiKeyID *uuid.UUID
	err := row.Scan(&m.ID, &m.ProjectID, &apiKeyID, &m.Status, &m.MessageIDHeader, &m.EnvelopeFrom, &m.FromHeader,
		&m.Subject, &m.Size, &m.Tags, &m.Metadata, &m.SendAt, &m.CreatedAt, &m.UpdatedAt)
	if apiKeyID != nil {
		m.APIKeyID = *apiKeyID
	}
	return m, err
}

func scanRecipient(row pgx.CollectableRow) (Recipient, error) {
	var r Recipient
	err := row.Scan(&r.ID, &r.MessageID, &r.Address, &r.Domain, &r.Kind, &r.Status, &r.Attempts,
		&r.NextAttemptAt, &r.LastCode, &r.LastEnhancedCode, &r.LastText, &r.DeliveredAt,
		&r.CreatedAt, &r.UpdatedAt)
	return r, err
}

func scanAttempt(row pgx.CollectableRow) (Attempt, error) {
	var a Attempt
	err := row.Scan(&a.ID, &a.RecipientID, &a.StartedAt, &a.Duration, &a.MXHost, &a.IP, &a.TLS,
		&a.TLSVersion, &a.Code, &a.EnhancedCode, &a.Text, &a.Outcome, &a.Source)
	return a, err
}

// The listing query is put together from these fragments; only the filters
// in use are added, so every combination gets a plan that can use its index.
const (
	listMessagesSelect    = `SELECT ` + messageColumns + ` FROM messages m`
	listFilterProject     = `m.project_id = @project_id`
	listFilterStatus      = `m.status = @status`
	listFilterRecipient   = `m.id IN (SELECT r.message_id FROM recipients r WHERE r.address = @recipient)`
	listFilterTag         = `m.tags @> ARRAY[@tag::text]`
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
	var out []Message
	err := pgx.BeginTxFunc(ctx, d.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly},
		func(tx pgx.Tx) error {
			rows, _ := tx.Query(ctx, query, args)
			msgs, err := pgx.CollectRows(rows, scanMessage)
			if err != nil {
				return err
			}
			if len(msgs) == 0 {
				out = msgs
				return nil
			}
			ids := make([]uuid.UUID, len(msgs))
			index := make(map[uuid.UUID]int, len(msgs))
			for i, m := range msgs {
				ids[i] = m.ID
				index[m.ID] = i
			}
			rows, _ = tx.Query(ctx, getRecipientsSQL, ids)
			rcpts, err := pgx.CollectRows(rows, scanRecipient)
			if err != nil {
				return err
			}
			for _, r := range rcpts {
				i := index[r.MessageID]
				msgs[i].Recipients = append(msgs[i].Recipients, r)
			}
			out = msgs
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", mapError(err))
	}
	return out, nil
}

func listMessagesQuery(p ListMessagesParams) (string, pgx.NamedArgs) {
	limit := p.Limit
	if limit <= 0 {
		limit = DefaultListLimit
	}
	// The project comes first: every listing index leads with it.
	args := pgx.NamedArgs{"limit": limit, "project_id": p.ProjectID}
	where := []string{listFilterProject}
	if p.Status != "" {
		where = append(where, listFilterStatus)
		args["status"] = p.Status
	}
	if p.Recipient != "" {
		where = append(where, listFilterRecipient)
		args["recipient"] = p.Recipient
	}
	if p.Tag != "" {
		where = append(where, listFilterTag)
		args["tag"] = p.Tag
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
)
INSERT INTO events (message_id, recipient_id, type)
SELECT message_id, id, 'canceled' FROM upd WHERE status = 'canceled'`

// lockProjectMessageSQL locks the message before its status is derived, as
// lockMessagesByID does, and finds nothing for another project's message.
const lockProjectMessageSQL = `
SELECT id FROM messages WHERE id = $1 AND project_id = $2 FOR NO KEY UPDATE`

// CancelMessage cancels the recipients of a message that are still waiting
// (scheduled, queued, deferred), each with a "canceled" event. Recipients
// being sent get a cancel request instead: if their attempt ends delivered or
// bounced that stands, anything else becomes canceled. It returns the message
// as it is afterwards, or ErrNotFound (also when the message is another
// project's, which is left untouched).
func (d *DB) CancelMessage(ctx context.Context, projectID, id uuid.UUID) (Message, error) {
	b := &pgx.Batch{}
	b.Queue(lockCancelableSQL, id, projectID)
	b.Queue(cancelRecipientsSQL, id, projectID)
	b.Queue(lockProjectMessageSQL, id, projectID)
	b.Queue(deriveStatusByID, []uuid.UUID{id})
	err := func() error {
		br := d.pool.SendBatch(ctx, b)
		defer br.Close()
		for range 2 {
			if _, err := br.Exec(); err != nil {
				return err
			}
		}
		tag, err := br.Exec()
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrNotFound
		}
		return br.Close()
	}()
	if err != nil {
		return Message{}, fmt.Errorf("cancel message %s: %w", id, mapError(err))
	}
	m, err := d.getMessage(ctx, projectID, id)
	if err != nil {
		return Message{}, fmt.Errorf("cancel message %s: %w", id, mapError(err))
	}
	return m, nil
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
