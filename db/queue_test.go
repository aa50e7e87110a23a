package db_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

func TestClaimConcurrentClaimersNeverShareRows(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const messages, perMessage = 40, 5
	for range messages {
		insert(t, b.db, newMessage(t, perMessage))
	}
	claimConcurrently(t, b, messages*perMessage)
}

// TestClaimConcurrentClaimersNeverShareGroupedRows is the test above with
// every message's recipients at one domain, so that each claim takes the
// rest of the groups it picked.
func TestClaimConcurrentClaimersNeverShareGroupedRows(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const messages, perMessage = 40, 5
	for i := range messages {
		domains := make([]string, perMessage)
		for j := range domains {
			domains[j] = fmt.Sprintf("g%d.example.test", i%3)
		}
		insert(t, b.db, newMessageTo(t, domains...))
	}
	claimConcurrently(t, b, messages*perMessage)
}

// claimConcurrently runs claimers side by side until the queue is empty and
// checks that every one of the want rows was claimed exactly once.
func claimConcurrently(t *testing.T, b bundle, want int) {
	t.Helper()
	const claimers = 4
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		all = map[uuid.UUID]string{}
	)
	for i := range claimers {
		wg.Go(func() {
			for round := 0; ; round++ {
				owner := "claimer-" + string(rune('a'+i)) + "-" + newID(t).String()
				got, err := b.db.ClaimRecipients(context.Background(), db.ClaimParams{
					Owner: owner, Limit: 7, LeaseFor: time.Minute,
				})
				if err != nil {
					t.Errorf("ClaimRecipients: %v", err)
					return
				}
				if len(got) == 0 {
					return
				}
				mu.Lock()
				for _, c := range got {
					if c.LeaseOwner != owner {
						t.Errorf("row %s leased to %q, want %q", c.ID, c.LeaseOwner, owner)
					}
					if prev, dup := all[c.ID]; dup {
						t.Errorf("row %s claimed by %s and %s", c.ID, prev, owner)
					}
					all[c.ID] = owner
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(all) != want {
		t.Errorf("claimed %d rows, want %d", len(all), want)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM recipients WHERE status <> 'sending'`); n != 0 {
		t.Errorf("%d rows not sending after claiming everything", n)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM messages WHERE status <> 'sending'`); n != 0 {
		t.Errorf("%d messages not sending after claiming everything", n)
	}
}

// TestClaimTakesWholeGroups checks that a claim whose limit falls inside
// the recipients of one message at one domain takes the rest of them too,
// so that they can go out in one transaction, and nothing else beyond the
// limit: not the message's recipients at other domains, nor another
// message's at the same domain.
func TestClaimTakesWholeGroups(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	base := usec(time.Now().Add(time.Hour))

	first := newMessage(t, 5) // d0 to d4, due first
	first.SendAt = base
	insert(t, b.db, first)
	domains := []string{"a.example.test", "z.example.test"}
	for range 30 {
		domains = append(domains, "big.example.test")
	}
	big := newMessageTo(t, domains...)
	big.SendAt = base.Add(time.Second)
	insert(t, b.db, big)
	other := newMessageTo(t, "big.example.test", "big.example.test", "big.example.test")
	other.SendAt = base.Add(2 * time.Second)
	insert(t, b.db, other)

	now := base.Add(time.Minute)
	claimed, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "one", Limit: 10, LeaseFor: time.Minute, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	// first's 5 and big's a.example.test fill 6 of the 10; the other 4 are
	// rows of big at big.example.test, which bring the other 26.
	groups := map[string]int{}
	for _, c := range claimed {
		msg := map[uuid.UUID]string{first.ID: "first", big.ID: "big", other.ID: "other"}[c.MessageID]
		groups[msg+" "+c.Domain]++
	}
	want := map[string]int{"big a.example.test": 1, "big big.example.test": 30}
	for _, r := range first.Recipients {
		want["first "+r.Domain] = 1
	}
	if !maps.Equal(groups, want) {
		t.Fatalf("claimed (message domain: rows) %v, want %v", groups, want)
	}

	// The next claim takes what is left, whole groups again.
	claimed, err = b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "two", Limit: 2, LeaseFor: time.Minute, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	clear(groups)
	for _, c := range claimed {
		groups[c.MessageID.String()+" "+c.Domain]++
	}
	want = map[string]int{big.ID.String() + " z.example.test": 1, other.ID.String() + " big.example.test": 3}
	if !maps.Equal(groups, want) {
		t.Fatalf("second claim %v, want %v", groups, want)
	}
}

// TestClaimTakesDueRowsOfGroupAtOtherTimes checks that a group whose rows
// were deferred to different times is claimed whole once they are all due,
// whatever the limit, while a row of it that is not due yet stays.
func TestClaimTakesDueRowsOfGroupAtOtherTimes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessageTo(t, "g.example.test", "g.example.test", "g.example.test", "g.example.test")
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	if len(claimed) != 4 {
		t.Fatalf("claimed %d rows, want 4", len(claimed))
	}
	t0 := usec(time.Now().Add(time.Hour))
	var outcomes []db.Outcome
	for i, c := range claimed {
		next := t0.Add(time.Duration(i) * time.Minute)
		if i == 3 {
			next = t0.Add(time.Hour)
		}
		outcomes = append(outcomes, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner,
			Status: db.StatusDeferred, NextAttemptAt: next, Code: 451})
	}
	if _, err := b.db.RecordOutcomes(ctx, outcomes); err != nil {
		t.Fatal(err)
	}

	again, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "o", Limit: 1, LeaseFor: time.Minute, Now: t0.Add(10 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	var got []uuid.UUID
	for _, c := range again {
		got = append(got, c.ID)
	}
	want := []uuid.UUID{claimed[0].ID, claimed[1].ID, claimed[2].ID}
	sortIDs(got)
	sortIDs(want)
	if !slices.Equal(got, want) {
		t.Fatalf("claimed %v, want the three due rows %v", got, want)
	}
}

func TestClaimPinnedClock(t *testing.T) {
	t.Parallel()
	b := setup(t)
	sendAt := usec(time.Now().Add(24 * time.Hour))
	later := newMessage(t, 2)
	later.SendAt = sendAt.Add(time.Hour)
	insert(t, b.db, later)
	sched := newMessage(t, 2)
	sched.SendAt = sendAt
	insert(t, b.db, sched)

	if got := claimAll(t, b.db, time.Time{}); len(got) != 0 {
		t.Fatalf("database clock: claimed %d scheduled rows before send_at", len(got))
	}
	if got := claimAll(t, b.db, sendAt.Add(-time.Microsecond)); len(got) != 0 {
		t.Fatalf("just before send_at: claimed %d rows", len(got))
	}

	now := sendAt.Add(time.Second)
	c, err := b.db.ClaimRecipients(context.Background(), db.ClaimParams{
		Owner: "pinned", Limit: 10, LeaseFor: 90 * time.Second, Now: now,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(c) != 2 {
		t.Fatalf("claimed %d rows at send_at, want the 2 due ones", len(c))
	}
	m := get(t, b.db, sched.ID)
	for _, got := range c {
		if got.MessageID != sched.ID {
			t.Errorf("claimed a row of %s, which is not due", got.MessageID)
		}
		if !got.LeaseUntil.Equal(now.Add(90*time.Second)) || got.LeaseOwner != "pinned" {
			t.Errorf("lease = %q until %v, want pinned until %v", got.LeaseOwner, got.LeaseUntil, now.Add(90*time.Second))
		}
		if got.Attempts != 0 || !got.MessageCreatedAt.Equal(m.CreatedAt) || got.Address == "" || got.Domain == "" {
			t.Errorf("claimed row = %+v", got)
		}
		if !got.DueSince.Equal(sendAt) {
			t.Errorf("DueSince = %v, want send_at %v (later than creation at %v)", got.DueSince, sendAt, m.CreatedAt)
		}
	}
	if m.Status != db.StatusSending {
		t.Errorf("message status = %q, want sending", m.Status)
	}
	if other := get(t, b.db, later.ID); other.Status != db.StatusScheduled {
		t.Errorf("not-yet-due message status = %q, want scheduled", other.Status)
	}
}

// TestClaimDueSince checks that a message without a send_at, or with one
// that had passed when it was accepted, is due since its creation.
func TestClaimDueSince(t *testing.T) {
	t.Parallel()
	b := setup(t)
	now := newMessage(t, 1)
	insert(t, b.db, now)
	past := newMessage(t, 1)
	past.SendAt = usec(time.Now().Add(-time.Hour))
	insert(t, b.db, past)

	claimed := claimAll(t, b.db, time.Time{})
	if len(claimed) != 2 {
		t.Fatalf("claimed %d rows, want 2", len(claimed))
	}
	for _, c := range claimed {
		created := get(t, b.db, c.MessageID).CreatedAt
		if !c.DueSince.Equal(created) || !c.MessageCreatedAt.Equal(created) {
			t.Errorf("message %s: DueSince %v, MessageCreatedAt %v; want both its creation at %v",
				c.MessageID, c.DueSince, c.MessageCreatedAt, created)
		}
	}
}

func TestClaimOldestDueFirst(t *testing.T) {
	t.Parallel()
	b := setup(t)
	base := usec(time.Now().Add(time.Hour))
	var want []uuid.UUID
	for i := range 3 {
		m := newMessage(t, 1)
		m.SendAt = base.Add(time.Duration(3-i) * time.Minute)
		insert(t, b.db, m)
		want = append([]uuid.UUID{m.Recipients[0].ID}, want...)
	}
	var got []uuid.UUID
	for range 3 {
		c, err := b.db.ClaimRecipients(context.Background(), db.ClaimParams{
			Owner: newID(t).String(), Limit: 1, LeaseFor: time.Minute, Now: base.Add(time.Hour),
		})
		if err != nil || len(c) != 1 {
			t.Fatalf("ClaimRecipients = %v, %v", c, err)
		}
		got = append(got, c[0].ID)
	}
	if !slices.Equal(got, want) {
		t.Errorf("claim order %v, want %v", got, want)
	}
}

func TestClaimValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tests := []struct {
		name string
		p    db.ClaimParams
		want string
	}{
		{"no owner", db.ClaimParams{Limit: 1, LeaseFor: time.Second}, "Owner"},
		{"no limit", db.ClaimParams{Owner: "o", LeaseFor: time.Second}, "Limit"},
		{"no lease", db.ClaimParams{Owner: "o", Limit: 1}, "LeaseFor"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := b.db.ClaimRecipients(context.Background(), tt.p)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one naming %s", err, tt.want)
			}
		})
	}
}

func TestRecordOutcomes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 3)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	if len(claimed) != 3 {
		t.Fatalf("claimed %d", len(claimed))
	}
	byAddr := map[string]db.ClaimedRecipient{}
	for _, c := range claimed {
		byAddr[c.Address] = c
	}
	started := usec(time.Now().Add(-2 * time.Second))
	retryAt := usec(time.Now().Add(time.Hour))
	r0, r1, r2 := byAddr[m.Recipients[0].Address], byAddr[m.Recipients[1].Address], byAddr[m.Recipients[2].Address]
	outcomes := []db.Outcome{
		{
			// The first host was busy, the second took the message.
			RecipientID: r0.ID, LeaseOwner: r0.LeaseOwner, Status: db.StatusDelivered,
			Code: 250, EnhancedCode: "2.0.0", Text: "ok queued as X",
			Attempts: []db.NewAttempt{
				{StartedAt: started, Duration: 5 * time.Millisecond, MXHost: "mx1.d0.example.test", IP: "127.0.0.3",
					Code: 421, EnhancedCode: "4.3.2", Text: "too busy"},
				{StartedAt: started.Add(5 * time.Millisecond), Duration: 1500 * time.Millisecond,
					MXHost: "mx.d0.example.test", IP: "127.0.0.1", TLS: true, TLSVersion: "TLS 1.3",
					Code: 250, EnhancedCode: "2.0.0", Text: "ok queued as X"},
			},
		},
		{
			RecipientID: r1.ID, LeaseOwner: r1.LeaseOwner, Status: db.StatusDeferred, NextAttemptAt: retryAt,
			Code: 451, EnhancedCode: "4.7.1", Text: "try later",
			Attempts: []db.NewAttempt{{StartedAt: started, Duration: 20 * time.Millisecond,
				MXHost: "mx.d1.example.test", IP: "127.0.0.2", Code: 451, EnhancedCode: "4.7.1", Text: "try later"}},
		},
		{
			// No SMTP attempt: the domain had a null MX.
			RecipientID: r2.ID, LeaseOwner: r2.LeaseOwner, Status: db.StatusBounced,
			Code: 556, EnhancedCode: "5.1.10", Text: "domain accepts no mail",
		},
	}
	applied, err := b.db.RecordOutcomes(ctx, outcomes)
	if err != nil {
		t.Fatal(err)
	}
	wantApplied := []db.Applied{{RecipientID: r0.ID, Status: db.StatusDelivered},
		{RecipientID: r1.ID, Status: db.StatusDeferred}, {RecipientID: r2.ID, Status: db.StatusBounced}}
	if !sameApplied(applied, wantApplied) {
		t.Fatalf("applied %v, want %v", applied, wantApplied)
	}

	got := get(t, b.db, m.ID)
	if got.Status != db.StatusDeferred {
		t.Errorf("message status = %q, want deferred", got.Status)
	}
	rs := got.Recipients
	if r := rs[0]; r.Status != db.StatusDelivered || r.Attempts != 1 || r.LastCode != 250 ||
		r.LastEnhancedCode != "2.0.0" || r.LastText != "ok queued as X" || r.DeliveredAt == nil || r.NextAttemptAt != nil {
		t.Errorf("delivered recipient = %+v", r)
	}
	if r := rs[1]; r.Status != db.StatusDeferred || r.Attempts != 1 || r.LastCode != 451 ||
		r.NextAttemptAt == nil || !r.NextAttemptAt.Equal(retryAt) || r.DeliveredAt != nil {
		t.Errorf("deferred recipient = %+v", r)
	}
	if r := rs[2]; r.Status != db.StatusBounced || r.Attempts != 1 || r.LastCode != 556 ||
		r.LastEnhancedCode != "5.1.10" || r.NextAttemptAt != nil {
		t.Errorf("bounced recipient = %+v", r)
	}
	if len(got.Attempts) != 3 {
		t.Fatalf("%d attempts, want 3", len(got.Attempts))
	}
	var delivered []db.Attempt
	for _, a := range got.Attempts {
		switch a.RecipientID {
		case r0.ID:
			delivered = append(delivered, a)
		case r1.ID:
			if a.Outcome != db.StatusDeferred || a.Code != 451 || a.EnhancedCode != "4.7.1" || a.Text != "try later" ||
				a.TLS || a.Duration != 20*time.Millisecond {
				t.Errorf("deferred attempt = %+v", a)
			}
		default:
			t.Errorf("attempt for %s, which had none", a.RecipientID)
		}
	}
	if len(delivered) != 2 {
		t.Fatalf("%d attempts for the delivered recipient, want one per host", len(delivered))
	}
	if a := delivered[0]; !a.StartedAt.Equal(started) || a.Duration != 5*time.Millisecond || a.MXHost != "mx1.d0.example.test" ||
		a.IP != "127.0.0.3" || a.TLS || a.Code != 421 || a.EnhancedCode != "4.3.2" || a.Text != "too busy" ||
		a.Outcome != db.StatusDeferred || a.ID == uuid.Nil {
		t.Errorf("busy host's attempt = %+v, want it first and deferred", a)
	}
	if a := delivered[1]; !a.StartedAt.Equal(started.Add(5*time.Millisecond)) || a.Duration != 1500*time.Millisecond ||
		a.MXHost != "mx.d0.example.test" || a.IP != "127.0.0.1" || !a.TLS || a.TLSVersion != "TLS 1.3" || a.Code != 250 ||
		a.EnhancedCode != "2.0.0" || a.Text != "ok queued as X" || a.Outcome != db.StatusDelivered || a.ID == uuid.Nil {
		t.Errorf("delivered attempt = %+v", a)
	}
	if got := eventTypes(t, b.raw, m.ID); !slices.Equal(slices.Sorted(slices.Values(got)),
		[]string{"accepted", "bounced", "deferred", "delivered"}) {
		t.Errorf("events = %v", got)
	}
	var code int
	var enhanced, mx string
	if err := b.raw.QueryRow(ctx, `SELECT (details->>'code')::int, details->>'enhanced_code', details->>'mx_host'
		FROM events WHERE recipient_id = $1`, r0.ID).Scan(&code, &enhanced, &mx); err != nil {
		t.Fatal(err)
	}
	if code != 250 || enhanced != "2.0.0" || mx != "mx.d0.example.test" {
		t.Errorf("event details = %d %q %q", code, enhanced, mx)
	}

	// The deferred row comes back when due, with its attempts counted.
	again := claimAll(t, b.db, retryAt)
	if len(again) != 1 || again[0].ID != r1.ID || again[0].Attempts != 1 {
		t.Fatalf("claim at retry time = %+v", again)
	}
	applied, err = b.db.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: r1.ID, LeaseOwner: again[0].LeaseOwner, Status: db.StatusFailed,
		Code: 451, Text: "gave up",
	}})
	if err != nil || len(applied) != 1 {
		t.Fatalf("RecordOutcomes = %v, %v", applied, err)
	}
	got = get(t, b.db, m.ID)
	if got.Status != db.MessagePartiallyDelivered || got.Recipients[1].Attempts != 2 {
		t.Errorf("after giving up: message %q, attempts %d", got.Status, got.Recipients[1].Attempts)
	}
	if !got.UpdatedAt.After(got.CreatedAt) {
		t.Errorf("UpdatedAt %v not after CreatedAt %v", got.UpdatedAt, got.CreatedAt)
	}
}

func TestMessageStatusDerivation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tests := []struct {
		outcomes []string // "" leaves the recipient in flight
		want     string
	}{
		{[]string{db.StatusDelivered}, db.StatusDelivered},
		{[]string{db.StatusDelivered, db.StatusDelivered}, db.StatusDelivered},
		{[]string{db.StatusBounced, db.StatusBounced}, db.StatusBounced},
		{[]string{db.StatusFailed}, db.StatusFailed},
		{[]string{db.StatusDelivered, db.StatusBounced}, db.MessagePartiallyDelivered},
		{[]string{db.StatusDelivered, db.StatusFailed, db.StatusBounced}, db.MessagePartiallyDelivered},
		{[]string{db.StatusBounced, db.StatusFailed}, db.StatusFailed},
		{[]string{db.StatusDelivered, db.StatusDeferred}, db.StatusDeferred},
		{[]string{db.StatusDeferred, ""}, db.StatusSending},
		{[]string{db.StatusDelivered, ""}, db.StatusSending},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.outcomes, ",")+"="+tt.want, func(t *testing.T) {
			// Sequential on one database: each case claims only its own rows,
			// as earlier ones are final, in flight or deferred for an hour.
			m := newMessage(t, len(tt.outcomes))
			insert(t, b.db, m)
			claimed := claimAll(t, b.db, time.Time{})
			if len(claimed) != len(tt.outcomes) {
				t.Fatalf("claimed %d rows, want %d", len(claimed), len(tt.outcomes))
			}
			var outcomes []db.Outcome
			for _, c := range claimed {
				i := slices.IndexFunc(m.Recipients, func(r db.NewRecipient) bool { return r.ID == c.ID })
				if tt.outcomes[i] == "" {
					continue
				}
				outcomes = append(outcomes, db.Outcome{
					RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: tt.outcomes[i],
					NextAttemptAt: time.Now().Add(time.Hour), Code: 250,
				})
			}
			if _, err := b.db.RecordOutcomes(context.Background(), outcomes); err != nil {
				t.Fatal(err)
			}
			if got := get(t, b.db, m.ID); got.Status != tt.want {
				t.Errorf("status = %q (recipients %v), want %q", got.Status, recipientStatuses(got), tt.want)
			}
		})
	}
}

func TestRecordOutcomesFencing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 1)
	insert(t, b.db, m)
	t0 := usec(time.Now().Add(time.Hour))

	claimA, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "A", Limit: 1, LeaseFor: time.Minute, Now: t0})
	if err != nil || len(claimA) != 1 {
		t.Fatalf("claim A = %v, %v", claimA, err)
	}
	// A's lease runs out; the rescuer hands the row to B.
	rescued, err := b.db.RescueExpiredLeases(ctx, t0.Add(2*time.Minute))
	if err != nil || rescued != (db.Rescued{Recipients: 1}) {
		t.Fatalf("RescueExpiredLeases = %+v, %v", rescued, err)
	}
	claimB, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "B", Limit: 1, LeaseFor: time.Minute, Now: t0.Add(2 * time.Minute)})
	if err != nil || len(claimB) != 1 || claimB[0].ID != claimA[0].ID {
		t.Fatalf("claim B = %v, %v", claimB, err)
	}

	// A finishes late: nothing of it may land.
	applied, err := b.db.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: claimA[0].ID, LeaseOwner: "A", Status: db.StatusDelivered, Code: 250,
		Attempts: []db.NewAttempt{
			{StartedAt: t0, Duration: time.Second, MXHost: "mx1.example.test", Text: "connection refused"},
			{StartedAt: t0.Add(time.Second), Duration: time.Second, MXHost: "mx2.example.test", Code: 250},
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(applied) != 0 {
		t.Fatalf("stale owner's outcome applied: %v", applied)
	}
	got := get(t, b.db, m.ID)
	if r := got.Recipients[0]; r.Status != db.StatusSending || r.Attempts != 0 || r.LastCode != 0 {
		t.Errorf("recipient after stale outcome = %+v", r)
	}
	if len(got.Attempts) != 0 || len(eventTypes(t, b.raw, m.ID)) != 1 {
		t.Errorf("stale outcome wrote attempts %v / events %v", got.Attempts, eventTypes(t, b.raw, m.ID))
	}
	var owner string
	if err := b.raw.QueryRow(ctx, `SELECT lease_owner FROM recipients WHERE id = $1`, claimA[0].ID).Scan(&owner); err != nil {
		t.Fatal(err)
	}
	if owner != "B" {
		t.Errorf("lease owner = %q, want B", owner)
	}

	applied, err = b.db.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: claimB[0].ID, LeaseOwner: "B", Status: db.StatusBounced, Code: 550,
	}})
	if err != nil || len(applied) != 1 {
		t.Fatalf("B's outcome: %v, %v", applied, err)
	}
	if got := get(t, b.db, m.ID); got.Status != db.StatusBounced {
		t.Errorf("status = %q, want bounced", got.Status)
	}
	// A row that is final is fenced too.
	applied, err = b.db.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: claimB[0].ID, LeaseOwner: "B", Status: db.StatusDelivered, Code: 250,
	}})
	if err != nil || len(applied) != 0 {
		t.Fatalf("outcome on a final row: %v, %v", applied, err)
	}
}

// An outcome written again with the same attempt ids, as after a commit
// whose answer was lost, counts as applied and writes nothing twice; a
// stale owner's outcome with new ids stays fenced off.
func TestRecordOutcomesRepeatedWrite(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 1)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	attemptID, err := db.NewAttemptID()
	if err != nil {
		t.Fatal(err)
	}
	out := db.Outcome{
		RecipientID: claimed[0].ID, LeaseOwner: claimed[0].LeaseOwner, Status: db.StatusDelivered, Code: 250,
		Attempts: []db.NewAttempt{{ID: attemptID, StartedAt: time.Now(), MXHost: "mx.example.test", Code: 250}},
	}
	for i := range 2 {
		// The second write finds the first: applied earlier, delivered.
		want := db.Applied{RecipientID: claimed[0].ID, Status: db.StatusDelivered, Earlier: i == 1}
		applied, err := b.db.RecordOutcomes(ctx, []db.Outcome{out})
		if err != nil || len(applied) != 1 || applied[0] != want {
			t.Fatalf("write %d: applied %v, %v; want %+v", i+1, applied, err, want)
		}
	}
	got := get(t, b.db, m.ID)
	if r := got.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 1 {
		t.Errorf("recipient = %+v, want delivered after one attempt", r)
	}
	if len(got.Attempts) != 1 || got.Attempts[0].ID != attemptID {
		t.Errorf("attempt rows = %+v, want the one written", got.Attempts)
	}
	if types := eventTypes(t, b.raw, m.ID); len(types) != 2 {
		t.Errorf("events = %v, want accepted and one delivered", types)
	}

	out.Attempts[0].ID = uuid.Nil
	applied, err := b.db.RecordOutcomes(ctx, []db.Outcome{out})
	if err != nil || len(applied) != 0 {
		t.Errorf("new attempt on a final row: applied %v, %v; want none", applied, err)
	}
}

// Outcomes of recipients whose message was canceled while they were being
// sent: a deferred or failed one is stored canceled, and RecordOutcomes says
// so, as it does when the same outcomes are written again after a lost
// answer; a delivery stands.
func TestRecordOutcomesCanceledInFlight(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 3)
	insert(t, b.db, m)
	claimed := claimAll(t, b.db, time.Time{})
	if len(claimed) != 3 {
		t.Fatalf("claimed %d", len(claimed))
	}
	if _, n, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), m.ID); err != nil || n != 0 {
		t.Fatalf("cancel = %d canceled, %v; want none canceled yet, all in flight", n, err)
	}
	now := time.Now()
	statuses := []string{db.StatusFailed, db.StatusDeferred, db.StatusDelivered}
	outs := make([]db.Outcome, len(claimed))
	for i, c := range claimed {
		id, err := db.NewAttemptID()
		if err != nil {
			t.Fatal(err)
		}
		outs[i] = db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: statuses[i],
			NextAttemptAt: now.Add(time.Hour), Code: 451, Text: "later",
			Attempts: []db.NewAttempt{{ID: id, StartedAt: now, MXHost: "mx.example.test", Code: 451}}}
	}
	outs[2].Code = 250
	applied, err := b.db.RecordOutcomes(ctx, outs)
	want := []db.Applied{
		{RecipientID: claimed[0].ID, Status: db.StatusCanceled},
		{RecipientID: claimed[1].ID, Status: db.StatusCanceled},
		{RecipientID: claimed[2].ID, Status: db.StatusDelivered},
	}
	if err != nil || !sameApplied(applied, want) {
		t.Fatalf("RecordOutcomes = %+v, %v; want %+v", applied, err, want)
	}
	for _, a := range applied {
		if !a.Final() {
			t.Errorf("%+v is not final", a)
		}
	}
	got := get(t, b.db, m.ID)
	for _, r := range got.Recipients {
		wantStatus := db.StatusCanceled
		if r.ID == claimed[2].ID {
			wantStatus = db.StatusDelivered
		}
		if r.Status != wantStatus {
			t.Errorf("recipient %s = %q, want %q", r.ID, r.Status, wantStatus)
		}
	}

	// Written again, as after a commit whose answer was lost: each is
	// applied earlier, with the status stored then, but for the deferred
	// one, canceled now for a reason that can no longer be told.
	applied, err = b.db.RecordOutcomes(ctx, outs)
	want = []db.Applied{
		{RecipientID: claimed[0].ID, Status: db.StatusCanceled, Earlier: true},
		{RecipientID: claimed[1].ID, Earlier: true},
		{RecipientID: claimed[2].ID, Status: db.StatusDelivered, Earlier: true},
	}
	if err != nil || !sameApplied(applied, want) {
		t.Fatalf("RecordOutcomes again = %+v, %v; want %+v", applied, err, want)
	}
}

func TestRecordOutcomesValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	id := newID(t)
	ok := db.Outcome{RecipientID: id, LeaseOwner: "o", Status: db.StatusDelivered, Code: 250}
	tests := []struct {
		name     string
		outcomes []db.Outcome
		want     string
	}{
		{"no recipient", []db.Outcome{{LeaseOwner: "o", Status: db.StatusDelivered}}, "RecipientID"},
		{"no owner", []db.Outcome{{RecipientID: id, Status: db.StatusDelivered}}, "LeaseOwner"},
		{"bad status", []db.Outcome{{RecipientID: id, LeaseOwner: "o", Status: db.StatusQueued}}, "Status"},
		{"deferred without time", []db.Outcome{{RecipientID: id, LeaseOwner: "o", Status: db.StatusDeferred}}, "NextAttemptAt"},
		{"attempt without start", []db.Outcome{{RecipientID: id, LeaseOwner: "o", Status: db.StatusDelivered,
			Attempts: []db.NewAttempt{{StartedAt: time.Now()}, {}}}}, "Attempts[1].StartedAt"},
		{"negative duration", []db.Outcome{{RecipientID: id, LeaseOwner: "o", Status: db.StatusDelivered,
			Attempts: []db.NewAttempt{{StartedAt: time.Now(), Duration: -time.Second}}}}, "Attempts[0].Duration"},
		{"duplicate", []db.Outcome{ok, ok}, "twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := b.db.RecordOutcomes(context.Background(), tt.outcomes)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one naming %s", err, tt.want)
			}
		})
	}
	if applied, err := b.db.RecordOutcomes(context.Background(), nil); err != nil || applied != nil {
		t.Errorf("no outcomes: %v, %v", applied, err)
	}
}

func TestRescueExpiredLeases(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	keep := newMessage(t, 2)
	insert(t, b.db, keep)
	cancel := newMessage(t, 1)
	insert(t, b.db, cancel)
	t0 := usec(time.Now().Add(time.Hour))
	claimed, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "lost", Limit: 10, LeaseFor: time.Minute, Now: t0})
	if err != nil || len(claimed) != 3 {
		t.Fatalf("claim = %v, %v", claimed, err)
	}
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), cancel.ID); err != nil {
		t.Fatal(err)
	}

	for _, now := range []time.Time{{}, t0.Add(30 * time.Second), t0.Add(time.Minute)} {
		if r, err := b.db.RescueExpiredLeases(ctx, now); err != nil || r != (db.Rescued{}) {
			t.Fatalf("rescue at %v (lease still valid) = %+v, %v", now, r, err)
		}
	}
	// The cancel-requested one ends canceled, and is reported so.
	rescued, err := b.db.RescueExpiredLeases(ctx, t0.Add(time.Minute+time.Microsecond))
	if err != nil || rescued != (db.Rescued{Recipients: 3, Canceled: 1}) {
		t.Fatalf("rescue after expiry = %+v, %v; want 3, 1 of them canceled", rescued, err)
	}
	got := get(t, b.db, keep.ID)
	if got.Status != db.StatusQueued || !slices.Equal(recipientStatuses(got), []string{"queued", "queued"}) {
		t.Errorf("rescued message %q, recipients %v", got.Status, recipientStatuses(got))
	}
	for _, r := range got.Recipients {
		if r.Attempts != 0 || r.NextAttemptAt == nil {
			t.Errorf("rescued recipient = %+v", r)
		}
	}
	if got := get(t, b.db, cancel.ID); got.Status != db.StatusCanceled {
		t.Errorf("cancel-requested message after rescue = %q, want canceled", got.Status)
	}
	if got := eventTypes(t, b.raw, cancel.ID); !slices.Equal(got, []string{"accepted", "canceled"}) {
		t.Errorf("events = %v", got)
	}
	if r, err := b.db.RescueExpiredLeases(ctx, t0.Add(time.Hour)); err != nil || r != (db.Rescued{}) {
		t.Errorf("second rescue = %+v, %v", r, err)
	}
	if again := claimAll(t, b.db, time.Time{}); len(again) != 2 {
		t.Errorf("reclaimed %d rescued rows, want 2", len(again))
	}
}

func TestReleaseLeases(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 2)
	insert(t, b.db, m)
	c := newMessage(t, 1)
	insert(t, b.db, c)
	claimed, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "me", Limit: 10, LeaseFor: time.Minute})
	if err != nil || len(claimed) != 3 {
		t.Fatalf("claim = %v, %v", claimed, err)
	}
	var ids []uuid.UUID
	for _, r := range claimed {
		ids = append(ids, r.ID)
	}
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), c.ID); err != nil {
		t.Fatal(err)
	}

	if n, err := b.db.ReleaseLeases(ctx, "someone-else", ids); err != nil || n != 0 {
		t.Fatalf("release by another owner = %d, %v", n, err)
	}
	if got := get(t, b.db, m.ID); got.Status != db.StatusSending {
		t.Fatalf("another owner released the lease: %q", got.Status)
	}

	// The cancel-requested one ends canceled, and is reported so.
	if n, err := b.db.ReleaseLeases(ctx, "me", ids); err != nil || n != 1 {
		t.Fatalf("release = %d canceled, %v; want 1", n, err)
	}
	got := get(t, b.db, m.ID)
	if got.Status != db.StatusQueued {
		t.Errorf("released message = %q, want queued", got.Status)
	}
	for _, r := range got.Recipients {
		if r.Status != db.StatusQueued || r.Attempts != 0 || r.NextAttemptAt == nil {
			t.Errorf("released recipient = %+v", r)
		}
	}
	if got := get(t, b.db, c.ID); got.Status != db.StatusCanceled {
		t.Errorf("released cancel-requested message = %q, want canceled", got.Status)
	}
	if n := count(t, b.raw, `SELECT count(*) FROM recipients WHERE lease_owner IS NOT NULL`); n != 0 {
		t.Errorf("%d leases left", n)
	}
	if again := claimAll(t, b.db, time.Time{}); len(again) != 2 {
		t.Errorf("reclaimed %d released rows, want 2", len(again))
	}
}

// deriveStatus is the message status rule, restated to check the database's.
func deriveStatus(statuses []string) string {
	for _, s := range []string{db.StatusSending, db.StatusDeferred, db.StatusQueued, db.StatusScheduled} {
		if slices.Contains(statuses, s) {
			return s
		}
	}
	if slices.IndexFunc(statuses, func(s string) bool { return s != statuses[0] }) < 0 {
		return statuses[0]
	}
	if slices.Contains(statuses, db.StatusDelivered) {
		return db.MessagePartiallyDelivered
	}
	return db.StatusFailed
}

// TestConcurrentWorkersAndCancels runs several workers that claim and record
// outcomes for recipients of the same messages while those messages are
// being canceled. Nothing may fail (a lock cycle would show up as a deadlock
// error), and afterwards every message status must match its recipients.
func TestConcurrentWorkersAndCancels(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	const messages, perMessage, workers = 10, 20, 6
	var ids []uuid.UUID
	for range messages {
		m := newMessage(t, perMessage)
		insert(t, b.db, m)
		ids = append(ids, m.ID)
	}

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for round := 0; ; round++ {
				claimed, err := b.db.ClaimRecipients(ctx, db.ClaimParams{
					Owner: newID(t).String(), Limit: 7, LeaseFor: time.Minute,
				})
				if err != nil {
					t.Errorf("ClaimRecipients: %v", err)
					return
				}
				if len(claimed) == 0 {
					return
				}
				outcomes := make([]db.Outcome, len(claimed))
				for i, c := range claimed {
					status := []string{db.StatusDelivered, db.StatusBounced, db.StatusDeferred}[(w+i+round)%3]
					outcomes[i] = db.Outcome{
						RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: status,
						// Deferred rows are due again at once, until their third attempt.
						NextAttemptAt: time.Now().Add(-time.Second), Code: 250,
						Attempts: []db.NewAttempt{{StartedAt: time.Now(), Duration: time.Millisecond, Code: 250}},
					}
					if status == db.StatusDeferred && c.Attempts >= 2 {
						outcomes[i].Status = db.StatusFailed
					}
				}
				applied, err := b.db.RecordOutcomes(ctx, outcomes)
				if err != nil {
					t.Errorf("RecordOutcomes: %v", err)
					return
				}
				if len(applied) != len(outcomes) {
					t.Errorf("applied %d of %d outcomes of this worker's own leases", len(applied), len(outcomes))
				}
			}
		})
	}
	wg.Go(func() {
		for _, id := range ids[:messages/2] {
			// A message whose recipients all finished first has nothing
			// left to cancel.
			if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), id); err != nil && !errors.Is(err, db.ErrNothingToCancel) {
				t.Errorf("CancelMessage: %v", err)
			}
		}
	})
	wg.Wait()

	for _, id := range ids {
		m := get(t, b.db, id)
		statuses := recipientStatuses(m)
		if want := deriveStatus(statuses); m.Status != want {
			t.Errorf("message %s: status %q, recipients %v say %q", id, m.Status, statuses, want)
		}
		for _, r := range m.Recipients {
			if r.Status == db.StatusSending || r.Status == db.StatusQueued || r.Status == db.StatusDeferred {
				t.Errorf("recipient %s left %q", r.ID, r.Status)
			}
		}
	}
}

func TestClaimWithContentsReturnsEachMessageOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	three := newMessageTo(t, "a.example.test", "a.example.test", "b.example.test")
	three.Raw = []byte("Subject: first\r\n\r\none\r\n")
	insert(t, b.db, three)
	one := newMessage(t, 1)
	one.EnvelopeFrom = "other@example.test"
	insert(t, b.db, one)
	later := newMessage(t, 1)
	later.SendAt = usec(time.Now().Add(time.Hour))
	insert(t, b.db, later)

	c, err := b.db.ClaimWithContents(ctx, db.ClaimParams{Owner: "first", Limit: 10, LeaseFor: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Recipients) != 4 {
		t.Fatalf("claimed %d rows, want the 4 due", len(c.Recipients))
	}
	if len(c.Messages) != 2 {
		t.Fatalf("contents of %d messages, want 2: %v", len(c.Messages), c.Messages)
	}
	for _, m := range []db.NewMessage{three, one} {
		got, ok := c.Messages[m.ID]
		if !ok || got.ID != m.ID || got.EnvelopeFrom != m.EnvelopeFrom || string(got.Raw) != string(m.Raw) {
			t.Fatalf("contents of %s: %+v", m.ID, got)
		}
	}

	// The rows leased to the first claim are not this one's, nor are
	// their messages.
	c, err = b.db.ClaimWithContents(ctx, db.ClaimParams{Owner: "second", Limit: 10, LeaseFor: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Recipients) != 0 || len(c.Messages) != 0 {
		t.Fatalf("second claim: %d rows, %d messages", len(c.Recipients), len(c.Messages))
	}
}
