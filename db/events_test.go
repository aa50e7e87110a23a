package db_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// readAll reads the feed from after until it returns nothing.
func readAll(t *testing.T, d *db.DB, p db.ReadEventsParams) ([]db.Event, db.EventCursor) {
	t.Helper()
	var all []db.Event
	for {
		events, next, err := d.ReadEvents(context.Background(), p)
		if err != nil {
			t.Fatalf("ReadEvents: %v", err)
		}
		if len(events) == 0 {
			return all, next
		}
		all = append(all, events...)
		p.After = next
	}
}

// waitForEvents reads the feed from after until it has returned at least n
// events. Transactions of other databases on the same server hold the feed
// back too (transaction ids are server-wide), so it polls.
func waitForEvents(t *testing.T, d *db.DB, after db.EventCursor, n int) ([]db.Event, db.EventCursor) {
	t.Helper()
	var all []db.Event
	deadline := time.After(30 * time.Second)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for {
		events, next := readAll(t, d, db.ReadEventsParams{After: after, Limit: 2})
		all = append(all, events...)
		after = next
		if len(all) >= n {
			return all, after
		}
		select {
		case <-deadline:
			t.Fatalf("read %d events, want %d", len(all), n)
		case <-poll.C:
		}
	}
}

func typesOf(events []db.Event) []db.EventType {
	out := make([]db.EventType, len(events))
	for i, e := range events {
		out[i] = e.Type
	}
	return out
}

func TestEventTypesMatchSchema(t *testing.T) {
	t.Parallel()
	b := setup(t)
	var def string
	if err := b.raw.QueryRow(context.Background(),
		`SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'events_type_check'`).Scan(&def); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(def, "'::text"); n != len(db.EventTypes) {
		t.Errorf("schema allows %d types (%s), Go has %d", n, def, len(db.EventTypes))
	}
	for _, typ := range db.EventTypes {
		if !strings.Contains(def, "'"+string(typ)+"'") {
			t.Errorf("schema does not allow %q: %s", typ, def)
		}
	}
}

func TestEventsTypedPayloads(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	t0 := usec(time.Now())
	sendAt := t0.Add(time.Hour)
	m := newMessage(t, 3)
	m.Now, m.SendAt = t0, sendAt
	insert(t, b.db, m)
	other := newMessage(t, 1)
	insert(t, b.db, other)

	claimed, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "w", Limit: 10, LeaseFor: time.Minute, Now: sendAt})
	if err != nil || len(claimed) != 4 {
		t.Fatalf("claim = %v, %v", claimed, err)
	}
	r0, r1, r2 := m.Recipients[0].ID, m.Recipients[1].ID, m.Recipients[2].ID
	// r2 gets a cancel request while in flight: its deferral ends canceled.
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), m.ID); err != nil {
		t.Fatal(err)
	}
	retryAt := usec(t0.Add(2 * time.Hour))
	_, err = b.db.RecordOutcomes(ctx, []db.Outcome{
		{RecipientID: r0, LeaseOwner: "w", Status: db.StatusDelivered, Code: 250, EnhancedCode: "2.0.0", Text: "ok",
			Attempts: []db.NewAttempt{{StartedAt: t0, MXHost: "mx.d0.example.test", Code: 250}}},
		{RecipientID: r1, LeaseOwner: "w", Status: db.StatusBounced, Code: 550, EnhancedCode: "5.1.1", Text: "no such user"},
		{RecipientID: r2, LeaseOwner: "w", Status: db.StatusDeferred, NextAttemptAt: retryAt, Code: 451, Ambiguous: true,
			Attempts: []db.NewAttempt{{StartedAt: t0, MXHost: "mx.d2.example.test", Ambiguous: true}}},
		{RecipientID: other.Recipients[0].ID, LeaseOwner: "w", Status: db.StatusDeferred, NextAttemptAt: retryAt,
			Code: 421, Text: "busy"},
	})
	if err != nil {
		t.Fatal(err)
	}

	// m: accepted, scheduled and one per outcome; other: accepted, deferred.
	events, _ := waitForEvents(t, b.db, db.EventCursor{}, 7)
	if len(events) != 7 {
		t.Fatalf("%d events, want 7: %v", len(events), typesOf(events))
	}
	var mine []db.Event
	for _, e := range events {
		if e.MessageID == m.ID {
			mine = append(mine, e)
		}
	}
	byMessage, _ := readAll(t, b.db, db.ReadEventsParams{MessageID: m.ID})
	if !slices.EqualFunc(mine, byMessage, func(a, b db.Event) bool { return a.ID == b.ID }) {
		t.Errorf("events of one message %v, want %v", typesOf(byMessage), typesOf(mine))
	}

	want := []struct {
		typ       db.EventType
		recipient uuid.UUID
		payload   db.EventPayload
	}{
		{db.EventAccepted, uuid.Nil, db.EventPayload{Recipients: 3}},
		{db.EventScheduled, uuid.Nil, db.EventPayload{SendAt: &sendAt}},
		{db.EventDelivered, r0, db.EventPayload{Outcome: "delivered", Code: 250, EnhancedCode: "2.0.0", Text: "ok",
			MXHost: "mx.d0.example.test"}},
		{db.EventBounced, r1, db.EventPayload{Outcome: "bounced", Code: 550, EnhancedCode: "5.1.1", Text: "no such user"}},
		// A cancel taking effect at the end of an attempt says what the
		// attempt did, but names no retry.
		{db.EventCanceled, r2, db.EventPayload{Outcome: "deferred", Code: 451, Ambiguous: true, MXHost: "mx.d2.example.test"}},
	}
	if len(mine) != len(want) {
		t.Fatalf("events of the message: %v", typesOf(mine))
	}
	// The outcome events share one transaction; their order among
	// themselves is the statement's.
	slices.SortStableFunc(mine[2:], func(a, b db.Event) int { return strings.Compare(string(a.Type), string(b.Type)) })
	slices.SortStableFunc(want[2:], func(a, b struct {
		typ       db.EventType
		recipient uuid.UUID
		payload   db.EventPayload
	}) int {
		return strings.Compare(string(a.typ), string(b.typ))
	})
	for i, w := range want {
		e := mine[i]
		if e.Type != w.typ || e.RecipientID != w.recipient || e.MessageID != m.ID || e.CreatedAt.IsZero() {
			t.Errorf("event %d = %+v, want %s for %s", i, e, w.typ, w.recipient)
			continue
		}
		if !samePayload(e.Payload, w.payload) {
			t.Errorf("%s payload = %+v, want %+v", e.Type, e.Payload, w.payload)
		}
	}
	// The other message's deferral names its retry.
	for _, e := range events {
		if e.MessageID == other.ID && e.Type == db.EventDeferred {
			if e.Payload.NextAttemptAt == nil || !e.Payload.NextAttemptAt.Equal(retryAt) || e.Payload.Code != 421 {
				t.Errorf("deferred payload = %+v", e.Payload)
			}
		}
	}
}

func samePayload(a, b db.EventPayload) bool {
	sameTime := func(x, y *time.Time) bool { return (x == nil) == (y == nil) && (x == nil || x.Equal(*y)) }
	if !sameTime(a.SendAt, b.SendAt) || !sameTime(a.NextAttemptAt, b.NextAttemptAt) {
		return false
	}
	a.SendAt, b.SendAt, a.NextAttemptAt, b.NextAttemptAt = nil, nil, nil, nil
	return a == b
}

// T1 writes an event first (lower id) but commits last. The feed must not
// move past T2's event while T1 is in flight, or T1's event would be
// skipped for good.
func TestReadEventsCommitOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m1, m2, m3 := newMessage(t, 1), newMessage(t, 1), newMessage(t, 1)

	written, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- b.db.InTx(ctx, func(tx *db.DB) error {
			if _, err := tx.InsertMessage(ctx, m1); err != nil {
				return err
			}
			close(written)
			<-release
			return nil
		})
	}()
	<-written
	insert(t, b.db, m2) // T2 commits while T1 is open

	if n := count(t, b.raw, `SELECT count(*) FROM events`); n != 1 {
		t.Fatalf("%d events visible, want T2's only", n)
	}

	// While T1 is open, the feed shows nothing after the start.
	events, cursor, err := b.db.ReadEvents(ctx, db.ReadEventsParams{})
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 0 || cursor != (db.EventCursor{}) {
		t.Fatalf("read %v while T1 is open, want nothing", typesOf(events))
	}

	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	events, cursor = waitForEvents(t, b.db, cursor, 2)
	if len(events) != 2 || events[0].MessageID != m1.ID || events[1].MessageID != m2.ID {
		t.Fatalf("after T1 committed: %+v, want T1's then T2's", events)
	}
	// An id order reader would have read T2's event alone and moved past
	// T1's.
	if events[0].ID > events[1].ID {
		t.Errorf("T1's event id %d above T2's %d: the test did not overlap", events[0].ID, events[1].ID)
	}

	// Continuing from the cursor skips nothing and repeats nothing.
	insert(t, b.db, m3)
	events, _ = waitForEvents(t, b.db, cursor, 1)
	if len(events) != 1 || events[0].MessageID != m3.ID {
		t.Fatalf("after the cursor: %+v, want m3's event only", events)
	}
	token := cursor.String()
	parsed, err := db.ParseEventCursor(token)
	if err != nil || parsed != cursor {
		t.Fatalf("ParseEventCursor(%q) = %v, %v", token, parsed, err)
	}
}

// A transaction that rolls back holds the feed back only while it runs.
func TestReadEventsAfterRollback(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m1, m2 := newMessage(t, 1), newMessage(t, 1)

	written, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- b.db.InTx(ctx, func(tx *db.DB) error {
			if _, err := tx.InsertMessage(ctx, m1); err != nil {
				return err
			}
			close(written)
			<-release
			return errTest
		})
	}()
	<-written
	insert(t, b.db, m2)
	if events, _, err := b.db.ReadEvents(ctx, db.ReadEventsParams{}); err != nil || len(events) != 0 {
		t.Fatalf("read %v, %v while T1 is open, want nothing", events, err)
	}
	close(release)
	if err := <-done; err != errTest {
		t.Fatalf("T1 = %v", err)
	}
	events, _ := waitForEvents(t, b.db, db.EventCursor{}, 1)
	if len(events) != 1 || events[0].MessageID != m2.ID {
		t.Fatalf("after rollback: %+v, want T2's event only", events)
	}
}

func TestParseEventCursor(t *testing.T) {
	t.Parallel()
	if c, err := db.ParseEventCursor(""); err != nil || c != (db.EventCursor{}) {
		t.Errorf("empty = %v, %v", c, err)
	}
	for _, s := range []string{"1", "x.1", "1.x", "1.-1", "-1.1", "1.2.3"} {
		if _, err := db.ParseEventCursor(s); err == nil {
			t.Errorf("ParseEventCursor(%q) accepted", s)
		}
	}
}

// TestReadEventsPerProject checks that events carry their message's project,
// whichever statement wrote them, and that a project's feed holds only its
// own.
func TestReadEventsPerProject(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	shop, err := b.db.CreateProject(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	mine := newMessage(t, 1)
	mine.ProjectID = shop.ID
	insert(t, b.db, mine)
	// An outcome and a cancel write events through the other statements;
	// other is stored after the claim, so the cancel finds it waiting.
	claimed := claimAll(t, b.db, time.Time{})
	other := newMessage(t, 1)
	insert(t, b.db, other)
	var outs []db.Outcome
	for _, c := range claimed {
		if c.MessageID == mine.ID {
			outs = append(outs, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: db.StatusDelivered, Code: 250})
		}
	}
	if _, err := b.db.RecordOutcomes(ctx, outs); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), other.ID); err != nil {
		t.Fatal(err)
	}

	all, _ := waitForEvents(t, b.db, db.EventCursor{}, 4)
	for _, e := range all {
		want := db.DefaultProjectID()
		if e.MessageID == mine.ID {
			want = shop.ID
		}
		if e.ProjectID != want {
			t.Errorf("%s event of %s: project %s, want %s", e.Type, e.MessageID, e.ProjectID, want)
		}
	}
	got, _ := readAll(t, b.db, db.ReadEventsParams{ProjectID: shop.ID})
	if types := typesOf(got); !slices.Equal(types, []db.EventType{db.EventAccepted, db.EventDelivered}) {
		t.Errorf("shop's feed = %v, want accepted, delivered", types)
	}
	for _, e := range got {
		if e.MessageID != mine.ID {
			t.Errorf("shop's feed holds %s of another project's message", e.Type)
		}
	}
	if got, _ := readAll(t, b.db, db.ReadEventsParams{ProjectID: shop.ID, MessageID: other.ID}); len(got) != 0 {
		t.Errorf("another project's message through shop's feed: %d events", len(got))
	}
}
