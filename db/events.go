package db

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// EventType is what happened to a message or to one of its recipients.
type EventType string

// Event types. Accepted and scheduled are about the message; the others are
// about one recipient and name the status it moved to.
const (
	// EventAccepted: the message was stored.
	EventAccepted EventType = "accepted"
	// EventScheduled: the message waits for its send_at.
	EventScheduled EventType = "scheduled"
	// EventDeferred: an attempt failed temporarily; a retry is due.
	EventDeferred EventType = "deferred"
	// EventDelivered: the receiving server took the message.
	EventDelivered EventType = "delivered"
	// EventBounced: the receiving server refused the recipient for good.
	EventBounced EventType = "bounced"
	// EventFailed: delivery was given up.
	EventFailed EventType = "failed"
	// EventCanceled: the recipient was canceled before it was delivered.
	EventCanceled EventType = "canceled"
)

// EventTypes lists every event type, in the order of the constants.
var EventTypes = []EventType{
	EventAccepted, EventScheduled, EventDeferred, EventDelivered, EventBounced, EventFailed, EventCanceled,
}

// EventPayload is what an event says beyond its type; the fields that apply
// depend on the type, the others are zero and left out of the stored JSON.
type EventPayload struct {
	// Recipients is the number of envelope recipients (accepted).
	Recipients int `json:"recipients,omitempty"`
	// SendAt is when the message becomes due (scheduled).
	SendAt *time.Time `json:"send_at,omitempty"`

	// The fields below describe the attempt that ended in the event
	// (deferred, delivered, bounced, failed, and canceled when a cancel
	// requested during the attempt took effect at its end).

	// Outcome is the attempt's own result: delivered, deferred, bounced or
	// failed. It differs from the event type only for canceled events.
	Outcome string `json:"outcome,omitempty"`
	// Ambiguous: the attempt ended without knowing whether the receiver
	// took the message.
	Ambiguous bool `json:"ambiguous,omitempty"`
	// The reply that decided the attempt; Code is zero when there was none.
	Code         int    `json:"code,omitempty"`
	EnhancedCode string `json:"enhanced_code,omitempty"`
	Text         string `json:"text,omitempty"`
	// MXHost is the last host tried, empty when none was.
	MXHost string `json:"mx_host,omitempty"`
	// NextAttemptAt is when the recipient is due again (deferred).
	NextAttemptAt *time.Time `json:"next_attempt_at,omitempty"`
}

// encodePayload is the one place an event payload becomes the JSON stored
// in events.details.
func encodePayload(p EventPayload) (string, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return "", fmt.Errorf("encode event payload: %w", err)
	}
	return string(b), nil
}

// outcomePayload is the payload of the event an outcome writes.
func outcomePayload(o Outcome) EventPayload {
	p := EventPayload{
		Outcome:      o.Status,
		Ambiguous:    o.Ambiguous,
		Code:         o.Code,
		EnhancedCode: o.EnhancedCode,
		Text:         o.Text,
	}
	if n := len(o.Attempts); n > 0 {
		p.MXHost = o.Attempts[n-1].MXHost
	}
	if o.Status == StatusDeferred {
		next := o.NextAttemptAt
		p.NextAttemptAt = &next
	}
	return p
}

// writeEventsCTE is the one writer of the events table. Every statement
// that changes state ends with it, after a CTE named new_events that yields
// (message_id, recipient_id, type, details) for the rows the change made:
// the events commit with the change or not at all, one multi-row INSERT per
// statement, and only for rows that passed the change's fences. The payloads
// in details are built in Go (EventPayload, encodePayload) and passed in as
// parameters; SQL only picks which rows get one. txid and created_at take
// their defaults.
const writeEventsCTE = `
written_events AS (
    INSERT INTO events (project_id, message_id, recipient_id, type, details)
    SELECT e.project_id, e.message_id, e.recipient_id, e.type, e.details FROM new_events e
)`

// EventCursor is a position in the event feed. The zero value is the start;
// pass the cursor ReadEvents returned to continue after what it read.
type EventCursor struct {
	txid uint64
	id   int64
}

// String encodes the cursor as an opaque token for clients to hand back.
func (c EventCursor) String() string {
	return strconv.FormatUint(c.txid, 10) + "." + strconv.FormatInt(c.id, 10)
}

// ParseEventCursor decodes a token made by EventCursor.String. The empty
// string is the start of the feed.
func ParseEventCursor(s string) (EventCursor, error) {
	if s == "" {
		return EventCursor{}, nil
	}
	tx, id, ok := strings.Cut(s, ".")
	if !ok {
		return EventCursor{}, fmt.Errorf("event cursor %q: malformed", s)
	}
	txid, err := strconv.ParseUint(tx, 10, 64)
	if err != nil {
		return EventCursor{}, fmt.Errorf("event cursor %q: malformed", s)
	}
	n, err := strconv.ParseInt(id, 10, 64)
	if err != nil || n < 0 {
		return EventCursor{}, fmt.Errorf("event cursor %q: malformed", s)
	}
	return EventCursor{txid: txid, id: n}, nil
}

// Event is one stored event.
type Event struct {
	// Cursor is the event's position in the feed: read after it to continue.
	Cursor    EventCursor
	ID        int64
	Type      EventType
	ProjectID uuid.UUID
	MessageID uuid.UUID
	// RecipientID is uuid.Nil for events about the whole message.
	RecipientID uuid.UUID
	Payload     EventPayload
	CreatedAt   time.Time
}

// ReadEventsParams says where to read the event feed.
type ReadEventsParams struct {
	// After continues the feed after this position; zero is the start.
	After EventCursor
	// Limit is the most events to return. Zero or less means
	// DefaultReadEventsLimit.
	Limit int
	// ProjectID keeps one project's events; uuid.Nil reads every
	// project's, for consumers that serve them all.
	ProjectID uuid.UUID
	// MessageID keeps the events of one message; uuid.Nil keeps all.
	MessageID uuid.UUID
}

// DefaultReadEventsLimit is the ReadEvents page size when Limit is not set.
const DefaultReadEventsLimit = 100

// The feed is read in (txid, id) order, and only rows of transactions that
// ended before the oldest one still running: any transaction that has yet
// to commit has a txid at or above that bound, so nothing can appear behind
// a position once it was read past. A transaction running long holds the
// feed back until it ends (a rolled-back one too: its rows never show, and
// the bound moves on). The reader's own transaction, if it wrote, is in
// flight and bounds itself.
const (
	eventColumns = `e.id, e.txid, e.project_id, e.message_id, e.recipient_id, e.type, e.details, e.created_at`

	readEventsSQL = `
SELECT ` + eventColumns + ` FROM events e
WHERE (e.txid, e.id) > (@after_txid::xid8, @after_id::bigint)
  AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.txid, e.id
LIMIT @limit`

	// One project's feed, by events_project_txid_id_idx.
	readProjectEventsSQL = `
SELECT ` + eventColumns + ` FROM events e
WHERE e.project_id = @project_id
  AND (e.txid, e.id) > (@after_txid::xid8, @after_id::bigint)
  AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.txid, e.id
LIMIT @limit`

	// One message's events are few: events_message_id_idx finds them and
	// the sort is cheap.
	readMessageEventsSQL = `
SELECT ` + eventColumns + ` FROM events e
WHERE e.message_id = @message_id
  AND (@project_id::uuid = '00000000-0000-0000-0000-000000000000' OR e.project_id = @project_id)
  AND (e.txid, e.id) > (@after_txid::xid8, @after_id::bigint)
  AND e.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.txid, e.id
LIMIT @limit`
)

// ReadEvents returns the events after p.After in commit-safe order, and the
// cursor to continue from: the last event's, or p.After when there was none.
// Reading on from the returned cursor never skips an event, whatever order
// their transactions committed in; an event shows once every transaction
// that began before its own has ended.
func (d *DB) ReadEvents(ctx context.Context, p ReadEventsParams) ([]Event, EventCursor, error) {
	limit := p.Limit
	if limit <= 0 {
		limit = DefaultReadEventsLimit
	}
	args := pgx.NamedArgs{"after_txid": p.After.txid, "after_id": p.After.id, "limit": limit}
	query := readEventsSQL
	switch {
	case p.MessageID != uuid.Nil:
		query = readMessageEventsSQL
		args["message_id"] = p.MessageID
		args["project_id"] = p.ProjectID
	case p.ProjectID != uuid.Nil:
		query = readProjectEventsSQL
		args["project_id"] = p.ProjectID
	}
	rows, _ := d.pool.Query(ctx, query, args)
	events, err := pgx.CollectRows(rows, scanEvent)
	if err != nil {
		return nil, p.After, fmt.Errorf("read events: %w", mapError(err))
	}
	next := p.After
	if len(events) > 0 {
		next = events[len(events)-1].Cursor
	}
	return events, next, nil
}

func scanEvent(row pgx.CollectableRow) (Event, error) {
	var (
		e           Event
		recipientID *uuid.UUID
		details     []byte
	)
	err := row.Scan(&e.ID, &e.Cursor.txid, &e.ProjectID, &e.MessageID, &recipientID, &e.Type, &details, &e.CreatedAt)
	if err != nil {
		return Event{}, err
	}
	e.Cursor.id = e.ID
	if recipientID != nil {
		e.RecipientID = *recipientID
	}
	if err := json.Unmarshal(details, &e.Payload); err != nil {
		return Event{}, fmt.Errorf("event %d: decode payload: %w", e.ID, err)
	}
	return e, nil
}
