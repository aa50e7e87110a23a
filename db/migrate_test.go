package db_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/migrations"
)

var tables = []string{"projects", "api_keys", "messages", "recipients", "attempts", "events", "idempotency_keys"}

func tableCount(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var n int
	err := conn.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = ANY($1)`, tables).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	u := testenv.EmptyDatabase(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	const instances = 4
	var wg sync.WaitGroup
	for range instances {
		wg.Go(func() {
			if err := db.Migrate(ctx, u); err != nil {
				t.Errorf("Migrate: %v", err)
			}
		})
	}
	wg.Wait()
	if err := db.Migrate(ctx, u); err != nil {
		t.Fatalf("Migrate on a migrated database: %v", err)
	}

	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if n := tableCount(t, conn); n != len(tables) {
		t.Errorf("%d of %d tables exist", n, len(tables))
	}
	var applied int
	if err := conn.QueryRow(ctx,
		`SELECT count(*) FROM goose_db_version WHERE version_id = 1 AND is_applied`).Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if applied != 1 {
		t.Errorf("migration 1 recorded %d times, want once", applied)
	}
}

// TestMigrationsGoDownAndUp checks the Down halves: a broken one would only
// be found when someone needs it.
func TestMigrationsGoDownAndUp(t *testing.T) {
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
	if _, err := p.DownTo(ctx, 0); err != nil {
		t.Fatalf("down: %v", err)
	}
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if n := tableCount(t, conn); n != 0 {
		t.Errorf("%d tables left after migrating down", n)
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatalf("up again: %v", err)
	}
	if n := tableCount(t, conn); n != len(tables) {
		t.Errorf("%d of %d tables after migrating up again", n, len(tables))
	}
}

func TestUnreachableDatabaseIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Nothing listens on port 1 of the loopback address.
	const u = "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=5"
	if _, err := db.Open(ctx, u); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Open: err = %v, want ErrUnavailable", err)
	}
	if err := db.Migrate(ctx, u); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Migrate: err = %v, want ErrUnavailable", err)
	}
}
