package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
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
  posthaste keys create --name NAME [--project P] [--scopes send,read]
                        [--sender-domains a.com,b.com]
                                      create a key; it is printed once
  posthaste keys list [--project P]   list a project's keys (never their secret)
  posthaste keys revoke ID [--project P]
                                      revoke a key; requests with it get 401

--project defaults to "default". Scopes: send (send and cancel messages),
read (get and list messages), admin (manage the project's keys; allows
everything). --scopes defaults to send,read. --sender-domains restricts the
key to sending from those domains (From and envelope sender); by default it
may send from any.
`

func runKeys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysUsage)
		return errors.New("keys: no subcommand given")
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create", "list", "revoke":
	default:
		fmt.Fprint(stderr, keysUsage)
		return fmt.Errorf("keys: unknown subcommand %q", sub)
	}
	fs := newFlagSet("keys "+sub, stderr)
	var dbf databaseFlags
	dbf.register(fs)
	var (
		name, projectName string
		senderDomains     listFlag
	)
	scopes := scopeList{scopes: []string{db.ScopeSend, db.ScopeRead}}
	fs.StringVar(&projectName, "project", db.DefaultProjectName, "the project the key belongs to")
	if sub == "create" {
		fs.StringVar(&name, "name", "", "a name that says who uses the key (required)")
		fs.Var(&scopes, "scopes", "comma-separated scopes: send, read, admin")
		fs.Var(&senderDomains, "sender-domains", "comma-separated domains the key may send from; empty allows any")
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
		if err := db.ValidateKeyName(name); err != nil {
			return fmt.Errorf("keys create: --name %w", err)
		}
		normalized, err := db.NormalizeScopes(scopes.scopes)
		if err != nil {
			return fmt.Errorf("keys create: --scopes: %w", err)
		}
		domains, err := db.NormalizeSenderDomains(senderDomains)
		if err != nil {
			return fmt.Errorf("keys create: --sender-domains: %w", err)
		}
		return withProject(ctx, dbf, projectName, stderr, func(store *db.DB, project db.Project) error {
			key, prefix, hash, err := service.NewAPIKey()
			if err != nil {
				return err
			}
			k, err := store.CreateAPIKey(ctx, db.NewAPIKeyParams{
				ProjectID: project.ID, Name: name, Prefix: prefix, Hash: hash, Scopes: normalized,
				SenderDomains: domains,
			})
			if err != nil {
				return fmt.Errorf("create key: %w", err)
			}
			restricted := ""
			if len(k.SenderDomains) > 0 {
				restricted = ", sending only from " + strings.Join(k.SenderDomains, ",")
			}
			fmt.Fprintf(stdout, "Created API key %s (%s) in project %s with scopes %s%s. It is shown only this once:\n\n    %s\n",
				k.ID, k.Name, project.Name, strings.Join(k.Scopes, ","), restricted, key)
			return nil
		})
	case "list":
		return withProject(ctx, dbf, projectName, stderr, func(store *db.DB, project db.Project) error {
			keys, err := store.ListAPIKeys(ctx, project.ID)
			if err != nil {
				return fmt.Errorf("list keys: %w", err)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tPREFIX\tSCOPES\tCREATED\tLAST USED\tREVOKED")
			for _, k := range keys {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, k.Prefix, strings.Join(k.Scopes, ","),
					k.CreatedAt.UTC().Format(time.RFC3339), formatOptionalTime(k.LastUsedAt), formatOptionalTime(k.RevokedAt))
			}
			return tw.Flush()
		})
	default: // revoke
		if len(positional) != 1 {
			return errors.New("keys revoke: give exactly one key ID")
		}
		id, err := uuid.Parse(positional[0])
		if err != nil {
			return fmt.Errorf("keys revoke: %q is not a key ID", positional[0])
		}
		return withProject(ctx, dbf, projectName, stderr, func(store *db.DB, project db.Project) error {
			if _, err := store.RevokeAPIKey(ctx, project.ID, id); err != nil {
				if errors.Is(err, db.ErrNotFound) {
					return fmt.Errorf("keys revoke: no key with ID %s in project %s", id, project.Name)
				}
				return fmt.Errorf("revoke key: %w", err)
			}
			fmt.Fprintf(stdout, "revoked %s\n", id)
			return nil
		})
	}
}

const projectsUsage = `Usage:
  posthaste projects create NAME           create a project
  posthaste projects list                  list projects and their active keys
  posthaste projects delete NAME [--force] delete a project
  posthaste projects limits NAME [--requests-per-second N] [--recipients-per-day N]
                                           set the project's rate limits; -1
                                           (the default) goes back to the
                                           serve flags, 0 is no limit

delete refuses while the project has active keys or stored messages; with
--force it deletes them too (messages with their recipients and history).
The default project cannot be deleted. Names are 1 to 63 lowercase letters,
digits, '-' or '_'.
`

func runProjects(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, projectsUsage)
		return errors.New("projects: no subcommand given")
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create", "list", "delete", "limits":
	default:
		fmt.Fprint(stderr, projectsUsage)
		return fmt.Errorf("projects: unknown subcommand %q", sub)
	}
	fs := newFlagSet("projects "+sub, stderr)
	var dbf databaseFlags
	dbf.register(fs)
	var (
		force                 bool
		perSecond, perDayFlag int64
	)
	if sub == "delete" {
		fs.BoolVar(&force, "force", false, "also delete the project's keys and messages")
	}
	if sub == "limits" {
		fs.Int64Var(&perSecond, "requests-per-second", -1, "API calls per second per key of the project, per instance; -1 uses --requests-per-second of serve, 0 is no limit")
		fs.Int64Var(&perDayFlag, "recipients-per-day", -1, "recipients per UTC day for the project; -1 uses --recipients-per-day of serve, 0 is no limit")
	}
	positional, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if sub == "list" {
		if len(positional) > 0 {
			return fmt.Errorf("projects list: unexpected argument %q", positional[0])
		}
		return withStore(ctx, dbf, stderr, func(store *db.DB) error {
			ps, err := store.ListProjects(ctx)
			if err != nil {
				return fmt.Errorf("list projects: %w", err)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tID\tACTIVE KEYS\tCREATED")
			for _, p := range ps {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", p.Name, p.ID, p.ActiveKeys, p.CreatedAt.UTC().Format(time.RFC3339))
			}
			return tw.Flush()
		})
	}
	if len(positional) != 1 {
		return fmt.Errorf("projects %s: give exactly one project name", sub)
	}
	name := positional[0]
	if err := db.ValidateProjectName(name); err != nil {
		return fmt.Errorf("projects %s: name %w", sub, err)
	}
	if sub == "limits" {
		var l db.ProjectLimits
		if perSecond >= 0 {
			n := int(min(perSecond, 1<<31-1))
			l.RequestsPerSecond = &n
		}
		if perDayFlag >= 0 {
			l.RecipientsPerDay = &perDayFlag
		}
		return withProject(ctx, dbf, name, stderr, func(store *db.DB, project db.Project) error {
			if err := store.SetProjectLimits(ctx, project.ID, l); err != nil {
				return fmt.Errorf("projects limits: %w", err)
			}
			fmt.Fprintf(stdout, "set the limits of project %s (keys pick them up within --api-key-cache-ttl)\n", project.Name)
			return nil
		})
	}
	if sub == "create" {
		return withStore(ctx, dbf, stderr, func(store *db.DB) error {
			p, err := store.CreateProject(ctx, name)
			if errors.Is(err, db.ErrAlreadyExists) {
				return fmt.Errorf("projects create: project %s already exists", name)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "created project %s (%s)\n", p.Name, p.ID)
			return nil
		})
	}
	return withStore(ctx, dbf, stderr, func(store *db.DB) error {
		err := store.DeleteProject(ctx, db.DeleteProjectParams{Name: name, Force: force})
		var notEmpty *db.ProjectNotEmptyError
		switch {
		case errors.As(err, &notEmpty):
			return fmt.Errorf("projects delete: %s: %w; revoke its keys first, or pass --force to delete them and its messages", name, notEmpty)
		case errors.Is(err, db.ErrNotFound):
			return fmt.Errorf("projects delete: no project named %s", name)
		case errors.Is(err, db.ErrDefaultProject):
			return fmt.Errorf("projects delete: %w", db.ErrDefaultProject)
		case err != nil:
			return err
		}
		fmt.Fprintf(stdout, "deleted project %s\n", name)
		return nil
	})
}

// withProject runs fn with the store and the project called name.
func withProject(ctx context.Context, dbf databaseFlags, name string, stderr io.Writer, fn func(*db.DB, db.Project) error) error {
	return withStore(ctx, dbf, stderr, func(store *db.DB) error {
		p, err := store.ProjectByName(ctx, name)
		if errors.Is(err, db.ErrNotFound) {
			return fmt.Errorf("no project named %s (see posthaste projects list)", name)
		}
		if err != nil {
			return err
		}
		return fn(store, p)
	})
}

// scopeList is --scopes: a comma-separated list that replaces the default
// when given (once or repeated).
type scopeList struct {
	scopes []string
	set    bool
}

func (l *scopeList) String() string { return strings.Join(l.scopes, ",") }

func (l *scopeList) Set(v string) error {
	if !l.set {
		l.scopes, l.set = nil, true
	}
	for _, part := range strings.Split(v, ",") {
		if part = strings.TrimSpace(part); part != "" {
			l.scopes = append(l.scopes, part)
		}
	}
	return nil
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
	return useDatabase(ctx, dbf, stderr, app.OpenDatabase, fn)
}

// withExistingDatabase is withDatabase that refuses a data directory
// without a database instead of creating one.
func withExistingDatabase(ctx context.Context, dbf databaseFlags, stderr io.Writer, fn func(url string) error) error {
	return useDatabase(ctx, dbf, stderr, app.OpenExistingDatabase, fn)
}

type openFunc func(ctx context.Context, url, dataDir string, logger *slog.Logger) (*app.Database, error)

func useDatabase(ctx context.Context, dbf databaseFlags, stderr io.Writer, open openFunc, fn func(url string) error) error {
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	database, err := open(ctx, dbf.url, dbf.dataDir, logger)
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

// withStore runs fn with the migrated database of an existing installation:
// against a data directory that holds no database it fails and creates
// nothing, since keys and projects only make sense for data that exists.
func withStore(ctx context.Context, dbf databaseFlags, stderr io.Writer, fn func(*db.DB) error) error {
	return withExistingDatabase(ctx, dbf, stderr, func(url string) error {
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
