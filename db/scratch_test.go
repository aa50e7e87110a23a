package db_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
)

func TestScratchExplain(t *testing.T) {
	env := setup(t)
	ctx := context.Background()
	for range 20 {
		insert(t, env.db, newMessage(t, 50))
	}
	run := func(n int) {
		for i := range n {
			claimed, err := env.db.ClaimRecipients(ctx, db.ClaimParams{Owner: fmt.Sprintf("o-%d-%d", n, i), Limit: 100, LeaseFor: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			now := time.Now()
			var outs []db.Outcome
			for _, c := range claimed {
				outs = append(outs, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: db.StatusDeferred, NextAttemptAt: now.Add(-time.Second), Code: 451,
					Attempt: &db.NewAttempt{StartedAt: now, Duration: time.Millisecond}})
			}
			t0 := time.Now()
			if _, err := env.db.RecordOutcomes(ctx, outs); err != nil {
				t.Fatal(err)
			}
			if i == n-1 {
				t.Logf("record %v", time.Since(t0))
			}
		}
	}
	run(50)
	explain := func(q string, args ...any) {
		tx, _ := env.raw.Begin(ctx)
		defer tx.Rollback(ctx)
		rows, err := tx.Query(ctx, "EXPLAIN (ANALYZE, BUFFERS) "+q, args...)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var s string
			rows.Scan(&s)
			t.Log(s)
		}
	}
	explain(`WITH due AS (
    SELECT id FROM recipients
    WHERE status IN ('queued', 'scheduled', 'deferred')
      AND next_attempt_at <= coalesce(NULL::timestamptz, now())
    ORDER BY next_attempt_at
    LIMIT 100
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE recipients r
SET status = 'sending',
    lease_owner = 'x',
    lease_until = now() + interval '1 minute',
    updated_at = now()
FROM due, messages m
WHERE r.id = due.id AND m.id = r.message_id
RETURNING r.id`)
	explain(`SELECT id FROM messages WHERE id IN (SELECT message_id FROM recipients WHERE lease_owner = 'x' AND status = 'sending') ORDER BY id FOR NO KEY UPDATE`)
}
