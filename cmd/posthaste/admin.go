package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/service"
)

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", stderr)
	var dbf databaseFlags
	dbf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("migrate: unexpected argument %q", fs.Arg(0))
	}
	return withDatabase(ctx, dbf, stderr, func(url string) error {
		if err := db.Migrate(ctx, url); err != nil {
			return err // "migrate: ..."
		}
		fmt.Fprintln(stdout, "migrations applied")
		return nil
	})
}

const keysUsage = `Usage:
  posthaste keys create --name NAME   create a key; it is printed once
  posthaste keys list                 list keys (never their secret)
  posthaste keys revoke ID            revoke a key; requests with it get 401
`

func runKeys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysUsage)
		return errors.New("keys: no subcommand given")
	}
	sub, args := args[0], args[1:]
	fs := newFlagSet("keys "+sub, stderr)
	var dbf databaseFlags
	dbf.register(fs)
	var name string
	if sub == "create" {
		fs.StringVar(&name, "name", "", "a name that says who uses the key (required)")
	}
	positional, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if sub != "revoke" && len(positional) > 0 {
		return fmt.Errorf("keys %s: unexpected argument %q", sub, positional[0])
	}
	switch sub {
	case "create":
		if name == "" {
			return errors.New("keys create: --name is required")
		}
		return withStore(ctx, dbf, stderr, func(store *db.DB) error {
			key, prefix, hash, err := service.NewAPIKey()
			if err != nil {
				return err
			}
			k, err := store.CreateAPIKey(ctx, name, prefix, hash)
			if err != nil {
				return fmt.Errorf("create key: %w", err)
			}
			fmt.Fprintf(stdout, "Created API key %s (%s). It is shown only this once:\n\n    %s\n", k.ID, k.Name, key)
			return nil
		})
	case "list":
		return withStore(ctx, dbf, stderr, func(store *db.DB) error {
			keys, err := store.ListAPIKeys(ctx)
			if err != nil {
				return fmt.Errorf("list keys: %w", err)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tPREFIX\tCREATED\tLAST USED\tREVOKED")
			for _, k := range keys {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, k.Prefix,
					k.CreatedAt.UTC().Format(time.RFC3339), formatOptionalTime(k.LastUsedAt), formatOptionalTime(k.RevokedAt))
			}
			return tw.Flush()
		})
	case "revoke":
		if len(positional) != 1 {
			return errors.New("keys revoke: give exactly one key ID")
		}
		id, err := uuid.Parse(positional[0])
		if err != nil {
			return fmt.Errorf("keys revoke: %q is not a key ID", positional[0])
		}
		return withStore(ctx, dbf, stderr, func(store *db.DB) error {
			if err := store.RevokeAPIKey(ctx, id); err != nil {
				if errors.Is(err, db.ErrNotFound) {
					return fmt.Errorf("keys revoke: no key with ID %s", id)
				}
				return fmt.Errorf("revoke key: %w", err)
			}
			fmt.Fprintf(stdout, "revoked %s\n", id)
			return nil
		})
	default:
		fmt.Fprint(stderr, keysUsage)
		return fmt.Errorf("keys: unknown subcommand %q", sub)
	}
}

func formatOptionalTime(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// withDatabase runs fn with a database URL, starting (and afterwards
// stopping) the embedded database when none is configured and no running
// serve already has it up.
func withDatabase(ctx context.Context, dbf databaseFlags, stderr io.Writer, fn func(url string) error) error {
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	database, err := app.OpenDatabase(ctx, dbf.url, dbf.dataDir, logger)
	if err != nil {
		return err
	}
	defer func() {
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = database.Close(stopCtx)
	}()
	return fn(database.URL)
}

func withStore(ctx context.Context, dbf databaseFlags, stderr io.Writer, fn func(*db.DB) error) error {
	return withDatabase(ctx, dbf, stderr, func(url string) error {
		// db's errors already start with the step ("migrate: ...", "open
		// database: ...").
		if err := db.Migrate(ctx, url); err != nil {
			return err
		}
		store, err := db.Open(ctx, url)
		if err != nil {
			return err
		}
		defer store.Close()
		return fn(store)
	})
}
