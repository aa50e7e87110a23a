package testenv

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/db"
)

func TestDatabaseIsFreshMigratedAndDropped(t *testing.T) {
	t.Parallel()
	admin, err := server()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var names []string
	t.Run("create", func(t *testing.T) {
		for range 2 {
			u := Database(t)
			conn, err := pgx.Connect(ctx, u)
			if err != nil {
				t.Fatal(err)
			}
			var name string
			var migrated bool
			err = conn.QueryRow(ctx, `SELECT current_database(),
				EXISTS (SELECT 1 FROM pg_tables WHERE tablename = 'recipients')`).Scan(&name, &migrated)
			_ = conn.Close(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !migrated {
				t.Errorf("database %s is not migrated", name)
			}
			names = append(names, name)
		}
		// A DB from DB(t) is open and usable, and is closed before the drop.
		d := DB(t)
		if _, err := d.ListProjects(ctx); err != nil {
			t.Errorf("DB(t): %v", err)
		}
	})
	if len(names) != 2 || names[0] == names[1] {
		t.Fatalf("databases %v, want two different ones", names)
	}

	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var left int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_database WHERE datname = ANY($1)`, names).Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Errorf("%d test databases were not dropped", left)
	}
}

func TestEmptyDatabaseHasNoSchema(t *testing.T) {
	t.Parallel()
	u := EmptyDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var tables int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = 'public'`).Scan(&tables); err != nil {
		t.Fatal(err)
	}
	if tables != 0 {
		t.Errorf("empty database has %d tables", tables)
	}
	if err := db.Migrate(ctx, u); err != nil {
		t.Errorf("Migrate on the empty database: %v", err)
	}
}

func TestWithDatabase(t *testing.T) {
	t.Parallel()
	tests := []struct {
		admin, want string
	}{
		{"postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/db1"},
		{"postgresql://u:p@127.0.0.1/postgres?sslmode=disable", "postgresql://u:p@127.0.0.1/db1?sslmode=disable"},
		{"postgres://127.0.0.1", "postgres://127.0.0.1/db1"},
		{"host=127.0.0.1 user=postgres dbname=postgres", "host=127.0.0.1 user=postgres dbname=postgres dbname=db1"},
	}
	for _, tt := range tests {
		got, err := withDatabase(tt.admin, "db1")
		if err != nil {
			t.Errorf("withDatabase(%q): %v", tt.admin, err)
			continue
		}
		if got != tt.want {
			t.Errorf("withDatabase(%q) = %q, want %q", tt.admin, got, tt.want)
		}
		cfg, err := pgx.ParseConfig(got)
		if err != nil {
			t.Errorf("ParseConfig(%q): %v", got, err)
			continue
		}
		if cfg.Database != "db1" {
			t.Errorf("%q connects to database %q, want db1", got, cfg.Database)
		}
	}
}
