package db

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

const takeIdempotencyKeySQL = `
INSERT INTO idempotency_keys AS k (project_id, key, request_hash, message_id, response, expires_at)
VALUES ($1, $2, $3, $4, $5, now() + $6::bigint * interval '1 microsecond')
ON CONFLICT (project_id, key) DO UPDATE
SET request_hash = excluded.request_hash,
    message_id = excluded.message_id,
    response = excluded.response,
    created_at = now(),
    expires_at = excluded.expires_at
WHERE k.expires_at <= now()
RETURNING true`

const getIdempotencyKeySQL = `
SELECT request_hash, response FROM idempotency_keys
WHERE project_id = $1 AND key = $2`

// takeIdempotencyKey records the key for messageID in its project, or
// reports the request that holds it. An INSERT that meets an uncommitted row with the same key
// waits for that transaction, so concurrent callers are serialized here.
func takeIdempotencyKey(ctx context.Context, tx pgx.Tx, projectID, messageID uuid.UUID, k Idempotency) (InsertResult, error) {
	ttl := k.TTL
	if ttl == 0 {
		ttl = DefaultIdempotencyTTL
	}
	// The holder can expire and be deleted between the two statements; then
	// the key is free and the INSERT is tried again.
	for range 3 {
		var taken bool
		err := tx.QueryRow(ctx, takeIdempotencyKeySQL,
			projectID, k.Key, nonNilBytes(k.RequestHash), messageID, k.Response, ttl.Microseconds(),
		).Scan(&taken)
		if err == nil {
			return InsertResult{}, nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return InsertResult{}, fmt.Errorf("take idempotency key: %w", err)
		}
		var hash, response []byte
		err = tx.QueryRow(ctx, getIdempotencyKeySQL, projectID, k.Key).Scan(&hash, &response)
		if errors.Is(err, pgx.ErrNoRows) {
			continue
		}
		if err != nil {
			return InsertResult{}, fmt.Errorf("read idempotency key: %w", err)
		}
		if !bytes.Equal(hash, k.RequestHash) {
			return InsertResult{}, ErrIdempotencyConflict
		}
		return InsertResult{Replayed: true, Response: response}, nil
	}
	return InsertResult{}, errors.New("take idempotency key: key kept changing hands")
}

const deleteExpiredIdempotencyKeysSQL = `DELETE FROM idempotency_keys WHERE expires_at <= now()`

// DeleteExpiredIdempotencyKeys removes idempotency keys past their TTL and
// returns how many it removed. Expired keys are already ignored by
// InsertMessage; this only reclaims the space.
func (d *DB) DeleteExpiredIdempotencyKeys(ctx context.Context) (int64, error) {
	tag, err := d.pool.Exec(ctx, deleteExpiredIdempotencyKeysSQL)
	if err != nil {
		return 0, fmt.Errorf("delete expired idempotency keys: %w", mapError(err))
	}
	return tag.RowsAffected(), nil
}
