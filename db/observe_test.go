package db_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
)

func TestQueueDepth(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	counts, age, err := b.db.QueueDepth(ctx, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(counts) != 4 || counts[db.StatusQueued] != 0 || age != 0 {
		t.Errorf("empty queue: %v, oldest %s", counts, age)
	}
	if _, err := b.db.InsertMessages(ctx, []db.NewMessage{newMessage(t, 3)}); err != nil {
		t.Fatal(err)
	}
	// Seen from a minute later, the new recipients are due and have waited
	// about that long.
	counts, age, err = b.db.QueueDepth(ctx, time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if counts[db.StatusQueued] != 3 || age < 50*time.Second || age > 2*time.Minute {
		t.Errorf("three queued: %v, oldest %s", counts, age)
	}
}

func TestCheckMigrations(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	if err := b.db.CheckMigrations(ctx); err != nil {
		t.Fatalf("freshly migrated database: %v", err)
	}
	// A rollback by one migration, as goose down leaves it.
	if _, err := b.raw.Exec(ctx, `DELETE FROM goose_db_version WHERE version_id = (SELECT max(version_id) FROM goose_db_version)`); err != nil {
		t.Fatal(err)
	}
	err := b.db.CheckMigrations(ctx)
	if !errors.Is(err, db.ErrMigrationsBehind) {
		t.Fatalf("after a rollback: %v, want ErrMigrationsBehind", err)
	}
	t.Log(err)
}
