package db

import (
	"context"
	"encoding/json"
	"errors"
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
// about one recipient. The first seven name the status the recipient moved
// to; suppressed, complained, delayed and auto_replied report what was
// learnt about it without changing its status by themselves.
const (
	// EventAccepted: the message was stored.
	EventAccepted EventType = "accepted"
	// EventScheduled: the message waits for its send_at.
	EventScheduled EventType = "scheduled"
	// EventDeferred: an attempt failed temporarily; a retry is due.
	EventDeferred EventType = "deferred"
	// EventDelivered: the receiving server took the message.
	EventDelivered EventType = "delivered"
	// EventBounced: the recipient was refused for good, during the session
	// or later by a bounce message; Class and Permanent say how.
	EventBounced EventType = "bounced"
	// EventFailed: delivery was given up.
	EventFailed EventType = "failed"
	// EventCanceled: the recipient was canceled before it was delivered.
	EventCanceled EventType = "canceled"
	// EventSuppressed: the recipient's address was put on its project's
	// suppression list (by this recipient's hard bounce or complaint), or,
	// from the intake check, the recipient was not sent to because its
	// address is on it; Reason says why.
	EventSuppressed EventType = "suppressed"
	// EventComplained: the recipient reported the message as spam (a
	// feedback loop report).
	EventComplained EventType = "complained"
	// EventDelayed: a delivery status notification (RFC 3464) reported the
	// message delayed on the way; the DSN fields say where and why.
	EventDelayed EventType = "delayed"
	// EventAutoReplied: the recipient's mailbox answered automatically
	// (vacation notices, RFC 3834).
	EventAutoReplied EventType = "auto_replied"
)

// EventTypes lists every event type, in the order of the constants. The
// events table's CHECK constraint allows exactly these.
var EventTypes = []EventType{
	EventAccepted, EventScheduled, EventDeferred, EventDelivered, EventBounced, EventFailed, EventCanceled,
	EventSuppressed, EventComplained, EventDelayed, EventAutoReplied,
}

// ParseEventType returns the event type named s, and false when there is
// none.
func ParseEventType(s string) (EventType, bool) {
	for _, t := range EventTypes {
		if string(t) == s {
			return t, true
		}
	}
	return "", false
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

	// Class is what kind of refusal a bounce was (see
	// delivery.BounceClass): "recipient", "mailbox_full", "policy",
	// "rate_limit", ... (bounced; deferred when a 5yz reply was taken as
	// temporary; suppressed).
	Class string `json:"class,omitempty"`
	// Permanent says whether the refusal is for good: a hard bounce rather
	// than a soft one (bounced, suppressed).
	Permanent bool `json:"permanent,omitempty"`
	// Reason says why the address is suppressed: hard_bounce, complaint or
	// manual (suppressed); for complained, the feedback report's
	// Feedback-Type (RFC 5965 section 3.1), such as abuse.
	Reason string `json:"reason,omitempty"`

	// The fields of a delivery status notification's per-recipient part
	// (RFC 3464 section 2.3), for events learnt from one (bounced, delayed).

	// DSNAction is the Action field: failed, delayed, delivered, relayed
	// or expanded.
	DSNAction string `json:"dsn_action,omitempty"`
	// DSNStatus is the Status field, an RFC 3463 code such as "4.4.7".
	DSNStatus string `json:"dsn_status,omitempty"`
	// RemoteMTA is the Remote-MTA field without its type, e.g.
	// "mx.example.net".
	RemoteMTA string `json:"remote_mta,omitempty"`
	// DiagnosticCode is the Diagnostic-Code field without its type: the
	// remote server's own reply.
	DiagnosticCode string `json:"diagnostic_code,omitempty"`
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
		Class:        o.Class,
		Permanent:    o.Permanent,
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

// ReadEventsParams says where to read the event feed and which events to
// keep.
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
	// Types keeps events of these types; empty keeps every type.
	Types []EventType
	// Tags keeps events of messages that carry at least one of these tags;
	// empty keeps events of every message.
	Tags []string
}

// DefaultReadEventsLimit is the ReadEvents page size when Limit is not set.
const DefaultReadEventsLimit = 100

// FilterScanBudget is the most events one filtered read (Types or Tags set)
// looks at, matching or not, when Limit is smaller. It bounds the work of a
// read whose filter matches rarely: such a read may return fewer events
// than Limit, even none, together with a cursor past everything it looked
// at and More set.
const FilterScanBudget = 1000

// EventPage is what one read of the feed returned.
type EventPage struct {
	// Events are the events read, in feed order.
	Events []Event
	// Next is where to continue: the position of the last event looked at,
	// which with a filter may be past the last event returned, so the next
	// read does not look at the skipped events again. It is the read's
	// After when nothing was looked at.
	Next EventCursor
	// More reports that the read stopped at its limit or scan budget rather
	// than at the end of what the feed can show now: reading on at once may
	// return more.
	More bool
}

// The feed is read in (txid, id) order, and only rows of transactions that
// ended before the oldest one still running: any transaction that has yet
// to commit has a txid at or above that bound, so nothing can appear behind
// a position once it was read past. A transaction running long holds the
// feed back until it ends (a rolled-back one too: its rows never show, and
// the bound moves on). The reader's own transaction, if it wrote, is in
// flight and bounds itself.
const (
	eventColumns = `e.id, e.txid, e.project_id, e.message_id, e.recipient_id, e.type, e.details, e.created_at`

	feedAfter = `
  AND (e.txid, e.id) > (@after_txid::xid8, @after_id::bigint)
  AND e.txid < pg_snapshot_xmin(pg_current_snapshot())`

	readEventsSQL = `
SELECT ` + eventColumns + ` FROM events e
WHERE true` + feedAfter + `
ORDER BY e.txid, e.id
LIMIT @limit`

	// One project's feed, by events_project_txid_id_idx.
	readProjectEventsSQL = `
SELECT ` + eventColumns + ` FROM events e
WHERE e.project_id = @project_id` + feedAfter + `
ORDER BY e.txid, e.id
LIMIT @limit`

	// One message's events are few: events_message_id_idx finds them and
	// the sort is cheap.
	messageScope = `e.message_id = @message_id
  AND (@project_id::uuid = '00000000-0000-0000-0000-000000000000' OR e.project_id = @project_id)`

	readMessageEventsSQL = `
SELECT ` + eventColumns + ` FROM events e
WHERE ` + messageScope + feedAfter + `
ORDER BY e.txid, e.id
LIMIT @limit`

	// A filtered read looks at up to @scan events in feed order (scanned),
	// marks those the filter wants, and keeps everything up to the
	// @limit-th wanted one (kept). It returns the wanted events and, as a
	// position marker, the last event kept, so that the caller learns how
	// far it looked. The filter is evaluated on ids and types, and on the
	// message's tags by primary key, before any payload is read.
	filteredHead = `
WITH scanned AS (
    SELECT e.id, e.txid,
        (cardinality(@types::text[]) = 0 OR e.type = ANY(@types::text[]))
        AND (cardinality(@tags::text[]) = 0 OR EXISTS (
            SELECT 1 FROM messages m WHERE m.id = e.message_id AND m.tags && @tags::text[])) AS wanted
    FROM events e
    WHERE `
	filteredTail = feedAfter + `
    ORDER BY e.txid, e.id
    LIMIT @scan
), counted AS (
    SELECT id, txid, wanted, row_number() OVER w AS n,
        count(*) FILTER (WHERE wanted) OVER w - wanted::int AS wanted_before
    FROM scanned
    WINDOW w AS (ORDER BY txid, id)
), kept AS (
    SELECT id, txid, wanted, n FROM counted WHERE wanted_before < @limit
)
SELECT ` + eventColumns + `, k.wanted, (SELECT count(*) FROM scanned)
FROM kept k JOIN events e ON e.id = k.id
WHERE k.wanted OR k.n = (SELECT max(n) FROM kept)
ORDER BY k.txid, k.id`

	readFilteredEventsSQL        = filteredHead + `true` + filteredTail
	readFilteredProjectEventsSQL = filteredHead + `e.project_id = @project_id` + filteredTail
	readFilteredMessageEventsSQL = filteredHead + messageScope + filteredTail
)

// ReadEvents returns the events after p.After in commit-safe order, and the
// cursor to continue from (see EventPage.Next). Reading on from the
// returned cursor never skips an event, whatever order their transactions
// committed in; an event shows once every transaction that began before its
// own has ended.
func (d *DB) ReadEvents(ctx context.Context, p ReadEventsParams) ([]Event, EventCursor, error) {
	page, err := d.ReadEventPage(ctx, p)
	if err != nil {
		return nil, p.After, err
	}
	return page.Events, page.Next, nil
}

// ReadEventPage is ReadEvents, also reporting whether more events could be
// read at once.
func (d *DB) ReadEventPage(ctx context.Context, p ReadEventsParams) (EventPage, error) {
	limit := p.Limit
	if limit <= 0 {
		limit = DefaultReadEventsLimit
	}
	args := pgx.NamedArgs{"after_txid": p.After.txid, "after_id": p.After.id}
	if len(p.Types) > 0 || len(p.Tags) > 0 {
		return d.readFiltered(ctx, p, limit, args)
	}
	// One row more than asked tells whether more follow.
	args["limit"] = limit + 1
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
		return EventPage{Next: p.After}, fmt.Errorf("read events: %w", mapError(err))
	}
	page := EventPage{Events: events, Next: p.After}
	if len(events) > limit {
		page.Events, page.More = events[:limit], true
	}
	if n := len(page.Events); n > 0 {
		page.Next = page.Events[n-1].Cursor
	}
	return page, nil
}

func (d *DB) readFiltered(ctx context.Context, p ReadEventsParams, limit int, args pgx.NamedArgs) (EventPage, error) {
	types := make([]string, len(p.Types))
	for i, t := range p.Types {
		types[i] = string(t)
	}
	tags := p.Tags
	if tags == nil {
		tags = []string{}
	}
	scan := max(limit, FilterScanBudget)
	args["limit"], args["scan"], args["types"], args["tags"] = limit, scan, types, tags
	query := readFilteredEventsSQL
	switch {
	case p.MessageID != uuid.Nil:
		query = readFilteredMessageEventsSQL
		args["message_id"] = p.MessageID
		args["project_id"] = p.ProjectID
	case p.ProjectID != uuid.Nil:
		query = readFilteredProjectEventsSQL
		args["project_id"] = p.ProjectID
	}
	page := EventPage{Next: p.After}
	var scanned int
	rows, _ := d.pool.Query(ctx, query, args)
	defer rows.Close()
	for rows.Next() {
		var wanted bool
		e, err := scanEventInto(rows, &wanted, &scanned)
		if err != nil {
			return EventPage{Next: p.After}, fmt.Errorf("read events: %w", err)
		}
		page.Next = e.Cursor
		if wanted {
			page.Events = append(page.Events, e)
		}
	}
	if err := rows.Err(); err != nil {
		return EventPage{Next: p.After}, fmt.Errorf("read events: %w", mapError(err))
	}
	page.More = len(page.Events) == limit || scanned == scan
	return page, nil
}

// EventHead returns the position of the last event the feed can show now,
// over every project: the feed moved on exactly when it changes. It reads
// one entry at the end of events_txid_id_idx, so it is cheap enough to ask
// often.
func (d *DB) EventHead(ctx context.Context) (EventCursor, error) {
	var c EventCursor
	err := d.pool.QueryRow(ctx, eventHeadSQL).Scan(&c.txid, &c.id)
	if errors.Is(err, pgx.ErrNoRows) {
		return EventCursor{}, nil
	}
	if err != nil {
		return EventCursor{}, fmt.Errorf("read event head: %w", mapError(err))
	}
	return c, nil
}

const eventHeadSQL = `
SELECT e.txid, e.id FROM events e
WHERE e.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.txid DESC, e.id DESC
LIMIT 1`

// MessageTimeline is a message's status and every event of it committed so
// far.
type MessageTimeline struct {
	// Status is the message's derived status.
	Status string
	// Final reports that every recipient is final: delivered, bounced,
	// failed or canceled. Events that come after (a complaint, a late
	// bounce) may still follow.
	Final bool
	// Events are in the order they were written. Their Cursor is not set:
	// the timeline shows events as soon as they commit, before the feed may
	// show them, so a position taken from here could skip events in the
	// feed.
	Events []Event
}

// One statement, so the status and the events are of one snapshot: when
// the status is final, the events of every change that made it so are
// there too, since each change writes its events in its own transaction.
const messageTimelineSQL = `
SELECT m.status, ` + eventColumns + `
FROM messages m LEFT JOIN events e ON e.message_id = m.id
WHERE m.id = @message_id AND m.project_id = @project_id
ORDER BY e.id`

// MessageTimeline returns the status and the committed events of one
// message of a project (uuid.Nil: the default project), or ErrNotFound when
// the project has no such message. Unlike the feed, it shows an event as
// soon as its transaction commits.
func (d *DB) MessageTimeline(ctx context.Context, projectID, messageID uuid.UUID) (MessageTimeline, error) {
	rows, _ := d.pool.Query(ctx, messageTimelineSQL, pgx.NamedArgs{
		"message_id": messageID, "project_id": projectOrDefault(projectID),
	})
	defer rows.Close()
	var (
		tl    MessageTimeline
		found bool
	)
	for rows.Next() {
		found = true
		var (
			id          *int64
			txid        *uint64
			project     *uuid.UUID
			message     *uuid.UUID
			recipientID *uuid.UUID
			typ         *string
			details     []byte
			createdAt   *time.Time
		)
		if err := rows.Scan(&tl.Status, &id, &txid, &project, &message, &recipientID, &typ, &details, &createdAt); err != nil {
			return MessageTimeline{}, fmt.Errorf("message %s timeline: %w", messageID, mapError(err))
		}
		if id == nil {
			continue // the message has no events yet
		}
		e := Event{ID: *id, Type: EventType(*typ), ProjectID: *project, MessageID: *message, CreatedAt: *createdAt}
		if recipientID != nil {
			e.RecipientID = *recipientID
		}
		if err := json.Unmarshal(details, &e.Payload); err != nil {
			return MessageTimeline{}, fmt.Errorf("message %s timeline: event %d: decode payload: %w", messageID, e.ID, err)
		}
		tl.Events = append(tl.Events, e)
	}
	if err := rows.Err(); err != nil {
		return MessageTimeline{}, fmt.Errorf("message %s timeline: %w", messageID, mapError(err))
	}
	if !found {
		return MessageTimeline{}, fmt.Errorf("message %s timeline: %w", messageID, ErrNotFound)
	}
	tl.Final = finalMessageStatus(tl.Status)
	return tl, nil
}

// finalMessageStatus reports whether a derived message status means every
// recipient is final.
func finalMessageStatus(s string) bool {
	switch s {
	case StatusDelivered, StatusBounced, StatusFailed, StatusCanceled, MessagePartiallyDelivered:
		return true
	}
	return false
}

func scanEvent(row pgx.CollectableRow) (Event, error) {
	return scanEventInto(row)
}

// scanEventInto scans eventColumns and then any extra columns into extra.
func scanEventInto(row pgx.Row, extra ...any) (Event, error) {
	var (
		e           Event
		recipientID *uuid.UUID
		details     []byte
	)
	dest := append([]any{&e.ID, &e.Cursor.txid, &e.ProjectID, &e.MessageID, &recipientID, &e.Type, &details, &e.CreatedAt}, extra...)
	if err := row.Scan(dest...); err != nil {
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
