package db

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// SuppressionReason says why an address is on a project's suppression list.
type SuppressionReason string

// The suppression reasons; the suppressions table's CHECK constraint allows
// exactly these.
const (
	// SuppressionHardBounce: the address bounced permanently for a reason
	// about the address itself (it does not exist, or its mailbox is
	// disabled).
	SuppressionHardBounce SuppressionReason = "hard_bounce"
	// SuppressionComplaint: the recipient reported a message as spam.
	SuppressionComplaint SuppressionReason = "complaint"
	// SuppressionManual: an operator added the address.
	SuppressionManual SuppressionReason = "manual"
)

// SuppressionAddress is the form an address is stored and looked up in on
// the suppression list: trimmed and in lower case, the local part included.
// RFC 5321 section 2.4 allows case-sensitive local parts, but no mailbox
// provider has them, and one spelling per mailbox keeps one entry per
// mailbox. SQL applies the same rule with lower().
func SuppressionAddress(addr string) string {
	return strings.ToLower(strings.TrimSpace(addr))
}

// Suppression is one entry of a project's suppression list.
type Suppression struct {
	ID        uuid.UUID
	ProjectID uuid.UUID
	// Address is the normalized address (see SuppressionAddress), or the
	// domain when DomainWide is set.
	Address    string
	DomainWide bool
	Reason     SuppressionReason
	// MessageID and RecipientID name what caused the entry; uuid.Nil when
	// nothing did (a manual entry).
	MessageID   uuid.UUID
	RecipientID uuid.UUID
	// The reply or DSN status that caused the entry, when there was one.
	Code         int
	EnhancedCode string
	Text         string
	CreatedAt    time.Time
	// ExpiresAt ends the entry; nil never does.
	ExpiresAt *time.Time
}

// insertSuppressionsSQL adds the rows of a CTE named supp_rows (id,
// project_id, address, reason, message_id, recipient_id, code,
// enhanced_code, text; one row per project and address) to the suppression
// list. An entry that exists keeps its first reason and evidence, unless it
// expired: an expired entry is renewed. It returns the recipient_id of
// every entry added or renewed, which suppressedEventsSQL turns into
// suppressed events. Both statements that suppress (RecordOutcomes and
// ApplyReport) use it, so the rule lives here once.
const insertSuppressionsSQL = `INSERT INTO suppressions AS s (id, project_id, address, reason, message_id, recipient_id,
        code, enhanced_code, text)
    SELECT id, project_id, address, reason, message_id, recipient_id,
        nullif(code, 0), nullif(enhanced_code, ''), nullif(text, '')
    FROM supp_rows
    ON CONFLICT (project_id, address, domain_wide) DO UPDATE
    SET reason = excluded.reason, message_id = excluded.message_id, recipient_id = excluded.recipient_id,
        code = excluded.code, enhanced_code = excluded.enhanced_code, text = excluded.text,
        created_at = now(), expires_at = NULL
    WHERE s.expires_at IS NOT NULL AND s.expires_at <= now()
    RETURNING s.recipient_id`

// suppressedEventsSQL is the part of new_events that reports the entries
// supp added: supp_rows carries each one's payload in its event column.
const suppressedEventsSQL = `SELECT sr.project_id, sr.message_id, sr.recipient_id, 'suppressed', sr.event
    FROM supp_rows sr WHERE sr.recipient_id IN (SELECT recipient_id FROM supp)`

// suppressedPayload is the payload of the suppressed event an entry writes.
func suppressedPayload(reason SuppressionReason, class string, permanent bool, code int, enhanced, text string) EventPayload {
	return EventPayload{Reason: string(reason), Class: class, Permanent: permanent,
		Code: code, EnhancedCode: enhanced, Text: text}
}

const getSuppressionSQL = `
SELECT id, project_id, address, domain_wide, reason, coalesce(message_id, '00000000-0000-0000-0000-000000000000'),
    coalesce(recipient_id, '00000000-0000-0000-0000-000000000000'), coalesce(code, 0),
    coalesce(enhanced_code, ''), coalesce(text, ''), created_at, expires_at
FROM suppressions
WHERE project_id = $1 AND address = $2 AND NOT domain_wide`

// GetSuppression returns the project's entry for address (normalized with
// SuppressionAddress), expired or not, or ErrNotFound. Domain-wide entries
// are not consulted.
func (d *DB) GetSuppression(ctx context.Context, projectID uuid.UUID, address string) (Suppression, error) {
	var s Suppression
	var reason string
	err := d.pool.QueryRow(ctx, getSuppressionSQL, projectOrDefault(projectID), SuppressionAddress(address)).Scan(
		&s.ID, &s.ProjectID, &s.Address, &s.DomainWide, &reason, &s.MessageID, &s.RecipientID,
		&s.Code, &s.EnhancedCode, &s.Text, &s.CreatedAt, &s.ExpiresAt)
	if err != nil {
		return Suppression{}, fmt.Errorf("get suppression of %s: %w", address, mapError(err))
	}
	s.Reason = SuppressionReason(reason)
	return s, nil
}

// ReportTarget is the message a received report (a bounce, a complaint, an
// automatic reply) is about, with every recipient, in position order.
type ReportTarget struct {
	MessageID  uuid.UUID
	ProjectID  uuid.UUID
	Recipients []ReportRecipient
}

// ReportRecipient is one recipient of a ReportTarget.
type ReportRecipient struct {
	ID       uuid.UUID
	Position int
	Address  string
	Status   string
}

const reportTargetSQL = `
SELECT m.project_id, r.id, r.position, r.address, r.status
FROM messages m JOIN recipients r ON r.message_id = m.id
WHERE m.id = $1
ORDER BY r.position`

// ReportTarget returns the message with the given id and its recipients, or
// ErrNotFound. It reads without locking: ApplyReport checks each
// recipient's status again as it changes it.
func (d *DB) ReportTarget(ctx context.Context, messageID uuid.UUID) (ReportTarget, error) {
	rows, _ := d.pool.Query(ctx, reportTargetSQL, messageID)
	t := ReportTarget{MessageID: messageID}
	var r ReportRecipient
	_, err := pgx.ForEachRow(rows, []any{&t.ProjectID, &r.ID, &r.Position, &r.Address, &r.Status}, func() error {
		t.Recipients = append(t.Recipients, r)
		return nil
	})
	if err != nil {
		return ReportTarget{}, fmt.Errorf("report target %s: %w", messageID, mapError(err))
	}
	if len(t.Recipients) == 0 {
		return ReportTarget{}, fmt.Errorf("report target %s: %w", messageID, ErrNotFound)
	}
	return t, nil
}

// ReportChange is what one part of a received report does to a message.
type ReportChange struct {
	// RecipientID is the recipient the part is about; uuid.Nil makes it an
	// event of the whole message (a report that names the message but no
	// recipient of it). Such a change may not bounce or suppress.
	RecipientID uuid.UUID
	// Event is the event written: EventBounced, EventDelayed,
	// EventComplained or EventAutoReplied.
	Event   EventType
	Payload EventPayload
	// Code, EnhancedCode and Text become a bounced recipient's last reply,
	// and a suppression entry's evidence. Code is 0 when the report gave
	// none.
	Code         int
	EnhancedCode string
	Text         string
	// Suppress adds the recipient's address to the project's suppression
	// list, with a suppressed event when the entry is new.
	Suppress SuppressionReason
}

// ApplyReportParams is one received report's changes to one message.
type ApplyReportParams struct {
	MessageID uuid.UUID
	Changes   []ReportChange
}

// ReportResult says what ApplyReport changed.
type ReportResult struct {
	// Bounced counts the recipients that became bounced.
	Bounced int
	// Suppressed counts the suppression entries added or renewed.
	Suppressed int
	// Events counts the events written, suppressed events included.
	Events int
}

// applyReportSQL applies the changes of one report to one message.
//
// A bounce makes its recipient bounced from any status but bounced (the
// same report again, or a bounce already recorded), canceled (the caller's
// decision stands) and suppressed (never sent, so no report is about it). That includes delivered: the receiving server
// took the message and gave up on it later. It includes the waiting and
// in-flight statuses too, since a late report can be about an earlier
// attempt: a deferred or queued row loses its next attempt, and a sending
// row loses its lease, so the worker that holds it has its outcome fenced
// off (RecordOutcomes applies only to sending rows of its owner) and its
// next lease renewal no longer finds the row. The bounced event is written
// only for rows this statement changed.
//
// Other events are written unless an event of the same recipient, type
// and payload exists: the listener's sender retries a report it got no
// answer to, and the report must then add nothing. Suppression follows
// insertSuppressionsSQL, whatever became of the recipient's status.
const applyReportSQL = `
WITH input AS (
    SELECT nullif(c.recipient_id, '00000000-0000-0000-0000-000000000000'::uuid) AS recipient_id,
        c.type, c.event, c.code, c.enhanced_code, c.text, c.ord
    FROM unnest(@recipient_ids::uuid[], @types::text[], @events::jsonb[], @codes::integer[],
        @enhanced_codes::text[], @texts::text[])
        WITH ORDINALITY AS c(recipient_id, type, event, code, enhanced_code, text, ord)
), msg AS (
    SELECT id, project_id FROM messages WHERE id = @message_id
), bounced AS (
    UPDATE recipients r
    SET status = 'bounced',
        next_attempt_at = NULL,
        lease_owner = NULL,
        lease_until = NULL,
        last_code = nullif(c.code, 0),
        last_enhanced_code = c.enhanced_code,
        last_text = c.text,
        updated_at = now()
    FROM input c
    WHERE c.type = 'bounced' AND r.id = c.recipient_id AND r.message_id = @message_id
      AND r.status NOT IN ('bounced', 'canceled', 'suppressed')
    RETURNING r.id
), supp_input AS (
    SELECT * FROM unnest(@supp_recipient_ids::uuid[], @supp_ids::uuid[], @supp_reasons::text[],
        @supp_events::jsonb[], @supp_codes::integer[], @supp_enhanced_codes::text[], @supp_texts::text[])
        AS s(recipient_id, id, reason, event, code, enhanced_code, text)
), supp_rows AS (
    SELECT DISTINCT ON (lower(r.address))
        si.id, msg.project_id, lower(r.address) AS address, si.reason, r.message_id,
        r.id AS recipient_id, si.code, si.enhanced_code, si.text, si.event
    FROM supp_input si
    JOIN recipients r ON r.id = si.recipient_id AND r.message_id = @message_id
    CROSS JOIN msg
    ORDER BY lower(r.address), r.id
), supp AS (
    ` + insertSuppressionsSQL + `
), new_events AS (
    SELECT msg.project_id, msg.id AS message_id, c.recipient_id, c.type, c.event AS details
    FROM input c CROSS JOIN msg
    WHERE CASE
        WHEN c.type = 'bounced' THEN c.recipient_id IN (SELECT id FROM bounced)
        ELSE NOT EXISTS (
            SELECT 1 FROM events e
            WHERE e.message_id = msg.id AND e.recipient_id IS NOT DISTINCT FROM c.recipient_id
              AND e.type = c.type AND e.details = c.event)
    END
    UNION ALL
    ` + suppressedEventsSQL + `
), ` + writeEventsCTE + `
SELECT (SELECT count(*) FROM bounced), (SELECT count(*) FROM supp), (SELECT count(*) FROM new_events)`

// ApplyReport applies the changes a received report makes to one message
// (see applyReportSQL for which changes apply), in one round trip: the
// recipients it changes are locked in id order, the changes and their
// events written, and the message's status recomputed, as RecordOutcomes
// does. Run it with ReportTarget inside InTx to act on one snapshot of the
// message. A message that does not exist changes nothing.
func (d *DB) ApplyReport(ctx context.Context, p ApplyReportParams) (ReportResult, error) {
	if len(p.Changes) == 0 {
		return ReportResult{}, nil
	}
	n := len(p.Changes)
	var (
		rcptIDs  = make([]uuid.UUID, 0, n)
		types    = make([]string, 0, n)
		events   = make([]string, 0, n)
		codes    = make([]int32, 0, n)
		enhanced = make([]string, 0, n)
		texts    = make([]string, 0, n)
		locked   []uuid.UUID
		supp     struct {
			rcpts, ids                  []uuid.UUID
			reasons, events, enh, texts []string
			codes                       []int32
		}
	)
	for i, c := range p.Changes {
		switch c.Event {
		case EventBounced, EventDelayed, EventComplained, EventAutoReplied:
		default:
			return ReportResult{}, fmt.Errorf("apply report: changes[%d]: event %q is not bounced, delayed, complained or auto_replied", i, c.Event)
		}
		if c.RecipientID == uuid.Nil && (c.Event == EventBounced || c.Suppress != "") {
			return ReportResult{}, fmt.Errorf("apply report: changes[%d]: a bounce or suppression needs a recipient", i)
		}
		event, err := encodePayload(c.Payload)
		if err != nil {
			return ReportResult{}, fmt.Errorf("apply report: %w", err)
		}
		rcptIDs = append(rcptIDs, c.RecipientID)
		types = append(types, string(c.Event))
		events = append(events, event)
		codes = append(codes, int32(c.Code))
		enhanced = append(enhanced, c.EnhancedCode)
		texts = append(texts, c.Text)
		if c.Event == EventBounced {
			locked = append(locked, c.RecipientID)
		}
		if c.Suppress != "" {
			id, err := uuid.NewV7()
			if err != nil {
				return ReportResult{}, fmt.Errorf("apply report: suppression id: %w", err)
			}
			ev, err := encodePayload(suppressedPayload(c.Suppress, c.Payload.Class, c.Payload.Permanent,
				c.Code, c.EnhancedCode, c.Text))
			if err != nil {
				return ReportResult{}, fmt.Errorf("apply report: %w", err)
			}
			supp.rcpts = append(supp.rcpts, c.RecipientID)
			supp.ids = append(supp.ids, id)
			supp.reasons = append(supp.reasons, string(c.Suppress))
			supp.events = append(supp.events, ev)
			supp.codes = append(supp.codes, int32(c.Code))
			supp.enh = append(supp.enh, c.EnhancedCode)
			supp.texts = append(supp.texts, c.Text)
		}
	}
	args := pgx.NamedArgs{
		"message_id": p.MessageID, "recipient_ids": rcptIDs, "types": types, "events": events,
		"codes": codes, "enhanced_codes": enhanced, "texts": texts,
		"supp_recipient_ids": supp.rcpts, "supp_ids": supp.ids, "supp_reasons": supp.reasons,
		"supp_events": supp.events, "supp_codes": supp.codes, "supp_enhanced_codes": supp.enh,
		"supp_texts": supp.texts,
	}
	b := &pgx.Batch{}
	b.Queue(lockRecipientsSQL, locked)
	b.Queue(applyReportSQL, args)
	var res ReportResult
	err := d.sendChange(ctx, b, messagesWithIDs([]uuid.UUID{p.MessageID}), func(br pgx.BatchResults) error {
		if _, err := br.Exec(); err != nil {
			return err
		}
		return br.QueryRow().Scan(&res.Bounced, &res.Suppressed, &res.Events)
	})
	if err != nil {
		return ReportResult{}, fmt.Errorf("apply report to message %s: %w", p.MessageID, mapError(err))
	}
	return res, nil
}
