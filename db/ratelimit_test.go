package db_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

func TestAddProjectRecipientsNeverPassesTheLimit(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	day := time.Date(2025, 3, 1, 23, 59, 0, 0, time.FixedZone("x", -3600)) // 2 March in UTC
	const limit = 50
	var (
		wg       sync.WaitGroup
		accepted atomic.Int64
	)
	for range 20 {
		wg.Go(func() {
			for range 5 {
				_, err := b.db.AddProjectRecipients(ctx, uuid.Nil, day, 1, limit)
				switch {
				case err == nil:
					accepted.Add(1)
				case !errors.Is(err, db.ErrLimitExceeded):
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if got := accepted.Load(); got != limit {
		t.Fatalf("%d recipients accepted concurrently, limit %d", got, limit)
	}
	n, err := b.db.ProjectRecipients(ctx, db.DefaultProjectID(), time.Date(2025, 3, 2, 5, 0, 0, 0, time.UTC))
	if err != nil || n != limit {
		t.Fatalf("count of the UTC day = %d, %v; want %d", n, err, limit)
	}
	if _, err := b.db.AddProjectRecipients(ctx, uuid.Nil, day, 51, 50); !errors.Is(err, db.ErrLimitExceeded) {
		t.Fatalf("more than the limit at once: %v", err)
	}
	if err := b.db.RefundProjectRecipients(ctx, uuid.Nil, day, 10); err != nil {
		t.Fatal(err)
	}
	if total, err := b.db.AddProjectRecipients(ctx, uuid.Nil, day, 10, limit); err != nil || total != limit {
		t.Fatalf("after a refund of 10: %d, %v", total, err)
	}
	// The next UTC day starts from zero.
	if total, err := b.db.AddProjectRecipients(ctx, uuid.Nil, day.Add(24*time.Hour), 3, limit); err != nil || total != 3 {
		t.Fatalf("next day: %d, %v", total, err)
	}
}

func TestAPIKeySenderDomainsAndLimits(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	rps := 7
	k, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "shop", Prefix: "ph_s", Hash: []byte("hash-s"),
		Scopes: []string{db.ScopeSend}, SenderDomains: []string{"Shop.Example.", "mail.shop.example", "shop.example"},
		RequestsPerSecond: &rps})
	if err != nil {
		t.Fatal(err)
	}
	if got := k.SenderDomains; len(got) != 2 || got[0] != "shop.example" || got[1] != "mail.shop.example" {
		t.Fatalf("sender domains = %q", got)
	}
	if !k.AllowsSender("shop.example") || k.AllowsSender("other.example") || k.AllowsSender("sub.shop.example") {
		t.Fatalf("AllowsSender wrong for %q", k.SenderDomains)
	}
	perDay := int64(1000)
	if err := b.db.SetProjectLimits(ctx, db.DefaultProjectID(), db.ProjectLimits{RecipientsPerDay: &perDay}); err != nil {
		t.Fatal(err)
	}
	got, err := b.db.LookupAPIKey(ctx, []byte("hash-s"))
	if err != nil {
		t.Fatal(err)
	}
	if got.RequestsPerSecond == nil || *got.RequestsPerSecond != 7 || got.Limits.RecipientsPerDay == nil ||
		*got.Limits.RecipientsPerDay != 1000 || got.Limits.RequestsPerSecond != nil || len(got.SenderDomains) != 2 {
		t.Fatalf("looked up %+v", got)
	}
	for _, bad := range []string{"[192.0.2.1]", "localhost", "a b.example", "-x.example"} {
		if _, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "bad", Prefix: "ph_b", Hash: []byte("hash-" + bad),
			Scopes: []string{db.ScopeSend}, SenderDomains: []string{bad}}); err == nil {
			t.Errorf("sender domain %q accepted", bad)
		}
	}
	if err := b.db.SetProjectLimits(ctx, newID(t), db.ProjectLimits{}); !errors.Is(err, db.ErrNotFound) {
		t.Fatalf("limits of an unknown project: %v", err)
	}
}

// TestClaimSharesBatchBetweenFirstAttemptsAndRetries checks that a backlog
// of due retries older than the new mail does not take the whole batch.
func TestClaimSharesBatchBetweenFirstAttemptsAndRetries(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	var retries, fresh []uuid.UUID
	for range 20 {
		m := newMessage(t, 1)
		insert(t, b.db, m)
		retries = append(retries, m.Recipients[0].ID)
	}
	// The retries were attempted before and are due since an hour ago.
	if _, err := b.raw.Exec(ctx, `UPDATE recipients SET attempts = 3, status = 'deferred',
		next_attempt_at = now() - interval '1 hour' WHERE id = ANY($1)`, retries); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		m := newMessage(t, 1)
		insert(t, b.db, m)
		fresh = append(fresh, m.Recipients[0].ID)
	}
	claim := func(limit int) (nFresh, nRetry int) {
		c, err := b.db.ClaimRecipients(ctx, db.ClaimParams{Owner: "o-" + newID(t).String(), Limit: limit, LeaseFor: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range c {
			if r.Attempts == 0 {
				nFresh++
			} else {
				nRetry++
			}
		}
		return nFresh, nRetry
	}
	// Half of each while both have enough.
	if f, r := claim(6); f != 3 || r != 3 {
		t.Fatalf("batch of 6: %d first attempts, %d retries; want 3 and 3", f, r)
	}
	// The 2 first attempts left take their share; the retries the rest.
	if f, r := claim(10); f != 2 || r != 8 {
		t.Fatalf("batch of 10: %d first attempts, %d retries; want 2 and 8", f, r)
	}
	if f, r := claim(100); f != 0 || r != 9 {
		t.Fatalf("last batch: %d first attempts, %d retries; want 0 and 9", f, r)
	}
}
