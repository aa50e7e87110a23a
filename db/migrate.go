package db

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/posthaste/posthaste/migrations"
)

// Migrate applies every pending migration to the database at url. Instances
// started together do not race: they take turns under a PostgreSQL session
// advisory lock, and the ones that come second find nothing left to do.
func Migrate(ctx context.Context, url string) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("migrate: parse database url: %w", err)
	}
	boundConnect(cfg)
	sqlDB := stdlib.OpenDB(*cfg)
	defer sqlDB.Close()

	// goose's own lock id, so the goose command line and Posthaste exclude
	// each other too; advisory locks are per database, so nothing else waits.
	// Retry every second rather than goose's default five, so an instance
	// waiting on another's migration starts soon after it is done; give up
	// after five minutes.
	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(lock.DefaultLockID),
		lock.WithLockTimeout(1, 300),
	)
	if err != nil {
		return fmt.Errorf("migrate: session locker: %w", err)
	}
	provider, err := goose.NewProvider(goose.DialectPostgres, sqlDB, migrations.FS,
		goose.WithSessionLocker(locker),
		goose.WithDisableGlobalRegistry(true),
	)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if _, err := provider.Up(ctx); err != nil {
		return fmt.Errorf("migrate: %w", mapError(err))
	}
	return nil
}
