package db_test

import (
	"context"
	"testing"

	"github.com/posthaste/posthaste/db"
)

// BenchmarkEventReads measures what an open stream costs the database: the
// hub's head check (once per poll interval per process, whatever the
// number of streams) and a stream's read when woken, on a table of 200,000
// events.
func BenchmarkEventReads(b *testing.B) {
	bb := setup(b)
	ctx := context.Background()
	m := newMessage(b, 1)
	insert(b, bb.db, m)
	if _, err := bb.raw.Exec(ctx, `INSERT INTO events (project_id, message_id, recipient_id, type, details)
		SELECT $1, $2, $3, CASE WHEN i % 100 = 0 THEN 'bounced' ELSE 'delivered' END, '{"code":250}'
		FROM generate_series(1, 200000) i`, db.DefaultProjectID(), m.ID, m.Recipients[0].ID); err != nil {
		b.Fatal(err)
	}
	if _, err := bb.raw.Exec(ctx, `ANALYZE events`); err != nil {
		b.Fatal(err)
	}
	head, err := bb.db.EventHead(ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("head", func(b *testing.B) {
		for b.Loop() {
			if _, err := bb.db.EventHead(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("caught-up", func(b *testing.B) {
		for b.Loop() {
			if _, err := bb.db.ReadEventPage(ctx, db.ReadEventsParams{ProjectID: db.DefaultProjectID(), After: head}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("page-100", func(b *testing.B) {
		for b.Loop() {
			if _, err := bb.db.ReadEventPage(ctx, db.ReadEventsParams{ProjectID: db.DefaultProjectID(), Limit: 100}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("filtered-1-in-100", func(b *testing.B) {
		for b.Loop() {
			if _, err := bb.db.ReadEventPage(ctx, db.ReadEventsParams{ProjectID: db.DefaultProjectID(), Limit: 100,
				Types: []db.EventType{db.EventBounced}}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
