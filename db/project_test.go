package db_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/migrations"
)

func TestProjects(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()

	p, err := b.db.CreateProject(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.db.CreateProject(ctx, "shop"); !errors.Is(err, db.ErrAlreadyExists) {
		t.Errorf("duplicate name: %v, want ErrAlreadyExists", err)
	}
	for _, bad := range []string{"", "Shop", "has space", "-lead", string(make([]byte, 64))} {
		if _, err := b.db.CreateProject(ctx, bad); err == nil {
			t.Errorf("name %q was accepted", bad)
		}
	}
	got, err := b.db.ProjectByName(ctx, "shop")
	if err != nil || got.ID != p.ID {
		t.Errorf("ProjectByName = %+v, %v", got, err)
	}
	if _, err := b.db.ProjectByName(ctx, "nope"); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("unknown project: %v", err)
	}

	key, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{ProjectID: p.ID, Name: "k", Prefix: "ph_k", Hash: []byte("h"), Scopes: []string{db.ScopeRead}})
	if err != nil {
		t.Fatal(err)
	}
	if key.ProjectID != p.ID || !slices.Equal(key.Scopes, []string{db.ScopeRead}) || key.HasScope(db.ScopeSend) || !key.HasScope(db.ScopeRead) {
		t.Errorf("key = %+v", key)
	}
	if _, err := b.db.CreateAPIKey(ctx, db.NewAPIKeyParams{ProjectID: uuid.New(), Name: "k", Prefix: "p", Hash: []byte("h2"), Scopes: []string{db.ScopeRead}}); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("key in an unknown project: %v, want ErrNotFound", err)
	}
	list, err := b.db.ListProjects(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Name != db.DefaultProjectName || list[0].ID != db.DefaultProjectID() ||
		list[1].Name != "shop" || list[1].ActiveKeys != 1 {
		t.Errorf("ListProjects = %+v", list)
	}

	// Keys of one project are invisible to another.
	if keys, err := b.db.ListAPIKeys(ctx, db.DefaultProjectID()); err != nil || len(keys) != 0 {
		t.Errorf("default project's keys = %+v, %v", keys, err)
	}
	if _, err := b.db.RevokeAPIKey(ctx, db.DefaultProjectID(), key.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("revoking through another project: %v, want ErrNotFound", err)
	}

	m := newMessage(t, 1)
	m.ProjectID = p.ID
	insert(t, b.db, m)
	if _, err := b.db.GetMessage(ctx, db.DefaultProjectID(), m.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("another project's message: %v, want ErrNotFound", err)
	}
	if got, err := b.db.GetMessage(ctx, p.ID, m.ID); err != nil || got.ProjectID != p.ID {
		t.Errorf("own message = %+v, %v", got, err)
	}
	if _, _, err := b.db.CancelMessage(ctx, db.DefaultProjectID(), m.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("canceling another project's message: %v, want ErrNotFound", err)
	}
	if got, err := b.db.GetMessage(ctx, p.ID, m.ID); err != nil || got.Status != db.StatusQueued {
		t.Errorf("after a foreign cancel: %+v, %v; want it still queued", got, err)
	}
	if ms, err := b.db.ListMessages(ctx, db.ListMessagesParams{ProjectID: db.DefaultProjectID()}); err != nil || len(ms) != 0 {
		t.Errorf("default project lists %d messages, %v", len(ms), err)
	}
	if _, err := b.db.ListMessages(ctx, db.ListMessagesParams{}); err == nil {
		t.Error("ListMessages without a project succeeded")
	}

	// Delete: refused while keys or messages remain, forced with both.
	var notEmpty *db.ProjectNotEmptyError
	err = b.db.DeleteProject(ctx, db.DeleteProjectParams{Name: "shop"})
	if !errors.As(err, &notEmpty) || notEmpty.ActiveKeys != 1 || !notEmpty.HasMessages {
		t.Errorf("delete with a key and a message: %v", err)
	}
	if _, err := b.db.RevokeAPIKey(ctx, p.ID, key.ID); err != nil {
		t.Fatal(err)
	}
	err = b.db.DeleteProject(ctx, db.DeleteProjectParams{Name: "shop"})
	if !errors.As(err, &notEmpty) || notEmpty.ActiveKeys != 0 || !notEmpty.HasMessages {
		t.Errorf("delete with a message: %v", err)
	}
	if err := b.db.DeleteProject(ctx, db.DeleteProjectParams{Name: "shop", Force: true}); err != nil {
		t.Fatal(err)
	}
	for _, table := range []string{"projects WHERE name = 'shop'", "api_keys", "messages", "recipients", "events"} {
		if n := count(t, b.raw, `SELECT count(*) FROM `+table); n != 0 {
			t.Errorf("%d rows left in %s", n, table)
		}
	}
	if err := b.db.DeleteProject(ctx, db.DeleteProjectParams{Name: "shop"}); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("deleting again: %v, want ErrNotFound", err)
	}
	if err := b.db.DeleteProject(ctx, db.DeleteProjectParams{Name: db.DefaultProjectName, Force: true}); !errors.Is(err, db.ErrDefaultProject) {
		t.Errorf("deleting the default project: %v, want ErrDefaultProject", err)
	}

	// An empty project goes without --force.
	if _, err := b.db.CreateProject(ctx, "empty"); err != nil {
		t.Fatal(err)
	}
	if err := b.db.DeleteProject(ctx, db.DeleteProjectParams{Name: "empty"}); err != nil {
		t.Errorf("deleting an empty project: %v", err)
	}
}

func TestNormalizeScopes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   []string
		want []string
		ok   bool
	}{
		{[]string{"admin", "send", "send"}, []string{"send", "admin"}, true},
		{[]string{"read"}, []string{"read"}, true},
		{nil, nil, false},
		{[]string{"send", "write"}, nil, false},
	} {
		got, err := db.NormalizeScopes(tc.in)
		if (err == nil) != tc.ok || !slices.Equal(got, tc.want) {
			t.Errorf("NormalizeScopes(%q) = %q, %v", tc.in, got, err)
		}
	}
}

// The projects migration moves what exists into the default project: keys
// become its admin keys, messages (with a key or without) and idempotency
// keys become its own.
func TestProjectsMigrationBackfill(t *testing.T) {
	t.Parallel()
	u := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := pgx.ParseConfig(u)
	if err != nil {
		t.Fatal(err)
	}
	sqlDB := stdlib.OpenDB(*cfg)
	defer sqlDB.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, migrations.FS, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.DownTo(ctx, 3); err != nil {
		t.Fatalf("down to 3: %v", err)
	}
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	keyID, withKey, withoutKey := uuid.New(), uuid.New(), uuid.New()
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO api_keys (id, name, prefix, hash) VALUES ($1, 'old', 'ph_old', 'h')`, []any{keyID}},
		{`INSERT INTO messages (id, api_key_id, status, envelope_from, raw, size_bytes) VALUES ($1, $2, 'queued', 'a@x.test', '', 0)`, []any{withKey, keyID}},
		{`INSERT INTO messages (id, status, envelope_from, raw, size_bytes) VALUES ($1, 'queued', 'a@x.test', '', 0)`, []any{withoutKey}},
		{`INSERT INTO idempotency_keys (api_key_id, key, request_hash, message_id, expires_at) VALUES ($1, 'k', 'h', $2, now() + interval '1 hour')`, []any{keyID, withKey}},
		// The same idempotency key under another API key: the newer use wins.
		{`INSERT INTO idempotency_keys (api_key_id, key, request_hash, message_id, expires_at, created_at) VALUES ($1, 'k', 'h', $2, now() + interval '1 hour', now() - interval '1 minute')`, []any{uuid.Nil, withoutKey}},
	} {
		if _, err := conn.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatalf("up: %v", err)
	}

	d, err := db.Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	keys, err := d.ListAPIKeys(ctx, db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].ID != keyID || !slices.Equal(keys[0].Scopes, []string{db.ScopeAdmin}) {
		t.Errorf("keys after the migration = %+v, want the old key as an admin key of the default project", keys)
	}
	for _, id := range []uuid.UUID{withKey, withoutKey} {
		m, err := d.GetMessage(ctx, db.DefaultProjectID(), id)
		if err != nil || m.ProjectID != db.DefaultProjectID() {
			t.Errorf("message %s after the migration: %+v, %v", id, m, err)
		}
	}
	var project uuid.UUID
	var message uuid.UUID
	if err := conn.QueryRow(ctx, `SELECT project_id, message_id FROM idempotency_keys WHERE key = 'k'`).Scan(&project, &message); err != nil {
		t.Fatal(err)
	}
	if project != db.DefaultProjectID() || message != withKey {
		t.Errorf("idempotency key in %s for %s, want the default project and the newer use %s", project, message, withKey)
	}
	var fks int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_constraint WHERE conrelid = 'messages'::regclass AND contype = 'f'`).Scan(&fks); err != nil {
		t.Fatal(err)
	}
	if fks != 0 {
		t.Errorf("messages has %d foreign keys, want none on the insert path", fks)
	}
}
