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

func addSuppressions(t *testing.T, d *db.DB, project uuid.UUID, entries ...db.NewSuppression) []db.AddedSuppression {
	t.Helper()
	out, err := d.AddSuppressions(context.Background(), project, entries)
	if err != nil {
		t.Fatalf("AddSuppressions: %v", err)
	}
	return out
}

func addressKey(a string) db.SuppressionKey { return db.SuppressionKey{Address: a} }
func domainKey(d string) db.SuppressionKey  { return db.SuppressionKey{Address: d, DomainWide: true} }

func TestIntakeSuppressesListedRecipients(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	past := time.Now().Add(-time.Minute)
	future := time.Now().Add(time.Hour)
	addSuppressions(t, b.db, db.DefaultProjectID(),
		db.NewSuppression{Key: addressKey("user0@d0.example.test")},
		db.NewSuppression{Key: domainKey("d1.example.test"), ExpiresAt: &future},
		db.NewSuppression{Key: addressKey("user2@d2.example.test"), ExpiresAt: &past},
	)
	// The entry is stored in lower case; the recipient's spelling differs.
	m := newMessage(t, 4)
	m.Recipients[0].Address = "User0@D0.example.test"
	out, err := b.db.InsertMessages(ctx, []db.NewMessage{m})
	if err != nil || out[0].Err != nil {
		t.Fatalf("insert: %v %v", err, out[0].Err)
	}
	want := []db.SuppressedRecipient{
		{RecipientID: m.Recipients[0].ID, Reason: db.SuppressionManual},
		{RecipientID: m.Recipients[1].ID, Reason: db.SuppressionManual},
	}
	if !slices.Equal(out[0].Result.Suppressed, want) {
		t.Errorf("suppressed %+v, want %+v", out[0].Result.Suppressed, want)
	}
	got := get(t, b.db, m.ID)
	if s := recipientStatuses(got); !slices.Equal(s, []string{"suppressed", "suppressed", "queued", "queued"}) {
		t.Errorf("statuses %v", s)
	}
	if got.Status != db.StatusQueued {
		t.Errorf("message status %s", got.Status)
	}
	if r := got.Recipients[0]; r.SuppressionReason != db.SuppressionManual || r.NextAttemptAt != nil {
		t.Errorf("suppressed recipient %+v", r)
	}
	if r := got.Recipients[2]; r.SuppressionReason != "" {
		t.Errorf("expired entry left a reason: %+v", r)
	}
	if ev := eventPayloads(t, b.raw, m.ID, "suppressed"); len(ev) != 2 || ev[0].Reason != "manual" {
		t.Errorf("suppressed events %+v", ev)
	}
	// Only the two queued recipients can be claimed.
	if c := claimAll(t, b.db, time.Time{}); len(c) != 2 {
		t.Errorf("claimed %d recipients, want 2", len(c))
	}
}

func TestIntakeAllSuppressedMessageIsFailed(t *testing.T) {
	t.Parallel()
	b := setup(t)
	addSuppressions(t, b.db, db.DefaultProjectID(), db.NewSuppression{Key: domainKey("d0.example.test")})
	m := newMessage(t, 1)
	m.SendAt = time.Now().Add(time.Hour) // even a scheduled one
	insert(t, b.db, m)
	got := get(t, b.db, m.ID)
	if got.Status != db.StatusFailed || got.Recipients[0].Status != db.StatusSuppressed {
		t.Errorf("message %s, recipient %s", got.Status, got.Recipients[0].Status)
	}
	if types := eventTypes(t, b.raw, m.ID); !slices.Equal(types, []string{"accepted", "suppressed"}) {
		t.Errorf("events %v", types)
	}
	// A suppressed recipient is final: there is nothing left to cancel.
	if _, _, err := b.db.CancelMessage(context.Background(), db.DefaultProjectID(), m.ID); !errors.Is(err, db.ErrNothingToCancel) {
		t.Errorf("cancel: %v, want ErrNothingToCancel", err)
	}
}

func TestIntakeSuppressionIsPerProject(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	other, err := b.db.CreateProject(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	addSuppressions(t, b.db, other.ID, db.NewSuppression{Key: addressKey("user0@d0.example.test")})
	m := newMessage(t, 1)
	insert(t, b.db, m)
	if got := get(t, b.db, m.ID); got.Recipients[0].Status != db.StatusQueued {
		t.Errorf("another project's entry suppressed: %s", got.Recipients[0].Status)
	}
	if _, err := b.db.GetSuppressionEntry(ctx, db.DefaultProjectID(), addressKey("user0@d0.example.test")); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("another project's entry visible: %v", err)
	}
}

func TestIntakeSuppressedReplayAnswersAmended(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	addSuppressions(t, b.db, db.DefaultProjectID(), db.NewSuppression{Key: addressKey("user0@d0.example.test")})
	m := newMessage(t, 2)
	m.Idempotency = &db.Idempotency{Key: "k", RequestHash: []byte("h"), Response: []byte("before"),
		Amend: func(s []db.SuppressedRecipient) ([]byte, error) { return []byte("after"), nil }}
	// The same request twice in one group: the second replays the first's
	// amended answer.
	again := newMessage(t, 2)
	again.Idempotency = &db.Idempotency{Key: "k", RequestHash: []byte("h")}
	out, err := b.db.InsertMessages(ctx, []db.NewMessage{m, again})
	if err != nil {
		t.Fatal(err)
	}
	if len(out[0].Result.Suppressed) != 1 || !out[1].Result.Replayed || string(out[1].Result.Response) != "after" {
		t.Errorf("outcomes %+v", out)
	}
	later := newMessage(t, 2)
	later.Idempotency = &db.Idempotency{Key: "k", RequestHash: []byte("h")}
	res, err := b.db.InsertMessage(ctx, later)
	if err != nil || !res.Replayed || string(res.Response) != "after" {
		t.Errorf("replay %q, %v", res.Response, err)
	}
}

func TestSuppressionEntries(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	p := db.DefaultProjectID()
	past := time.Now().Add(-time.Minute)

	first := addSuppressions(t, b.db, p,
		db.NewSuppression{Key: addressKey("a@example.test")},
		db.NewSuppression{Key: addressKey("a@example.test")}, // twice counts once
		db.NewSuppression{Key: domainKey("example.net")},
		db.NewSuppression{Key: addressKey("old@example.test"), ExpiresAt: &past},
	)
	if len(first) != 3 {
		t.Fatalf("added %+v", first)
	}
	for _, a := range first {
		if !a.Added || a.Reason != db.SuppressionManual {
			t.Errorf("entry %+v", a)
		}
	}
	// Again: the entries in force stay as they were, the expired one is
	// renewed.
	again := addSuppressions(t, b.db, p,
		db.NewSuppression{Key: addressKey("a@example.test")},
		db.NewSuppression{Key: addressKey("old@example.test")},
	)
	added := map[string]bool{}
	for _, a := range again {
		added[a.Address] = a.Added
	}
	if len(again) != 2 || added["a@example.test"] || !added["old@example.test"] {
		t.Errorf("second add %+v", again)
	}
	if s, err := b.db.GetSuppressionEntry(ctx, p, addressKey("old@example.test")); err != nil || s.ExpiresAt != nil {
		t.Errorf("renewed entry %+v, %v", s, err)
	}
	if _, err := b.db.AddSuppressions(ctx, p, []db.NewSuppression{{Key: addressKey("Upper@example.test")}}); err == nil {
		t.Error("an address that is not normalized was added")
	}

	// Listing: newest first, filters, paging.
	all, err := b.db.ListSuppressions(ctx, db.ListSuppressionsParams{ProjectID: p})
	if err != nil || len(all) != 3 {
		t.Fatalf("list %+v, %v", all, err)
	}
	for i := 1; i < len(all); i++ {
		if all[i].CreatedAt.After(all[i-1].CreatedAt) {
			t.Errorf("not newest first: %+v", all)
		}
	}
	yes := true
	if l, _ := b.db.ListSuppressions(ctx, db.ListSuppressionsParams{ProjectID: p, DomainWide: &yes}); len(l) != 1 || l[0].Address != "example.net" {
		t.Errorf("domain-wide %+v", l)
	}
	if l, _ := b.db.ListSuppressions(ctx, db.ListSuppressionsParams{ProjectID: p, AddressPrefix: "ol"}); len(l) != 1 || l[0].Address != "old@example.test" {
		t.Errorf("prefix %+v", l)
	}
	if l, _ := b.db.ListSuppressions(ctx, db.ListSuppressionsParams{ProjectID: p, Reason: db.SuppressionComplaint}); len(l) != 0 {
		t.Errorf("reason %+v", l)
	}
	page, _ := b.db.ListSuppressions(ctx, db.ListSuppressionsParams{ProjectID: p, Limit: 2})
	rest, _ := b.db.ListSuppressions(ctx, db.ListSuppressionsParams{ProjectID: p, Limit: 2,
		After: &db.Cursor{CreatedAt: page[1].CreatedAt, ID: page[1].ID}})
	if len(page) != 2 || len(rest) != 1 || rest[0].ID != all[2].ID {
		t.Errorf("pages %+v %+v", page, rest)
	}

	deleted, err := b.db.DeleteSuppressions(ctx, p, []db.SuppressionKey{addressKey("a@example.test"), domainKey("nothing.test")})
	if err != nil || !slices.Equal(deleted, []db.SuppressionKey{addressKey("a@example.test")}) {
		t.Errorf("deleted %v, %v", deleted, err)
	}
	if _, err := b.db.GetSuppressionEntry(ctx, p, addressKey("a@example.test")); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("deleted entry still there: %v", err)
	}
}
