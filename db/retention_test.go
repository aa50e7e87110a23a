package db_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

const day = 24 * time.Hour

// deliverAll claims every due recipient and records status for each, with
// one attempt row.
func deliverAll(t testing.TB, d *db.DB, status string) {
	t.Helper()
	claimed := claimAll(t, d, time.Time{})
	now := time.Now()
	outcomes := make([]db.Outcome, len(claimed))
	for i, c := range claimed {
		outcomes[i] = db.Outcome{
			RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: status, Code: 250,
			Attempts: []db.NewAttempt{{StartedAt: now, MXHost: "mx." + c.Domain, Code: 250}},
		}
		if status == db.StatusDeferred {
			outcomes[i].NextAttemptAt = now.Add(time.Hour)
		}
	}
	if _, err := d.RecordOutcomes(context.Background(), outcomes); err != nil {
		t.Fatalf("RecordOutcomes: %v", err)
	}
}

// fanOutAll moves the webhook fan-out cursor past every event stored so
// far. Transactions of other databases on the same server hold the feed
// back (transaction ids are server-wide), so it polls.
func fanOutAll(t testing.TB, b bundle) {
	t.Helper()
	ctx := context.Background()
	deadline := time.After(30 * time.Second)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for {
		if _, err := b.db.FanOutWebhooks(ctx, 1000); err != nil {
			t.Fatalf("FanOutWebhooks: %v", err)
		}
		behind := count(t, b.raw, `SELECT count(*) FROM events e, webhook_fanout_cursor c
			WHERE (e.txid, e.id) > (c.txid, c.event_id)`)
		if behind == 0 {
			return
		}
		select {
		case <-deadline:
			t.Fatal("the webhook fan-out did not reach the end of the feed")
		case <-poll.C:
		}
	}
}

// age moves a message's updated_at (when it became final) back by d.
func age(t testing.TB, b bundle, id uuid.UUID, d time.Duration) {
	t.Helper()
	_, err := b.raw.Exec(context.Background(),
		`UPDATE messages SET updated_at = updated_at - $2::bigint * interval '1 microsecond' WHERE id = $1`,
		id, d.Microseconds())
	if err != nil {
		t.Fatal(err)
	}
}

// retentionFixture holds three messages, all made final or not and aged as
// their names say.
type retentionFixture struct {
	oldFinal, youngFinal, oldWaiting uuid.UUID
}

// newRetentionFixture stores an old final message (two recipients, one
// delivered and one bounced, with an idempotency key), a final one of today,
// and an old one with a recipient still deferred.
func newRetentionFixture(t *testing.T, b bundle) retentionFixture {
	t.Helper()
	ctx := context.Background()
	var f retentionFixture

	old := newMessage(t, 2)
	old.Idempotency = &db.Idempotency{Key: "k-" + old.ID.String(), RequestHash: []byte{1}}
	insert(t, b.db, old)
	claimed := claimAll(t, b.db, time.Time{})
	now := time.Now()
	var outcomes []db.Outcome
	for i, c := range claimed {
		status := db.StatusDelivered
		if i == 1 {
			status = db.StatusBounced
		}
		outcomes = append(outcomes, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: status,
			Code: 250, Attempts: []db.NewAttempt{{StartedAt: now, Code: 250}}})
	}
	if _, err := b.db.RecordOutcomes(ctx, outcomes); err != nil {
		t.Fatal(err)
	}
	f.oldFinal = old.ID

	young := newMessage(t, 1)
	insert(t, b.db, young)
	deliverAll(t, b.db, db.StatusDelivered)
	f.youngFinal = young.ID

	waiting := newMessage(t, 1)
	insert(t, b.db, waiting)
	deliverAll(t, b.db, db.StatusDeferred)
	f.oldWaiting = waiting.ID

	age(t, b, f.oldFinal, 100*day)
	age(t, b, f.oldWaiting, 100*day)
	fanOutAll(t, b)
	return f
}

func TestPurgeMessageBodies(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	f := newRetentionFixture(t, b)
	before := get(t, b.db, f.oldFinal)

	n, err := b.db.PurgeMessageBodies(ctx, db.RetentionParams{Age: 30 * day, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("purged %d bodies, want 1", n)
	}

	after := get(t, b.db, f.oldFinal)
	if after.RawPurgedAt == nil {
		t.Error("RawPurgedAt not set on the purged message")
	}
	if !after.UpdatedAt.Equal(before.UpdatedAt) {
		t.Errorf("UpdatedAt moved from %s to %s: the row retention counts from it", before.UpdatedAt, after.UpdatedAt)
	}
	if after.Size != before.Size || after.Status != before.Status {
		t.Errorf("size/status changed: %d %s -> %d %s", before.Size, before.Status, after.Size, after.Status)
	}
	if len(after.Recipients) != 2 || len(after.Attempts) != 2 {
		t.Errorf("%d recipients and %d attempts left, want 2 and 2", len(after.Recipients), len(after.Attempts))
	}
	if _, err := b.db.GetMessageRaw(ctx, db.DefaultProjectID(), f.oldFinal); !errors.Is(err, db.ErrRawPurged) {
		t.Errorf("GetMessageRaw of the purged message: %v, want ErrRawPurged", err)
	}
	if got := count(t, b.raw, `SELECT length(raw) FROM messages WHERE id = $1`, f.oldFinal); got != 0 {
		t.Errorf("raw of the purged message holds %d bytes", got)
	}

	for _, id := range []uuid.UUID{f.youngFinal, f.oldWaiting} {
		m := get(t, b.db, id)
		if m.RawPurgedAt != nil {
			t.Errorf("message %s (%s) was purged", id, m.Status)
		}
		raw, err := b.db.GetMessageRaw(ctx, db.DefaultProjectID(), id)
		if err != nil || len(raw.Raw) == 0 {
			t.Errorf("GetMessageRaw(%s) = %d bytes, %v", id, len(raw.Raw), err)
		}
	}

	n, err = b.db.PurgeMessageBodies(ctx, db.RetentionParams{Age: 30 * day, Limit: 10})
	if err != nil || n != 0 {
		t.Errorf("second purge: %d, %v; want 0, nil", n, err)
	}
}

func TestDeleteExpiredMessages(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	f := newRetentionFixture(t, b)

	got, err := b.db.DeleteExpiredMessages(ctx, db.RetentionParams{Age: 90 * day, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	// Two recipients with one attempt and one event each, plus the
	// message's accepted event.
	want := db.DeletedMessages{Messages: 1, Recipients: 2, Attempts: 2, Events: 3, IdempotencyKeys: 1}
	if got != want {
		t.Errorf("deleted %+v, want %+v", got, want)
	}
	for table, q := range map[string]string{
		"messages":         `SELECT count(*) FROM messages WHERE id = $1`,
		"recipients":       `SELECT count(*) FROM recipients WHERE message_id = $1`,
		"attempts":         `SELECT count(*) FROM attempts WHERE message_id = $1`,
		"events":           `SELECT count(*) FROM events WHERE message_id = $1`,
		"idempotency_keys": `SELECT count(*) FROM idempotency_keys WHERE message_id = $1`,
	} {
		if n := count(t, b.raw, q, f.oldFinal); n != 0 {
			t.Errorf("%d %s rows of the deleted message left", n, table)
		}
	}
	if _, err := b.db.GetMessage(ctx, db.DefaultProjectID(), f.oldFinal); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("GetMessage of the deleted message: %v, want ErrNotFound", err)
	}
	for _, id := range []uuid.UUID{f.youngFinal, f.oldWaiting} {
		m := get(t, b.db, id)
		if len(m.Recipients) != 1 || len(m.Attempts) != 1 {
			t.Errorf("message %s (%s) lost rows: %d recipients, %d attempts", id, m.Status, len(m.Recipients), len(m.Attempts))
		}
	}
}

func TestDeleteExpiredMessagesWaitsForWebhookFanOut(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 1)
	insert(t, b.db, m)
	deliverAll(t, b.db, db.StatusDelivered)
	age(t, b, m.ID, 100*day)

	got, err := b.db.DeleteExpiredMessages(ctx, db.RetentionParams{Age: 90 * day, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if got.Messages != 0 {
		t.Fatalf("deleted a message whose events the fan-out has not read")
	}

	fanOutAll(t, b)
	if got, err = b.db.DeleteExpiredMessages(ctx, db.RetentionParams{Age: 90 * day, Limit: 10}); err != nil || got.Messages != 1 {
		t.Fatalf("after the fan-out: deleted %+v, %v; want the message", got, err)
	}

	// The cursor now points at a deleted event; the fan-out reads on past
	// it, to the new message's accepted event.
	next := newMessage(t, 1)
	insert(t, b.db, next)
	fanOutAll(t, b)
	if n := count(t, b.raw, `SELECT count(*) FROM webhook_fanout_cursor c JOIN events e
		ON (e.txid, e.id) = (c.txid, c.event_id) AND e.message_id = $1`, next.ID); n != 1 {
		t.Error("the fan-out cursor did not move to the new message's event")
	}
}

func TestRetentionBatchesAreBounded(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	for range 5 {
		m := newMessage(t, 1)
		insert(t, b.db, m)
		deliverAll(t, b.db, db.StatusDelivered)
	}
	fanOutAll(t, b)
	// An hour from now, everything final is an hour old.
	p := db.RetentionParams{Age: time.Minute, Limit: 2, Now: time.Now().Add(time.Hour)}

	var purged []int64
	for {
		n, err := b.db.PurgeMessageBodies(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		purged = append(purged, n)
		if n < int64(p.Limit) {
			break
		}
	}
	if want := []int64{2, 2, 1}; !equalInts(purged, want) {
		t.Errorf("purge batches %v, want %v", purged, want)
	}

	var deleted []int64
	for {
		d, err := b.db.DeleteExpiredMessages(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		deleted = append(deleted, d.Messages)
		if d.Messages < int64(p.Limit) {
			break
		}
	}
	if want := []int64{2, 2, 1}; !equalInts(deleted, want) {
		t.Errorf("delete batches %v, want %v", deleted, want)
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestRetentionParamsValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	for _, p := range []db.RetentionParams{{Age: 0, Limit: 1}, {Age: time.Hour, Limit: 0}} {
		if _, err := b.db.PurgeMessageBodies(ctx, p); err == nil {
			t.Errorf("PurgeMessageBodies(%+v) accepted", p)
		}
		if _, err := b.db.DeleteExpiredMessages(ctx, p); err == nil {
			t.Errorf("DeleteExpiredMessages(%+v) accepted", p)
		}
		if _, err := b.db.DeleteFinishedWebhookDeliveries(ctx, p); err == nil {
			t.Errorf("DeleteFinishedWebhookDeliveries(%+v) accepted", p)
		}
	}
}

func TestDeleteFinishedWebhookDeliveries(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	endpoint := newID(t)
	if _, err := b.raw.Exec(ctx, `INSERT INTO webhook_endpoints (id, project_id, url, secret)
		VALUES ($1, $2, 'https://hooks.example.test/', 's')`, endpoint, db.DefaultProjectID()); err != nil {
		t.Fatal(err)
	}
	// One delivery per state, 100 days old, and a delivered one of today.
	for i, d := range []struct {
		state string
		age   time.Duration
	}{{"pending", 100 * day}, {"delivered", 100 * day}, {"failed", 100 * day}, {"delivered", 0}} {
		lease := "NULL"
		if d.state == "sending" {
			lease = "'x'"
		}
		_, err := b.raw.Exec(ctx, `INSERT INTO webhook_deliveries
			(id, endpoint_id, project_id, event_id, event_type, event_txid, event_seq, body, state, lease_owner, created_at)
			VALUES ($1, $2, $3, $4, 'delivered', '1', $5, '{}', $6, `+lease+`, now() - $7::bigint * interval '1 microsecond')`,
			newID(t), endpoint, db.DefaultProjectID(), newID(t).String(), i, d.state, d.age.Microseconds())
		if err != nil {
			t.Fatal(err)
		}
	}
	n, err := b.db.DeleteFinishedWebhookDeliveries(ctx, db.RetentionParams{Age: 90 * day, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("deleted %d deliveries, want the old delivered and failed ones", n)
	}
	if left := count(t, b.raw, `SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'`); left != 1 {
		t.Errorf("%d pending deliveries left, want 1", left)
	}
	if left := count(t, b.raw, `SELECT count(*) FROM webhook_deliveries`); left != 2 {
		t.Errorf("%d deliveries left, want 2", left)
	}
}

func TestDeleteExpiredIdempotencyKeyBatch(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	for range 3 {
		m := newMessage(t, 1)
		m.Idempotency = &db.Idempotency{Key: "k-" + m.ID.String(), RequestHash: []byte{1}, TTL: time.Microsecond}
		insert(t, b.db, m)
	}
	live := newMessage(t, 1)
	live.Idempotency = &db.Idempotency{Key: "live", RequestHash: []byte{1}}
	insert(t, b.db, live)

	var batches []int64
	for {
		n, err := b.db.DeleteExpiredIdempotencyKeyBatch(ctx, 2)
		if err != nil {
			t.Fatal(err)
		}
		batches = append(batches, n)
		if n < 2 {
			break
		}
	}
	if want := []int64{2, 1}; !equalInts(batches, want) {
		t.Errorf("batches %v, want %v", batches, want)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM idempotency_keys`); n != 1 {
		t.Errorf("%d keys left, want the live one", n)
	}
	if _, err := b.db.DeleteExpiredIdempotencyKeyBatch(ctx, 0); err == nil {
		t.Error("limit 0 accepted")
	}
}

func TestRetentionLockIsExclusive(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	first, ok, err := b.db.TryRetentionLock(ctx)
	if err != nil || !ok {
		t.Fatalf("first TryRetentionLock: %v, %v", ok, err)
	}
	if _, ok, err := b.db.TryRetentionLock(ctx); err != nil || ok {
		t.Fatalf("second TryRetentionLock while the first holds it: %v, %v; want false", ok, err)
	}
	if err := first.Release(ctx); err != nil {
		t.Fatal(err)
	}
	second, ok, err := b.db.TryRetentionLock(ctx)
	if err != nil || !ok {
		t.Fatalf("TryRetentionLock after release: %v, %v", ok, err)
	}
	if err := second.Release(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestVacuumRetainedTables(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	if err := b.db.VacuumRetainedTables(ctx); err != nil {
		t.Fatal(err)
	}
	err := b.db.InTx(ctx, func(tx *db.DB) error { return tx.VacuumRetainedTables(ctx) })
	if err == nil {
		t.Error("VacuumRetainedTables inside a transaction did not refuse")
	}
}
