package db_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
)

// One group holds a plain message, an invalid one, a key taken earlier
// (replayed), and one key used twice with the same request and once with
// another: each gets its own answer, and only what should be is stored.
func TestInsertMessagesSettlesEachMessage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	earlier := withKey(newMessage(t, 1), "earlier", "h-earlier")
	insert(t, b.db, earlier)

	plain := newMessage(t, 2)
	invalid := newMessage(t, 0) // no recipients
	replay := withKey(newMessage(t, 1), "earlier", "h-earlier")
	firstK := withKey(newMessage(t, 1), "k", "h-k")
	sameK := withKey(newMessage(t, 1), "k", "h-k")
	otherK := withKey(newMessage(t, 1), "k", "h-other")
	scheduled := newMessage(t, 1)
	scheduled.SendAt = time.Now().AddDate(1, 0, 0)
	msgs := []db.NewMessage{plain, invalid, replay, firstK, sameK, otherK, scheduled}

	out, err := b.db.InsertMessages(ctx, msgs)
	if err != nil {
		t.Fatal(err)
	}
	if out[0].Err != nil || out[0].Result.Replayed {
		t.Errorf("plain: %+v", out[0])
	}
	if out[1].Err == nil {
		t.Errorf("invalid message: no error")
	}
	if out[2].Err != nil || !out[2].Result.Replayed || string(out[2].Result.Response) != string(earlier.Idempotency.Response) {
		t.Errorf("replay of an earlier key: %+v", out[2])
	}
	if out[3].Err != nil || out[3].Result.Replayed {
		t.Errorf("first use of k: %+v", out[3])
	}
	if out[4].Err != nil || !out[4].Result.Replayed || string(out[4].Result.Response) != string(firstK.Idempotency.Response) {
		t.Errorf("same request with k in the same group: %+v, want the first's response replayed", out[4])
	}
	if !errors.Is(out[5].Err, db.ErrIdempotencyConflict) {
		t.Errorf("other request with k: %+v, want a conflict", out[5])
	}
	if out[6].Err != nil {
		t.Errorf("scheduled: %v", out[6].Err)
	}

	for _, m := range []db.NewMessage{earlier, plain, firstK, scheduled} {
		if n := count(t, b.raw, `SELECT count(*) FROM messages WHERE id = $1`, m.ID); n != 1 {
			t.Errorf("message %s stored %d times", m.ID, n)
		}
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != 4 {
		t.Errorf("%d messages stored, want 4", n)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM recipients`); n != 5 {
		t.Errorf("%d recipients stored, want 5", n)
	}
	if got := get(t, b.db, plain.ID); got.Status != db.StatusQueued || len(got.Recipients) != 2 ||
		got.Recipients[0].Address != plain.Recipients[0].Address {
		t.Errorf("plain message stored as %+v", got)
	}
	if got := get(t, b.db, scheduled.ID); got.Status != db.StatusScheduled || got.Recipients[0].Status != db.StatusScheduled {
		t.Errorf("scheduled message stored as %s / %s", got.Status, got.Recipients[0].Status)
	}
	if got := eventTypes(t, b.raw, scheduled.ID); fmt.Sprint(got) != "[accepted scheduled]" {
		t.Errorf("events of the scheduled message: %v", got)
	}
}

func newCommitter(t *testing.T, d *db.DB, cfg db.CommitterConfig) *db.Committer {
	t.Helper()
	c, err := db.NewCommitter(d, cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Start(t.Context())
	t.Cleanup(c.Stop)
	return c
}

// Many callers at once share commits; each message is stored exactly once,
// and two callers racing with one key and different requests: exactly one
// wins, the other alone is told of the conflict.
func TestCommitterConcurrentCallers(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := newCommitter(t, b.db, db.CommitterConfig{Workers: 2})
	const callers = 100
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		conflicts int
		failures  []error
	)
	msgs := make([]db.NewMessage, callers)
	for i := range msgs {
		msgs[i] = newMessage(t, 1)
	}
	msgs[0] = withKey(msgs[0], "race", "h-a")
	msgs[1] = withKey(msgs[1], "race", "h-b")
	for i := range msgs {
		wg.Go(func() {
			out, err := c.Insert(context.Background(), msgs[i:i+1])
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failures = append(failures, err)
			case errors.Is(out[0].Err, db.ErrIdempotencyConflict):
				conflicts++
			case out[0].Err != nil:
				failures = append(failures, out[0].Err)
			}
		})
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("failed calls: %v", failures)
	}
	if conflicts != 1 {
		t.Errorf("%d conflicts, want 1", conflicts)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != callers-1 {
		t.Errorf("%d messages stored, want %d", n, callers-1)
	}
	if n := count(t, b.raw, `SELECT count(DISTINCT message_id) FROM events WHERE type = 'accepted'`); n != callers-1 {
		t.Errorf("%d accepted events, want %d", n, callers-1)
	}
	st := c.Stats()
	t.Logf("%d messages in %d commits", st.Messages, st.Commits)
}

// With the database gone, a group fails as Unavailable and nothing of it is
// stored; once it is back, calls succeed again.
func TestCommitterDatabaseDown(t *testing.T) {
	t.Parallel()
	direct, proxied, proxy := testenv.ProxiedDatabase(t)
	d, err := db.Open(context.Background(), proxied)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	check, err := db.Open(context.Background(), direct)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(check.Close)
	c := newCommitter(t, d, db.CommitterConfig{})
	proxy.Stop()
	batch := []db.NewMessage{newMessage(t, 1), withKey(newMessage(t, 2), "k", "h")}
	if _, err := c.Insert(context.Background(), batch); !errors.Is(err, db.ErrUnavailable) {
		t.Fatalf("Insert with the database down: %v, want ErrUnavailable", err)
	}
	for _, m := range batch {
		if _, err := check.GetMessage(context.Background(), db.DefaultProjectID(), m.ID); !errors.Is(err, db.ErrNotFound) {
			t.Errorf("message %s after the failed group: %v, want not stored", m.ID, err)
		}
	}
}

// A full queue refuses at once with ErrOverloaded; Stop commits what was
// queued and refuses what comes after.
func TestCommitterOverloadAndStop(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c, err := db.NewCommitter(b.db, db.CommitterConfig{Workers: 1, Queue: 1, MaxWait: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Insert(context.Background(), []db.NewMessage{newMessage(t, 1)}); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Insert before Start: %v, want ErrUnavailable", err)
	}
	c.Start(t.Context())
	t.Cleanup(c.Stop)

	// Hold the worker in its first commit behind a table lock.
	ctx := context.Background()
	tx, err := b.raw.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `LOCK TABLE messages IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	first, second := newMessage(t, 1), newMessage(t, 1)
	results := make(chan error, 2)
	go func() {
		_, err := c.Insert(ctx, []db.NewMessage{first})
		results <- err
	}()
	eventually(t, func() bool {
		return count(t, b.raw, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`) == 1
	})
	go func() {
		_, err := c.Insert(ctx, []db.NewMessage{second})
		results <- err
	}()
	eventually(t, func() bool { return c.Stats().Queued == 1 })
	if _, err := c.Insert(ctx, []db.NewMessage{newMessage(t, 1)}); !errors.Is(err, db.ErrOverloaded) {
		t.Errorf("Insert with the queue full: %v, want ErrOverloaded", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	c.Stop()
	for range 2 {
		if err := <-results; err != nil {
			t.Errorf("queued call: %v", err)
		}
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != 2 {
		t.Errorf("%d messages stored, want the 2 accepted", n)
	}
	if _, err := c.Insert(ctx, []db.NewMessage{newMessage(t, 1)}); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Insert after Stop: %v, want ErrUnavailable", err)
	}
}

// eventually polls cond until it holds, failing the test after a deadline.
func eventually(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		<-tick.C
	}
}
