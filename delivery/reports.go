package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/bounce"
)

// ReportHandler is the bounce listener's Handler: it applies each received
// report (a delivery status notification, a complaint, an automatic reply)
// to the message its VERP token names, in one transaction per report.
//
// What a report does:
//
//   - DSN, Action failed (RFC 3464 section 2.3.3), and a bounce in plain
//     text: the recipient becomes bounced, whatever its status but bounced
//     and canceled (see db.ApplyReport), with the class ClassifyBounce gives
//     its Status and Diagnostic-Code, and a bounced event with the DSN
//     fields; a permanent recipient or mailbox_disabled bounce suppresses
//     the address.
//   - DSN, Action delayed: a delayed event, nothing else.
//   - DSN, Action delivered, relayed or expanded: nothing but a log line.
//     They answer NOTIFY=SUCCESS (RFC 3461 section 4.1), which Posthaste
//     never asks for, and what they say (a server took the message) the
//     delivered event already said.
//   - Complaint (RFC 5965 feedback report): a complained event and a
//     suppression entry; the recipient's status stays as it is.
//     Feedback-Type not-spam and auth-failure (RFC 6591) are not complaints
//     and are only logged.
//   - Automatic reply (RFC 3834): an auto_replied event.
//   - Anything else: a log line.
//
// The recipient is the token's when the token names one. Otherwise (the
// transaction had several recipients) it is the message's recipient whose
// address the report gives: a DSN's Final-Recipient or Original-Recipient,
// a feedback report's Original-Rcpt-To, an automatic reply's From. A report
// that matches none changes no recipient: a delay, a complaint or an
// automatic reply becomes an event of the whole message, a bounce is only
// logged (a bounced event without a recipient would read as a bounce of
// nobody in particular).
type ReportHandler struct {
	store *db.DB
	log   *slog.Logger
}

// NewReportHandler returns a handler that writes to store and logs to log
// (nil discards).
func NewReportHandler(store *db.DB, log *slog.Logger) *ReportHandler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &ReportHandler{store: store, log: log}
}

var _ bounce.Handler = (*ReportHandler)(nil)

// HandleReport applies rep to the message tok names. A report about a
// message that no longer exists is accepted and dropped: refusing it would
// only make its sender try again for days. A database error is returned,
// so the listener answers 451 and the sender retries; a retry of a report
// that was applied adds nothing (see db.ApplyReport).
func (h *ReportHandler) HandleReport(ctx context.Context, tok bounce.Token, rep bounce.Report) error {
	return h.store.InTx(ctx, func(tx *db.DB) error {
		target, err := tx.ReportTarget(ctx, tok.Message)
		if errors.Is(err, db.ErrNotFound) {
			h.log.Warn("bounce report for a message that does not exist", "message_id", tok.Message, "kind", rep.Kind)
			return nil
		}
		if err != nil {
			return err
		}
		plan := planReport(target, tok, rep)
		for _, n := range plan.notes {
			h.log.Info("bounce report: "+n, "message_id", tok.Message, "kind", rep.Kind)
		}
		if len(plan.changes) == 0 {
			return nil
		}
		res, err := tx.ApplyReport(ctx, db.ApplyReportParams{MessageID: tok.Message, Changes: plan.changes})
		if err != nil {
			return err
		}
		h.log.Info("bounce report applied", "message_id", tok.Message, "kind", rep.Kind,
			"bounced", res.Bounced, "suppressed", res.Suppressed, "events", res.Events)
		return nil
	})
}

// reportPlan is what a report does to its message: the changes to apply,
// and notes for the log about what it leaves out.
type reportPlan struct {
	changes []db.ReportChange
	notes   []string
	seen    map[planKey]bool
}

type planKey struct {
	rcpt  uuid.UUID
	event db.EventType
}

// add appends c unless the report already has a change of the same kind
// for the same recipient (a DSN may list one address twice, an expanded
// alias several times): the first one stands.
func (p *reportPlan) add(c db.ReportChange) {
	k := planKey{c.RecipientID, c.Event}
	if p.seen[k] {
		return
	}
	p.seen[k] = true
	p.changes = append(p.changes, c)
}

func (p *reportPlan) note(format string, args ...any) {
	p.notes = append(p.notes, fmt.Sprintf(format, args...))
}

// planReport decides what rep does to target, the message tok names. It
// reads nothing and writes nothing.
func planReport(target db.ReportTarget, tok bounce.Token, rep bounce.Report) reportPlan {
	p := reportPlan{seen: make(map[planKey]bool)}
	var named *db.ReportRecipient
	if tok.Recipient.Valid {
		for i := range target.Recipients {
			if uint32(target.Recipients[i].Position) == tok.Recipient.Position && target.Recipients[i].Position >= 0 {
				named = &target.Recipients[i]
			}
		}
		if named == nil {
			p.note("token names recipient position %d, which the message does not have", tok.Recipient.Position)
			return p
		}
	}
	// find returns the recipient a report part is about: the token's, or
	// the first of addrs that is one of the message's recipients.
	find := func(addrs ...string) *db.ReportRecipient {
		if named != nil {
			return named
		}
		for _, a := range addrs {
			a = strings.TrimSpace(a)
			if a == "" {
				continue
			}
			for i := range target.Recipients {
				if strings.EqualFold(target.Recipients[i].Address, a) {
					return &target.Recipients[i]
				}
			}
		}
		return nil
	}

	switch rep.Kind {
	case bounce.KindDSN, bounce.KindUnstructuredBounce:
		if len(rep.Recipients) == 0 {
			p.note("report lists no recipient")
		}
		for _, e := range rep.Recipients {
			r := find(e.FinalRecipient, e.OriginalRecipient)
			action := e.Action
			if rep.Kind == bounce.KindUnstructuredBounce && action == "" {
				// A plain-text bounce is a failure even when no code was
				// found in it; permanent only with a 5 code (below).
				action = "failed"
			}
			switch action {
			case "failed":
				if r == nil {
					p.note("bounce for %q, not a recipient of the message: nothing changed", e.FinalRecipient)
					continue
				}
				p.add(bounceChange(r.ID, e))
			case "delayed":
				var id uuid.UUID
				if r != nil {
					id = r.ID
				}
				p.add(db.ReportChange{RecipientID: id, Event: db.EventDelayed, Payload: dsnPayload(e)})
			default:
				// delivered, relayed, expanded: see ReportHandler.
				p.note("DSN action %q for %q: nothing recorded", e.Action, e.FinalRecipient)
			}
		}
	case bounce.KindComplaint:
		if rep.Feedback != nil {
			switch rep.Feedback.Type {
			case "not-spam", "auth-failure":
				p.note("feedback report of type %q: not a complaint", rep.Feedback.Type)
				return p
			}
		}
		addrs := make([]string, 0, len(rep.Recipients))
		for _, e := range rep.Recipients {
			addrs = append(addrs, e.FinalRecipient, e.OriginalRecipient)
		}
		if rep.Feedback != nil {
			addrs = append(addrs, rep.Feedback.OriginalRcptTo...)
		}
		payload := db.EventPayload{RemoteMTA: rep.ReportingMTA}
		if rep.Feedback != nil {
			payload.Reason = rep.Feedback.Type
		}
		if r := find(addrs...); r != nil {
			p.add(db.ReportChange{RecipientID: r.ID, Event: db.EventComplained, Payload: payload,
				Suppress: db.SuppressionComplaint})
		} else {
			p.note("complaint names no recipient of the message: recorded on the message, nothing suppressed")
			p.add(db.ReportChange{Event: db.EventComplained, Payload: payload})
		}
	case bounce.KindAutoReply:
		var id uuid.UUID
		if r := find(rep.From); r != nil {
			id = r.ID
		}
		p.add(db.ReportChange{RecipientID: id, Event: db.EventAutoReplied, Payload: db.EventPayload{Text: rep.Subject}})
	default:
		p.note("not a bounce, complaint or automatic reply: nothing recorded")
	}
	return p
}

// bounceChange is the change a failed DSN part (or a plain-text bounce)
// makes to recipient id.
func bounceChange(id uuid.UUID, e bounce.RecipientReport) db.ReportChange {
	c := ClassifyBounce(e.ReplyCode, e.Status, e.Diagnostic)
	payload := dsnPayload(e)
	payload.Outcome = db.StatusBounced
	payload.Class, payload.Permanent = string(c.Class), c.Permanent
	change := db.ReportChange{RecipientID: id, Event: db.EventBounced, Payload: payload,
		Code: e.ReplyCode, EnhancedCode: e.Status, Text: payload.Text}
	if BounceSuppression(c.Class, c.Permanent) != SuppressionNone {
		change.Suppress = db.SuppressionHardBounce
	}
	return change
}

// replyText is a diagnostic without the reply code and enhanced code it
// starts with ("550 5.1.1 text", RFC 5321 section 4.2, RFC 2034 section
// 4): the event's reply carries those in fields of their own, as the
// replies recorded during delivery do. The DSN's Diagnostic-Code keeps
// them.
func replyText(diag string) string {
	rest := strings.TrimSpace(diag)
	if len(rest) >= 4 && (rest[3] == ' ' || rest[3] == '-') && isDigits(rest[:3]) {
		rest = strings.TrimLeft(rest[3:], " -")
	}
	if first, after, ok := strings.Cut(rest, " "); ok && isEnhancedCode(first) {
		rest = strings.TrimSpace(after)
	}
	return rest
}

func isDigits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return s != ""
}

// dsnPayload carries a DSN part's fields (RFC 3464 section 2.3) into an
// event: the reply the diagnostic quotes as the event's reply, and the DSN
// fields as they were.
func dsnPayload(e bounce.RecipientReport) db.EventPayload {
	return db.EventPayload{
		Code:           e.ReplyCode,
		EnhancedCode:   e.Status,
		Text:           replyText(e.Diagnostic),
		DSNAction:      e.Action,
		DSNStatus:      e.Status,
		RemoteMTA:      e.RemoteMTA,
		DiagnosticCode: e.Diagnostic,
	}
}
