package db_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// The new types and payload fields round-trip through the table: the
// schema accepts every Go type and the reader decodes every field.
func TestEventNewTypesAndFields(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 1)
	insert(t, b.db, m)
	r := m.Recipients[0].ID
	payloads := map[db.EventType]db.EventPayload{
		db.EventBounced:     {Class: "mailbox", Permanent: true, DSNAction: "failed", DSNStatus: "5.1.1", RemoteMTA: "mx.example.test", DiagnosticCode: "550 5.1.1 no such user"},
		db.EventSuppressed:  {Reason: "bounced"},
		db.EventComplained:  {},
		db.EventDelayed:     {DSNAction: "delayed", DSNStatus: "4.4.7", RemoteMTA: "relay.example.test", DiagnosticCode: "451 4.4.7 try later"},
		db.EventAutoReplied: {Text: "on vacation"},
	}
	for _, typ := range []db.EventType{db.EventBounced, db.EventSuppressed, db.EventComplained, db.EventDelayed, db.EventAutoReplied} {
		// The writers of these types come later; until then a raw insert
		// stands in for them.
		if _, err := b.raw.Exec(ctx, `INSERT INTO events (project_id, message_id, recipient_id, type, details)
			VALUES ($1, $2, $3, $4, $5)`, db.DefaultProjectID(), m.ID, r, string(typ), payloads[typ]); err != nil {
			t.Fatalf("insert %s: %v", typ, err)
		}
	}
	events, _ := waitForEvents(t, b.db, db.EventCursor{}, 6)
	if len(events) != 6 {
		t.Fatalf("%d events, want 6", len(events))
	}
	for _, e := range events[1:] {
		if want := payloads[e.Type]; !samePayload(e.Payload, want) {
			t.Errorf("%s payload = %+v, want %+v", e.Type, e.Payload, want)
		}
	}
	if _, err := b.raw.Exec(ctx, `INSERT INTO events (project_id, message_id, type) VALUES ($1, $2, 'opened')`,
		db.DefaultProjectID(), m.ID); err == nil {
		t.Error("schema accepted an unknown event type")
	}
	for _, typ := range db.EventTypes {
		if got, ok := db.ParseEventType(string(typ)); !ok || got != typ {
			t.Errorf("ParseEventType(%q) = %q, %v", typ, got, ok)
		}
	}
	if _, ok := db.ParseEventType("opened"); ok {
		t.Error("ParseEventType accepted an unknown type")
	}
}

// A filtered read returns the matching events only, pages by its limit, and
// moves its cursor past the events it looked at, so that the next read
// starts where it stopped.
func TestReadEventsFilteredPages(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	shop, err := b.db.CreateProject(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	var canceled []uuid.UUID
	for i := range 5 {
		m := newMessage(t, 1)
		m.ProjectID = shop.ID
		if i%2 == 0 {
			m.Tags = []string{"receipt"}
		}
		insert(t, b.db, m)
		if _, _, err := b.db.CancelMessage(ctx, shop.ID, m.ID); err != nil {
			t.Fatal(err)
		}
		canceled = append(canceled, m.ID)
		insert(t, b.db, newMessage(t, 1)) // the default project's, never in shop's feed
	}
	all, head := waitForEvents(t, b.db, db.EventCursor{}, 15)

	// Every canceled event of shop, two at a time.
	p := db.ReadEventsParams{ProjectID: shop.ID, Types: []db.EventType{db.EventCanceled}, Limit: 2}
	var got []uuid.UUID
	for page := 0; ; page++ {
		pg, err := b.db.ReadEventPage(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range pg.Events {
			if e.Type != db.EventCanceled || e.ProjectID != shop.ID {
				t.Errorf("filtered read returned %s of project %s", e.Type, e.ProjectID)
			}
			got = append(got, e.MessageID)
		}
		if len(pg.Events) > 2 {
			t.Errorf("page %d holds %d events, limit 2", page, len(pg.Events))
		}
		p.After = pg.Next
		if !pg.More {
			break
		}
		if page > 10 {
			t.Fatal("filtered read does not end")
		}
	}
	if !slices.Equal(got, canceled) {
		t.Errorf("canceled events of %v, want %v", got, canceled)
	}
	// The last read looked at shop's last events; the position is past the
	// last shop event, so a read from it finds nothing to look at again.
	var lastShop db.EventCursor
	for _, e := range all {
		if e.ProjectID == shop.ID {
			lastShop = e.Cursor
		}
	}
	if p.After != lastShop {
		t.Errorf("cursor after the last page %s, want shop's last event %s", p.After, lastShop)
	}

	// A filter that matches nothing still moves the cursor.
	pg, err := b.db.ReadEventPage(ctx, db.ReadEventsParams{Types: []db.EventType{db.EventComplained}})
	if err != nil {
		t.Fatal(err)
	}
	if len(pg.Events) != 0 || pg.Next != head || pg.More {
		t.Errorf("unmatched filter: %d events, next %s, more %v; want none, %s, false", len(pg.Events), pg.Next, pg.More, head)
	}

	// Tags: events of shop's messages tagged receipt.
	tagged, _ := readAll(t, b.db, db.ReadEventsParams{ProjectID: shop.ID, Tags: []string{"receipt", "other"}})
	if len(tagged) != 6 {
		t.Errorf("tagged events: %d, want 6 (accepted and canceled of 3 messages)", len(tagged))
	}
	for _, e := range tagged {
		if !slices.Contains([]uuid.UUID{canceled[0], canceled[2], canceled[4]}, e.MessageID) {
			t.Errorf("event of untagged message %s", e.MessageID)
		}
	}
	// Types and a message together.
	one, _ := readAll(t, b.db, db.ReadEventsParams{ProjectID: shop.ID, MessageID: canceled[1], Types: []db.EventType{db.EventAccepted}})
	if len(one) != 1 || one[0].MessageID != canceled[1] || one[0].Type != db.EventAccepted {
		t.Errorf("message and type filter: %+v", one)
	}
}

func TestEventHead(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	head, err := b.db.EventHead(ctx)
	if err != nil || head != (db.EventCursor{}) {
		t.Fatalf("empty feed head = %s, %v", head, err)
	}
	insert(t, b.db, newMessage(t, 2))
	_, last := waitForEvents(t, b.db, db.EventCursor{}, 1)
	head, err = b.db.EventHead(ctx)
	if err != nil || head != last {
		t.Errorf("head = %s, %v; want the last event's %s", head, err, last)
	}
}

func TestMessageTimeline(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	shop, err := b.db.CreateProject(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	m := newMessage(t, 2)
	m.ProjectID = shop.ID
	insert(t, b.db, m)

	tl, err := b.db.MessageTimeline(ctx, shop.ID, m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if tl.Final || tl.Status != db.StatusQueued || len(tl.Events) != 1 || tl.Events[0].Type != db.EventAccepted {
		t.Errorf("queued timeline = %+v", tl)
	}
	claimed := claimAll(t, b.db, m.Now)
	var outs []db.Outcome
	for _, c := range claimed {
		outs = append(outs, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: db.StatusDelivered, Code: 250})
	}
	if _, err := b.db.RecordOutcomes(ctx, outs); err != nil {
		t.Fatal(err)
	}
	tl, err = b.db.MessageTimeline(ctx, shop.ID, m.ID)
	if err != nil {
		t.Fatal(err)
	}
	types := make([]db.EventType, len(tl.Events))
	for i, e := range tl.Events {
		types[i] = e.Type
	}
	if !tl.Final || tl.Status != db.StatusDelivered ||
		!slices.Equal(types, []db.EventType{db.EventAccepted, db.EventDelivered, db.EventDelivered}) {
		t.Errorf("final timeline: %s, final %v, %v", tl.Status, tl.Final, types)
	}

	// Another project's message is not found, like an unknown one.
	for _, c := range []struct {
		project, message uuid.UUID
	}{{db.DefaultProjectID(), m.ID}, {shop.ID, newID(t)}} {
		if _, err := b.db.MessageTimeline(ctx, c.project, c.message); !errors.Is(err, db.ErrNotFound) {
			t.Errorf("MessageTimeline(%s, %s) = %v, want ErrNotFound", c.project, c.message, err)
		}
	}
}
