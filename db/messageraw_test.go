package db_test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/posthaste/posthaste/db"
)

func TestGetMessageRaw(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	m := newMessage(t, 2)
	insert(t, b.db, m)

	got, err := b.db.GetMessageRaw(ctx, db.DefaultProjectID(), m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != m.ID || got.EnvelopeFrom != m.EnvelopeFrom || !bytes.Equal(got.Raw, m.Raw) {
		t.Errorf("got %+v, want the message as inserted", got)
	}
	want := []string{m.Recipients[0].Address, m.Recipients[1].Address}
	if !slices.Equal(got.Recipients, want) {
		t.Errorf("recipients = %v, want %v", got.Recipients, want)
	}

	other, err := b.db.CreateProject(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.db.GetMessageRaw(ctx, other.ID, m.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("another project: err = %v, want ErrNotFound", err)
	}
}

// The case-insensitive recipient filter must be served by the expression
// index of migration 00015, not by a scan of every recipient.
func TestRecipientFilterUsesLowerIndex(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	tx, err := b.raw.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	// Without statistics or rows the planner would prefer a scan anyway;
	// forbidding it shows whether an index can serve the filter at all.
	if _, err := tx.Exec(ctx, `SET LOCAL enable_seqscan = off`); err != nil {
		t.Fatal(err)
	}
	var plan []byte
	// The subquery of ListMessages' recipient filter.
	if err := tx.QueryRow(ctx, `EXPLAIN (FORMAT JSON)
		SELECT r.message_id FROM recipients r WHERE lower(r.address) = lower($1)`, "BOUNCE@example.test").Scan(&plan); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(plan, []byte("recipients_address_lower_idx")) {
		t.Errorf("plan does not use recipients_address_lower_idx: %s", plan)
	}
}
