package db_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

var errTest = errors.New("test: give up")

func TestInTxCommitsTogether(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m1, m2 := newMessage(t, 1), newMessage(t, 2)
	err := b.db.InTx(ctx, func(tx *db.DB) error {
		insert(t, tx, m1)
		insert(t, tx, m2)
		// Inside the transaction its own writes are visible, the status
		// recomputation included; outside they are not yet.
		if _, _, err := tx.CancelMessage(ctx, db.DefaultProjectID(), m2.ID); err != nil {
			return err
		}
		if got := get(t, tx, m2.ID); got.Status != db.StatusCanceled {
			t.Errorf("inside: status %q, want canceled", got.Status)
		}
		if _, err := b.db.GetMessage(ctx, db.DefaultProjectID(), m1.ID); !errors.Is(err, db.ErrNotFound) {
			t.Errorf("outside, before commit: %v, want ErrNotFound", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := get(t, b.db, m1.ID); got.Status != db.StatusQueued {
		t.Errorf("m1 status %q, want queued", got.Status)
	}
	if got := get(t, b.db, m2.ID); got.Status != db.StatusCanceled ||
		!slices.Equal(recipientStatuses(got), []string{"canceled", "canceled"}) {
		t.Errorf("m2 status %q, recipients %v", got.Status, recipientStatuses(got))
	}
	if got := eventTypes(t, b.raw, m2.ID); !slices.Equal(got, []string{"accepted", "canceled", "canceled"}) {
		t.Errorf("m2 events = %v", got)
	}
}

func TestInTxErrorStoresNothing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 2)
	m.Idempotency = &db.Idempotency{Key: "k1", RequestHash: []byte{1}}
	err := b.db.InTx(ctx, func(tx *db.DB) error {
		insert(t, tx, m)
		if _, _, err := tx.CancelMessage(ctx, db.DefaultProjectID(), m.ID); err != nil {
			return err
		}
		return errTest
	})
	if err != errTest {
		t.Fatalf("InTx = %v, want fn's error as it is", err)
	}
	for _, table := range []string{"messages", "recipients", "events", "idempotency_keys"} {
		if n := count(t, b.raw, `SELECT count(*) FROM `+table); n != 0 {
			t.Errorf("%d rows in %s after a failed transaction", n, table)
		}
	}
	// The key is free again.
	insert(t, b.db, m)
}

func TestInTxPanicRollsBack(t *testing.T) {
	t.Parallel()
	b := setup(t)
	m := newMessage(t, 1)
	func() {
		defer func() {
			if recover() == nil {
				t.Error("panic did not propagate")
			}
		}()
		_ = b.db.InTx(context.Background(), func(tx *db.DB) error {
			insert(t, tx, m)
			panic("boom")
		})
	}()
	if n := count(t, b.raw, `SELECT count(*) FROM messages`); n != 0 {
		t.Errorf("%d messages after a panic", n)
	}
	// The connection went back to the pool clean.
	insert(t, b.db, newMessage(t, 1))
}

// A nested InTx is a savepoint: its error undoes only its own work, and the
// outer transaction goes on.
func TestInTxNestedIsSavepoint(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	kept, undone, after := newMessage(t, 1), newMessage(t, 1), newMessage(t, 1)
	err := b.db.InTx(ctx, func(tx *db.DB) error {
		insert(t, tx, kept)
		err := tx.InTx(ctx, func(inner *db.DB) error {
			insert(t, inner, undone)
			return errTest
		})
		if err != errTest {
			t.Errorf("nested InTx = %v, want fn's error", err)
		}
		// A statement that fails inside the savepoint does not poison the
		// outer transaction either.
		err = tx.InTx(ctx, func(inner *db.DB) error {
			insert(t, inner, newMessage(t, 1))
			_, err := inner.InsertMessage(ctx, kept) // duplicate primary key
			return err
		})
		if err == nil {
			t.Error("duplicate insert in savepoint succeeded")
		}
		insert(t, tx, after)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	rows, err := b.raw.Query(ctx, `SELECT id FROM messages ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var ids []uuid.UUID
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	want := []uuid.UUID{kept.ID, after.ID}
	sortIDs(want)
	if !slices.Equal(ids, want) {
		t.Errorf("stored %v, want %v", ids, want)
	}
}

// Every state change, run on the pool and inside a transaction, leaves the
// message status derived from its recipients.
func TestStatusAfterEachChange(t *testing.T) {
	t.Parallel()
	for _, inTx := range []bool{false, true} {
		name := "pool"
		if inTx {
			name = "tx"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			ctx := context.Background()
			// run runs fn on the pool, or in a transaction of its own.
			run := func(fn func(d *db.DB) error) {
				t.Helper()
				var err error
				if inTx {
					err = b.db.InTx(ctx, fn)
				} else {
					err = fn(b.db)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			check := func(step string, id uuid.UUID, want string) {
				t.Helper()
				got := get(t, b.db, id)
				if got.Status != want || got.Status != deriveStatus(recipientStatuses(got)) {
					t.Errorf("after %s: status %q (recipients %v), want %q", step, got.Status, recipientStatuses(got), want)
				}
			}
			t0 := usec(time.Now())
			m := newMessage(t, 3)
			m.Now, m.SendAt = t0, t0.Add(time.Hour)
			run(func(d *db.DB) error { _, err := d.InsertMessage(ctx, m); return err })
			check("insert scheduled", m.ID, db.StatusScheduled)

			var claimed []db.ClaimedRecipient
			run(func(d *db.DB) error {
				var err error
				claimed, err = d.ClaimRecipients(ctx, db.ClaimParams{
					Owner: "w1", Limit: 10, LeaseFor: time.Minute, Now: t0.Add(time.Hour),
				})
				return err
			})
			if len(claimed) != 3 {
				t.Fatalf("claimed %d", len(claimed))
			}
			check("claim", m.ID, db.StatusSending)

			run(func(d *db.DB) error {
				_, err := d.RecordOutcomes(ctx, []db.Outcome{
					{RecipientID: claimed[0].ID, LeaseOwner: "w1", Status: db.StatusDelivered, Code: 250},
					{RecipientID: claimed[1].ID, LeaseOwner: "w1", Status: db.StatusDeferred, Code: 451,
						NextAttemptAt: t0.Add(2 * time.Hour)},
				})
				return err
			})
			check("outcomes", m.ID, db.StatusSending)

			run(func(d *db.DB) error {
				_, err := d.ReleaseLeases(ctx, "w1", []uuid.UUID{claimed[2].ID})
				return err
			})
			check("release", m.ID, db.StatusDeferred)

			run(func(d *db.DB) error {
				_, err := d.ClaimRecipients(ctx, db.ClaimParams{
					Owner: "w2", Limit: 10, LeaseFor: time.Minute, Now: t0.Add(2 * time.Hour),
				})
				return err
			})
			check("claim again", m.ID, db.StatusSending)

			run(func(d *db.DB) error {
				_, err := d.RescueExpiredLeases(ctx, t0.Add(3*time.Hour))
				return err
			})
			check("rescue", m.ID, db.StatusQueued)

			run(func(d *db.DB) error { _, _, err := d.CancelMessage(ctx, db.DefaultProjectID(), m.ID); return err })
			check("cancel", m.ID, db.MessagePartiallyDelivered)
		})
	}
}

// Two changes to one message's recipients composed in one transaction keep
// the locking order: recipients by id, then the message.
func TestInTxComposesChangesOfOneMessage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 2)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	err := b.db.InTx(ctx, func(tx *db.DB) error {
		if _, err := tx.RecordOutcomes(ctx, []db.Outcome{{
			RecipientID: claimed[0].ID, LeaseOwner: claimed[0].LeaseOwner, Status: db.StatusDelivered, Code: 250,
		}}); err != nil {
			return err
		}
		if _, err := tx.ReleaseLeases(ctx, claimed[1].LeaseOwner, []uuid.UUID{claimed[1].ID}); err != nil {
			return err
		}
		_, _, err := tx.CancelMessage(ctx, db.DefaultProjectID(), m.ID)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	got := get(t, b.db, m.ID)
	if got.Status != db.MessagePartiallyDelivered {
		t.Errorf("status %q (recipients %v), want partially_delivered", got.Status, recipientStatuses(got))
	}
}

func TestRecordOutcomesAmbiguousAndLocal(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 1)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	if len(claimed) != 1 || claimed[0].AmbiguousAttempts != 0 {
		t.Fatalf("claimed %+v", claimed)
	}
	started := usec(time.Now().Add(-time.Minute))
	retryAt := usec(time.Now().Add(-time.Second))
	applied, err := b.db.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: claimed[0].ID, LeaseOwner: claimed[0].LeaseOwner, Status: db.StatusDeferred,
		NextAttemptAt: retryAt, Text: "connection lost after end of data", Ambiguous: true,
		Attempts: []db.NewAttempt{
			{StartedAt: started, Duration: time.Second, MXHost: "mx1.d0.example.test",
				Source: db.AttemptSourceLocal, Text: "connection refused"},
			{StartedAt: started.Add(time.Second), Duration: 2 * time.Second, MXHost: "mx2.d0.example.test",
				IP: "127.0.0.9", Source: db.AttemptSourceLocal, Ambiguous: true,
				Text: "connection lost after end of data"},
		},
	}})
	if err != nil || len(applied) != 1 {
		t.Fatalf("RecordOutcomes = %v, %v", applied, err)
	}
	got := get(t, b.db, m.ID)
	if len(got.Attempts) != 2 {
		t.Fatalf("%d attempts, want 2", len(got.Attempts))
	}
	if a := got.Attempts[0]; a.Source != db.AttemptSourceLocal || a.Outcome != db.StatusDeferred ||
		a.Code != 0 || a.Text != "connection refused" || a.MXHost != "mx1.d0.example.test" {
		t.Errorf("refused host's attempt = %+v", a)
	}
	if a := got.Attempts[1]; a.Source != db.AttemptSourceLocal || a.Outcome != db.AttemptAmbiguous ||
		a.IP != "127.0.0.9" || a.Duration != 2*time.Second || !a.StartedAt.Equal(started.Add(time.Second)) {
		t.Errorf("ambiguous attempt = %+v", a)
	}
	if r := got.Recipients[0]; r.Status != db.StatusDeferred || r.Attempts != 1 || r.NextAttemptAt == nil ||
		!r.NextAttemptAt.Equal(retryAt) || r.LastText != "connection lost after end of data" {
		t.Errorf("recipient = %+v", r)
	}
	again := claimAll(t, b.db, time.Time{})
	if len(again) != 1 || again[0].AmbiguousAttempts != 1 || again[0].Attempts != 1 {
		t.Fatalf("claimed again %+v, want one ambiguous attempt", again)
	}

	// A remote reply and a delivery: the ambiguous count stays, delivered_at
	// is set.
	_, err = b.db.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: again[0].ID, LeaseOwner: again[0].LeaseOwner, Status: db.StatusDelivered, Code: 250,
		Attempts: []db.NewAttempt{{StartedAt: started.Add(time.Minute), Code: 250, MXHost: "mx2.d0.example.test"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	got = get(t, b.db, m.ID)
	if a := got.Attempts[2]; a.Source != db.AttemptSourceRemote || a.Outcome != db.StatusDelivered {
		t.Errorf("delivering attempt = %+v", a)
	}
	if r := got.Recipients[0]; r.DeliveredAt == nil || r.Attempts != 2 || got.Status != db.StatusDelivered {
		t.Errorf("delivered recipient = %+v, message %q", r, got.Status)
	}
	if n := count(t, b.raw, `SELECT ambiguous_attempts FROM recipients WHERE id = $1`, again[0].ID); n != 1 {
		t.Errorf("ambiguous_attempts = %d, want 1", n)
	}
}
