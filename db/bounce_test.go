package db_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/db"
)

// eventPayloads returns a message's events of one type, oldest first.
func eventPayloads(t testing.TB, raw *pgxpool.Pool, messageID uuid.UUID, typ string) []db.EventPayload {
	t.Helper()
	rows, err := raw.Query(context.Background(),
		`SELECT details FROM events WHERE message_id = $1 AND type = $2 ORDER BY id`, messageID, typ)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []db.EventPayload
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			t.Fatal(err)
		}
		var p db.EventPayload
		if err := json.Unmarshal(b, &p); err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func bouncedOutcome(c db.ClaimedRecipient, code int, enhanced, text, class string, permanent bool, suppress db.SuppressionReason) db.Outcome {
	return db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: db.StatusBounced,
		Code: code, EnhancedCode: enhanced, Text: text, Class: class, Permanent: permanent, Suppress: suppress,
		Attempts: []db.NewAttempt{{StartedAt: time.Now(), MXHost: "mx.example.test", Code: code, EnhancedCode: enhanced, Text: text}}}
}

func TestRecordOutcomesSuppressesInTheSameStatement(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	first := newMessage(t, 3)
	insert(t, b.db, first)
	// A second message to the first's user0: both bounce in one batch, and
	// the address gets one entry.
	second := newMessage(t, 1)
	insert(t, b.db, second)
	// A third to user0, accepted before the address is suppressed (so the
	// intake lets it through) and due later.
	third := newMessage(t, 1)
	third.SendAt = time.Now().Add(time.Hour)
	insert(t, b.db, third)
	claimed := claimAll(t, b.db, time.Time{})
	byID := map[uuid.UUID]db.ClaimedRecipient{}
	for _, c := range claimed {
		byID[c.ID] = c
	}
	r0, r1, r2 := byID[first.Recipients[0].ID], byID[first.Recipients[1].ID], byID[first.Recipients[2].ID]
	s0 := byID[second.Recipients[0].ID]
	if r0.Position != 1 || r1.Position != 2 || r2.Position != 3 {
		t.Errorf("positions = %d %d %d, want 1 2 3", r0.Position, r1.Position, r2.Position)
	}
	outs := []db.Outcome{
		bouncedOutcome(r0, 550, "5.1.1", "user unknown", "recipient", true, db.SuppressionHardBounce),
		bouncedOutcome(r1, 550, "5.7.1", "too many messages", "rate_limit", false, ""),
		{RecipientID: r2.ID, LeaseOwner: r2.LeaseOwner, Status: db.StatusDelivered, Code: 250, Text: "ok"},
		bouncedOutcome(s0, 550, "5.1.1", "user unknown", "recipient", true, db.SuppressionHardBounce),
	}
	applied, err := b.db.RecordOutcomes(ctx, outs)
	if err != nil {
		t.Fatal(err)
	}
	if len(applied) != 4 {
		t.Fatalf("applied %d, want 4", len(applied))
	}

	s, err := b.db.GetSuppression(ctx, db.DefaultProjectID(), "USER0@d0.example.test")
	if err != nil {
		t.Fatalf("GetSuppression: %v", err)
	}
	if s.Reason != db.SuppressionHardBounce || s.Code != 550 || s.EnhancedCode != "5.1.1" || s.Address != "user0@d0.example.test" || s.DomainWide {
		t.Errorf("suppression = %+v", s)
	}
	if _, err := b.db.GetSuppression(ctx, db.DefaultProjectID(), "user1@d1.example.test"); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("rate-limit bounce suppressed: %v", err)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM suppressions`); n != 1 {
		t.Errorf("%d suppressions, want 1", n)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM events WHERE type = 'suppressed'`); n != 1 {
		t.Errorf("%d suppressed events, want 1 (one entry)", n)
	}
	bounced := eventPayloads(t, b.raw, first.ID, "bounced")
	if len(bounced) != 2 || bounced[0].Class != "recipient" || !bounced[0].Permanent ||
		bounced[1].Class != "rate_limit" || bounced[1].Permanent {
		t.Errorf("bounced payloads = %+v", bounced)
	}
	if got := eventTypes(t, b.raw, s.MessageID); !slices.Contains(got, "suppressed") {
		t.Errorf("the entry's message %s has events %v, want a suppressed one", s.MessageID, got)
	}

	// A later hard bounce of the same address adds no entry and no event;
	// one fenced off adds nothing either.
	c := claimAll(t, b.db, time.Now().Add(2*time.Hour))[0]
	stale := bouncedOutcome(c, 550, "5.1.1", "x", "recipient", true, db.SuppressionHardBounce)
	stale.LeaseOwner = "someone-else"
	if applied, err := b.db.RecordOutcomes(ctx, []db.Outcome{stale}); err != nil || len(applied) != 0 {
		t.Fatalf("fenced outcome: applied %v, err %v", applied, err)
	}
	if _, err := b.db.RecordOutcomes(ctx, []db.Outcome{bouncedOutcome(c, 550, "5.1.1", "x", "recipient", true, db.SuppressionHardBounce)}); err != nil {
		t.Fatal(err)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM events WHERE type = 'suppressed'`); n != 1 {
		t.Errorf("%d suppressed events after a repeat, want 1", n)
	}

	// An expired entry is renewed by the next hard bounce.
	if _, err := b.raw.Exec(ctx, `UPDATE suppressions SET expires_at = now() - interval '1 second'`); err != nil {
		t.Fatal(err)
	}
	fourth := newMessage(t, 1)
	insert(t, b.db, fourth)
	c = claimAll(t, b.db, time.Time{})[0]
	if _, err := b.db.RecordOutcomes(ctx, []db.Outcome{bouncedOutcome(c, 550, "5.1.1", "again", "recipient", true, db.SuppressionHardBounce)}); err != nil {
		t.Fatal(err)
	}
	s, err = b.db.GetSuppression(ctx, db.DefaultProjectID(), "user0@d0.example.test")
	if err != nil || s.ExpiresAt != nil || s.RecipientID != c.ID || s.Text != "again" {
		t.Errorf("renewed suppression = %+v, %v", s, err)
	}
	if got := eventTypes(t, b.raw, fourth.ID); !slices.Equal(got, []string{"accepted", "bounced", "suppressed"}) {
		t.Errorf("events = %v", got)
	}
}

func TestApplyReport(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 3)
	insert(t, b.db, m)
	var outs []db.Outcome
	for _, c := range claimAll(t, b.db, time.Time{}) {
		outs = append(outs, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: db.StatusDelivered, Code: 250})
	}
	if _, err := b.db.RecordOutcomes(ctx, outs); err != nil {
		t.Fatal(err)
	}
	target, err := b.db.ReportTarget(ctx, m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if target.ProjectID != db.DefaultProjectID() || len(target.Recipients) != 3 || target.Recipients[1].Position != 2 ||
		target.Recipients[1].Address != "user1@d1.example.test" || target.Recipients[1].Status != db.StatusDelivered {
		t.Fatalf("target = %+v", target)
	}
	r0, r1, r2 := m.Recipients[0].ID, m.Recipients[1].ID, m.Recipients[2].ID
	changes := []db.ReportChange{
		{RecipientID: r0, Event: db.EventBounced, Code: 550, EnhancedCode: "5.1.1", Text: "user unknown",
			Payload:  db.EventPayload{Outcome: "bounced", Class: "recipient", Permanent: true, DSNAction: "failed", DSNStatus: "5.1.1"},
			Suppress: db.SuppressionHardBounce},
		{RecipientID: r1, Event: db.EventDelayed, Payload: db.EventPayload{DSNAction: "delayed", DSNStatus: "4.4.7"}},
		{RecipientID: r2, Event: db.EventComplained, Payload: db.EventPayload{Reason: "abuse"}, Suppress: db.SuppressionComplaint},
		{Event: db.EventAutoReplied, Payload: db.EventPayload{Text: "out of office"}},
	}
	apply := func() db.ReportResult {
		t.Helper()
		var res db.ReportResult
		err := b.db.InTx(ctx, func(tx *db.DB) error {
			var err error
			res, err = tx.ApplyReport(ctx, db.ApplyReportParams{MessageID: m.ID, Changes: changes})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	if res := apply(); res != (db.ReportResult{Bounced: 1, Suppressed: 2, Events: 6}) {
		t.Errorf("first apply = %+v", res)
	}
	got := get(t, b.db, m.ID)
	if got.Status != db.MessagePartiallyDelivered || !slices.Equal(recipientStatuses(got), []string{"bounced", "delivered", "delivered"}) {
		t.Errorf("status %s, recipients %v", got.Status, recipientStatuses(got))
	}
	if r := got.Recipients[0]; r.LastCode != 550 || r.LastEnhancedCode != "5.1.1" || r.LastText != "user unknown" {
		t.Errorf("bounced recipient's last reply = %d %s %s", r.LastCode, r.LastEnhancedCode, r.LastText)
	}
	wantEvents := []string{"accepted", "delivered", "delivered", "delivered", "bounced", "delayed", "complained", "auto_replied", "suppressed", "suppressed"}
	if types := eventTypes(t, b.raw, m.ID); !slices.Equal(types, wantEvents) {
		t.Errorf("events = %v, want %v", types, wantEvents)
	}
	s, err := b.db.GetSuppression(ctx, db.DefaultProjectID(), "user2@d2.example.test")
	if err != nil || s.Reason != db.SuppressionComplaint || s.RecipientID != r2 {
		t.Errorf("complaint suppression = %+v, %v", s, err)
	}

	// The same report again (its sender retried) adds nothing.
	if res := apply(); res != (db.ReportResult{}) {
		t.Errorf("second apply = %+v, want nothing", res)
	}
	if types := eventTypes(t, b.raw, m.ID); len(types) != len(wantEvents) {
		t.Errorf("events after a repeat = %v", types)
	}
}

// TestApplyReportStopsRetries: a late bounce for an earlier attempt ends a
// deferred recipient bounced without its next attempt, and one being sent
// bounced with its lease gone, so the worker's outcome is fenced off.
func TestApplyReportStopsRetries(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 2)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	var deferred, sending db.ClaimedRecipient
	for _, c := range claimed {
		if c.ID == m.Recipients[0].ID {
			deferred = c
		} else {
			sending = c
		}
	}
	if _, err := b.db.RecordOutcomes(ctx, []db.Outcome{{RecipientID: deferred.ID, LeaseOwner: deferred.LeaseOwner,
		Status: db.StatusDeferred, NextAttemptAt: time.Now().Add(-time.Second), Code: 451}}); err != nil {
		t.Fatal(err)
	}
	bounce := func(id uuid.UUID) db.ReportChange {
		return db.ReportChange{RecipientID: id, Event: db.EventBounced, Code: 550, EnhancedCode: "5.1.1",
			Payload: db.EventPayload{Outcome: "bounced", Class: "recipient", Permanent: true}}
	}
	res, err := b.db.ApplyReport(ctx, db.ApplyReportParams{MessageID: m.ID,
		Changes: []db.ReportChange{bounce(deferred.ID), bounce(sending.ID)}})
	if err != nil || res.Bounced != 2 {
		t.Fatalf("ApplyReport = %+v, %v", res, err)
	}
	if again := claimAll(t, b.db, time.Time{}); len(again) != 0 {
		t.Errorf("claimed %d rows after the bounce, want none (the retry is canceled)", len(again))
	}
	applied, err := b.db.RecordOutcomes(ctx, []db.Outcome{{RecipientID: sending.ID, LeaseOwner: sending.LeaseOwner,
		Status: db.StatusDelivered, Code: 250}})
	if err != nil || len(applied) != 0 {
		t.Errorf("in-flight outcome after the bounce: applied %v, err %v; want fenced off", applied, err)
	}
	if got := get(t, b.db, m.ID); got.Status != db.StatusBounced {
		t.Errorf("message status %s, want bounced", got.Status)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM recipients WHERE lease_owner IS NOT NULL OR next_attempt_at IS NOT NULL`); n != 0 {
		t.Errorf("%d rows still leased or due", n)
	}
}

func TestApplyReportValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	for name, c := range map[string]db.ReportChange{
		"bounce without recipient":   {Event: db.EventBounced},
		"suppress without recipient": {Event: db.EventComplained, Suppress: db.SuppressionComplaint},
		"delivered event":            {RecipientID: newID(t), Event: db.EventDelivered},
	} {
		if _, err := b.db.ApplyReport(ctx, db.ApplyReportParams{MessageID: newID(t), Changes: []db.ReportChange{c}}); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := b.db.ReportTarget(ctx, newID(t)); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("ReportTarget of an unknown message: %v", err)
	}
}
