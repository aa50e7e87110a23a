package db_test

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// leaseUntil reads a recipient's lease expiry straight from its row.
func leaseUntil(t *testing.T, b bundle, id uuid.UUID) *time.Time {
	t.Helper()
	var until *time.Time
	if err := b.raw.QueryRow(context.Background(), `SELECT lease_until FROM recipients WHERE id = $1`, id).Scan(&until); err != nil {
		t.Fatal(err)
	}
	return until
}

func TestRenewLeases(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	t0 := usec(time.Now().Add(time.Hour))
	claim := func(owner string, n int, now time.Time) []db.ClaimedRecipient {
		t.Helper()
		insert(t, b.db, newMessage(t, n))
		c, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: owner, Limit: 10, LeaseFor: time.Second, Now: now})
		if err != nil || len(c) != n {
			t.Fatalf("claim for %s = %d rows, %v; want %d", owner, len(c), err, n)
		}
		return c
	}
	a := claim("a", 2, t0)
	bOwn := claim("b", 1, t0)
	other := claim("other", 1, t0)
	done := claim("done", 1, t0)
	lost := claim("lost", 1, t0.Add(-30*time.Minute))
	// done's recipient has its outcome; lost's lease ran out and was rescued.
	if _, err := b.db.RecordOutcomes(ctx, []db.Outcome{{RecipientID: done[0].ID, LeaseOwner: "done",
		Status: db.StatusDelivered, Code: 250}}); err != nil {
		t.Fatal(err)
	}
	if r, err := b.db.RescueExpiredLeases(ctx, t0); err != nil || r.Recipients != 1 {
		t.Fatalf("rescue = %+v, %v; want lost's one recipient", r, err)
	}

	t1 := t0.Add(500 * time.Millisecond)
	held, err := b.db.RenewLeases(ctx, []string{"a", "b", "done", "lost", "never"}, time.Minute, t1)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]int{"a": 2, "b": 1}; !maps.Equal(held, want) {
		t.Fatalf("renewed %v, want %v", held, want)
	}
	for _, r := range append(a, bOwn...) {
		if got := leaseUntil(t, b, r.ID); got == nil || !got.Equal(t1.Add(time.Minute)) {
			t.Errorf("lease of %s's recipient until %v, want %v", r.LeaseOwner, got, t1.Add(time.Minute))
		}
	}
	if got := leaseUntil(t, b, other[0].ID); got == nil || !got.Equal(t0.Add(time.Second)) {
		t.Errorf("owner not named was renewed: until %v", got)
	}
	for _, r := range append(done, lost...) {
		if got := leaseUntil(t, b, r.ID); got != nil {
			t.Errorf("%s's recipient got a lease back: until %v", r.LeaseOwner, got)
		}
	}
	// The rescued recipient is not revived: it is queued for the next claim.
	if m := get(t, b.db, lost[0].MessageID); m.Recipients[0].Status != db.StatusQueued {
		t.Errorf("rescued recipient is %s", m.Recipients[0].Status)
	}

	if held, err := b.db.RenewLeases(ctx, nil, time.Minute, time.Time{}); err != nil || len(held) != 0 {
		t.Errorf("renew of no owners = %v, %v", held, err)
	}
	if _, err := b.db.RenewLeases(ctx, []string{"a"}, 0, time.Time{}); err == nil {
		t.Error("renew for 0s: no error")
	}
	// The database's clock: the lease ends after now.
	before := time.Now()
	if held, err := b.db.RenewLeases(ctx, []string{"a"}, time.Minute, time.Time{}); err != nil || held["a"] != 2 {
		t.Fatalf("renew on the database clock = %v, %v", held, err)
	}
	if got := leaseUntil(t, b, a[0].ID); got == nil || got.Before(before.Add(50*time.Second)) {
		t.Errorf("lease until %v, want about a minute from now", got)
	}
}
