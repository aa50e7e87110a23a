package db_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

func TestAPIKeys(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()

	first, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "first", Prefix: "ph_1", Hash: []byte("hash-1"), Scopes: []string{db.ScopeSend}})
	if err != nil {
		t.Fatal(err)
	}
	second, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "second", Prefix: "ph_2", Hash: []byte("hash-2"), Scopes: []string{db.ScopeSend}})
	if err != nil {
		t.Fatal(err)
	}
	if first.ID == uuid.Nil || first.Name != "first" || first.Prefix != "ph_1" || first.CreatedAt.IsZero() ||
		first.RevokedAt != nil || first.LastUsedAt != nil {
		t.Errorf("created key = %+v", first)
	}
	if _, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "dup", Prefix: "ph_3", Hash: []byte("hash-1"), Scopes: []string{db.ScopeSend}}); err == nil {
		t.Error("a second key with the same hash was stored")
	}
	if _, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "", Prefix: "ph_4", Hash: []byte("hash-4"), Scopes: []string{db.ScopeSend}}); err == nil {
		t.Error("a key without a name was stored")
	}

	keys, err := b.db.ListAPIKeys(ctx, db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || keys[0].ID != first.ID || keys[1].ID != second.ID {
		t.Errorf("ListAPIKeys = %+v", keys)
	}

	found, err := b.db.LookupAPIKey(ctx, []byte("hash-2"))
	if err != nil {
		t.Fatal(err)
	}
	if found.ID != second.ID || found.LastUsedAt == nil {
		t.Errorf("LookupAPIKey = %+v, want %s with LastUsedAt set", found, second.ID)
	}
	again, err := b.db.LookupAPIKey(ctx, []byte("hash-2"))
	if err != nil {
		t.Fatal(err)
	}
	if again.LastUsedAt == nil || !again.LastUsedAt.Equal(*found.LastUsedAt) {
		t.Errorf("second lookup within a minute moved LastUsedAt: %v -> %v", found.LastUsedAt, again.LastUsedAt)
	}
	if _, err := b.db.LookupAPIKey(ctx, []byte("unknown")); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("unknown hash: err = %v, want ErrNotFound", err)
	}

	if _, err := b.db.RevokeAPIKey(ctx, db.DefaultProjectID(), second.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := b.db.LookupAPIKey(ctx, []byte("hash-2")); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("revoked key: err = %v, want ErrNotFound", err)
	}
	if _, err := b.db.RevokeAPIKey(ctx, db.DefaultProjectID(), second.ID); err != nil {
		t.Errorf("revoking twice: %v", err)
	}
	if _, err := b.db.RevokeAPIKey(ctx, db.DefaultProjectID(), uuid.New()); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("revoking an unknown key: err = %v, want ErrNotFound", err)
	}
	keys, err = b.db.ListAPIKeys(ctx, db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || keys[1].RevokedAt == nil || keys[0].RevokedAt != nil {
		t.Errorf("after revoking: %+v", keys)
	}
	if _, err := b.db.LookupAPIKey(ctx, []byte("hash-1")); err != nil {
		t.Errorf("the other key stopped working: %v", err)
	}

	if k, created, err := b.db.CreateAPIKeyIfNone(ctx, db.NewAPIKeyParams{Name: "boot", Prefix: "ph_b", Hash: []byte("hash-b"), Scopes: []string{db.ScopeAdmin}}); err != nil || created || k.ID != uuid.Nil {
		t.Errorf("CreateAPIKeyIfNone with keys present = %+v, %v, %v", k, created, err)
	}
}

func TestCreateAPIKeyIfNoneRace(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const callers = 8
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		created []db.APIKey
	)
	for i := range callers {
		wg.Go(func() {
			k, ok, err := b.db.CreateAPIKeyIfNone(context.Background(),
				db.NewAPIKeyParams{Name: "bootstrap", Prefix: "ph_b", Hash: fmt.Appendf(nil, "hash-%d", i), Scopes: []string{db.ScopeAdmin}})
			if err != nil {
				t.Errorf("CreateAPIKeyIfNone: %v", err)
				return
			}
			if ok {
				mu.Lock()
				created = append(created, k)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(created) != 1 {
		t.Fatalf("%d callers created a key, want exactly 1", len(created))
	}
	keys, err := b.db.ListAPIKeys(context.Background(), db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].ID != created[0].ID {
		t.Errorf("keys = %+v, want only %s", keys, created[0].ID)
	}

	// A revoked key still counts as a key.
	if _, err := b.db.RevokeAPIKey(context.Background(), db.DefaultProjectID(), created[0].ID); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := b.db.CreateAPIKeyIfNone(context.Background(), db.NewAPIKeyParams{Name: "b", Prefix: "p", Hash: []byte("h"), Scopes: []string{db.ScopeAdmin}}); err != nil || ok {
		t.Errorf("after revoking the only key: created %v, %v", ok, err)
	}
}
