package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// APIKey is a stored API key. The key itself is never stored, only its
// hash.
type APIKey struct {
	ID        uuid.UUID
	Name      string
	Prefix    string
	CreatedAt time.Time
	// RevokedAt is nil while the key is active.
	RevokedAt *time.Time
	// LastUsedAt is when LookupAPIKey last found the key, to the minute.
	LastUsedAt *time.Time
}

const apiKeyColumns = `id, name, prefix, created_at, revoked_at, last_used_at`

const createAPIKeySQL = `
INSERT INTO api_keys (id, name, prefix, hash)
VALUES ($1, $2, $3, $4)
RETURNING ` + apiKeyColumns

// bootstrapKeyLock is the transaction advisory lock key that serializes
// CreateAPIKeyIfNone across instances.
const bootstrapKeyLock int64 = 0x706f7374686b6579 // "posthkey"

const lockBootstrapSQL = `SELECT pg_advisory_xact_lock($1)`

const anyAPIKeySQL = `SELECT EXISTS (SELECT 1 FROM api_keys)`

const listAPIKeysSQL = `SELECT ` + apiKeyColumns + ` FROM api_keys ORDER BY created_at, id`

// Revoking a revoked key keeps the first revocation time.
const revokeAPIKeySQL = `
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1`

// lookupAPIKeySQL finds an active key and records the use, at most once a
// minute per key so that a busy key does not turn every request into a
// write.
const lookupAPIKeySQL = `
WITH k AS (
    SELECT ` + apiKeyColumns + ` FROM api_keys WHERE hash = $1 AND revoked_at IS NULL
), touched AS (
    UPDATE api_keys a SET last_used_at = now()
    FROM k
    WHERE a.id = k.id AND (a.last_used_at IS NULL OR a.last_used_at < now() - interval '1 minute')
    RETURNING a.last_used_at
)
SELECT k.id, k.name, k.prefix, k.created_at, k.revoked_at,
    coalesce((SELECT last_used_at FROM touched), k.last_used_at)
FROM k`

func scanAPIKey(row pgx.CollectableRow) (APIKey, error) {
	var k APIKey
	err := row.Scan(&k.ID, &k.Name, &k.Prefix, &k.CreatedAt, &k.RevokedAt, &k.LastUsedAt)
	return k, err
}

func validateNewAPIKey(name, prefix string, hash []byte) error {
	switch {
	case name == "":
		return errors.New("name is required")
	case prefix == "":
		return errors.New("prefix is required")
	case len(hash) == 0:
		return errors.New("hash is required")
	}
	return nil
}

// CreateAPIKey stores a new key under the hash of its secret.
func (d *DB) CreateAPIKey(ctx context.Context, name, prefix string, hash []byte) (APIKey, error) {
	if err := validateNewAPIKey(name, prefix, hash); err != nil {
		return APIKey{}, fmt.Errorf("create api key: %w", err)
	}
	k, err := createAPIKey(ctx, d.pool, name, prefix, hash)
	if err != nil {
		return APIKey{}, fmt.Errorf("create api key %q: %w", name, mapError(err))
	}
	return k, nil
}

func createAPIKey(ctx context.Context, q Querier, name, prefix string, hash []byte) (APIKey, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return APIKey{}, err
	}
	rows, _ := q.Query(ctx, createAPIKeySQL, id, name, prefix, hash)
	return pgx.CollectExactlyOneRow(rows, scanAPIKey)
}

// CreateAPIKeyIfNone stores a key only when there is no key at all, revoked
// or not, and reports whether it did. It is how a first key is made on an
// empty database; instances starting together make exactly one, because
// they take turns under a transaction advisory lock.
func (d *DB) CreateAPIKeyIfNone(ctx context.Context, name, prefix string, hash []byte) (APIKey, bool, error) {
	if err := validateNewAPIKey(name, prefix, hash); err != nil {
		return APIKey{}, false, fmt.Errorf("create first api key: %w", err)
	}
	var (
		k       APIKey
		created bool
	)
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, lockBootstrapSQL, bootstrapKeyLock); err != nil {
			return err
		}
		var exists bool
		if err := tx.QueryRow(ctx, anyAPIKeySQL).Scan(&exists); err != nil {
			return err
		}
		if exists {
			return nil
		}
		var err error
		k, err = createAPIKey(ctx, tx, name, prefix, hash)
		created = err == nil
		return err
	})
	if err != nil {
		return APIKey{}, false, fmt.Errorf("create first api key: %w", mapError(err))
	}
	return k, created, nil
}

// ListAPIKeys returns every key, revoked ones included, oldest first.
func (d *DB) ListAPIKeys(ctx context.Context) ([]APIKey, error) {
	rows, _ := d.pool.Query(ctx, listAPIKeysSQL)
	keys, err := pgx.CollectRows(rows, scanAPIKey)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", mapError(err))
	}
	return keys, nil
}

// RevokeAPIKey revokes a key for good. Revoking it again is not an error;
// an unknown id is ErrNotFound.
func (d *DB) RevokeAPIKey(ctx context.Context, id uuid.UUID) error {
	tag, err := d.pool.Exec(ctx, revokeAPIKeySQL, id)
	if err != nil {
		return fmt.Errorf("revoke api key %s: %w", id, mapError(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("revoke api key %s: %w", id, ErrNotFound)
	}
	return nil
}

// LookupAPIKey finds the active key with the given hash, or ErrNotFound
// (also for a revoked key), and records that it was used.
func (d *DB) LookupAPIKey(ctx context.Context, hash []byte) (APIKey, error) {
	rows, _ := d.pool.Query(ctx, lookupAPIKeySQL, nonNilBytes(hash))
	k, err := pgx.CollectExactlyOneRow(rows, scanAPIKey)
	if err != nil {
		return APIKey{}, fmt.Errorf("look up api key: %w", mapError(err))
	}
	return k, nil
}
