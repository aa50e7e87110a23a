package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Retention: the statements that empty old message bodies and delete old
// rows, in bounded batches. Only final messages are touched (every recipient
// delivered, bounced, failed or canceled), counted from when they became
// final: their updated_at, which the status recomputation (status.go) sets
// to the latest change of their recipients and which nothing moves once
// every recipient is final. The purge leaves it alone too.
//
// Each batch is one short transaction that locks its rows with SKIP LOCKED,
// so it never waits for the hot path and the hot path waits for it at most
// one batch.

// ErrRawPurged is returned when a message's raw body was emptied by
// retention. The API answers it with 410 Gone.
var ErrRawPurged = errors.New("message body purged by retention")

// RetentionLockID is the key of the PostgreSQL advisory lock under which one
// instance at a time runs retention. Advisory locks are per database, so
// Posthaste installations sharing a server do not exclude each other. It
// differs from the migrator's (goose's default 5887940537704921958).
const RetentionLockID int64 = 0x706f73746a616e69 // "postjani"

// finalStatuses is the SQL list of message statuses that mean every
// recipient is final. It must match the predicates of the partial indexes
// of migration 00016, or the planner cannot use them.
const finalStatuses = `('delivered', 'bounced', 'failed', 'canceled', 'partially_delivered')`

// RetentionParams bounds one retention batch.
type RetentionParams struct {
	// Age is how long a message must have been final (a delivery finished)
	// to be in the batch. Must be positive.
	Age time.Duration
	// Limit is the most messages (or rows) in the batch. Must be positive.
	Limit int
	// Now is the time the batch runs at; zero means the database's clock.
	// Tests pin it.
	Now time.Time
}

func (p RetentionParams) validate() error {
	switch {
	case p.Age <= 0:
		return fmt.Errorf("Age must be positive, got %s", p.Age)
	case p.Limit <= 0:
		return fmt.Errorf("Limit must be positive, got %d", p.Limit)
	}
	return nil
}

// purgeBodiesSQL empties the raw bodies of up to $2 final messages that
// became final before $1 minus $3, oldest first, by
// messages_final_unpurged_idx. updated_at stays: it is when the message
// became final, which the row retention counts from. size_bytes stays as a
// record of what was sent.
//
// $1 now or NULL, $2 limit, $3 age in microseconds.
const purgeBodiesSQL = `
WITH picked AS (
    SELECT id FROM messages
    WHERE status IN ` + finalStatuses + `
      AND raw_purged_at IS NULL
      AND updated_at < coalesce($1::timestamptz, now()) - $3::bigint * interval '1 microsecond'
    ORDER BY updated_at
    LIMIT $2
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE messages m
SET raw = '\x'::bytea, raw_purged_at = coalesce($1::timestamptz, now())
FROM picked
WHERE m.id = picked.id`

// PurgeMessageBodies empties the raw body of up to p.Limit messages that
// have been final for at longer than p.Age and marks them purged
// (Message.RawPurgedAt), and reports how many. Their other columns,
// recipients, attempts and events stay.
func (d *DB) PurgeMessageBodies(ctx context.Context, p RetentionParams) (int64, error) {
	if err := p.validate(); err != nil {
		return 0, fmt.Errorf("purge message bodies: %w", err)
	}
	tag, err := d.pool.Exec(ctx, purgeBodiesSQL, nowParam(p.Now), p.Limit, p.Age.Microseconds())
	if err != nil {
		return 0, fmt.Errorf("purge message bodies: %w", mapError(err))
	}
	return tag.RowsAffected(), nil
}

// pickExpiredMessagesSQL locks up to $2 messages to delete: final since
// before $1 minus $3, oldest first, by messages_final_idx.
//
// A message with an event the webhook fan-out has not read yet is kept: the
// fan-out joins each event to its message and would find nothing to send.
// The cursor is a position compared with (txid, id), not a reference, so
// deleting the events at or below it leaves it working; the event feed's
// readers likewise continue from their positions past deleted events.
//
// FOR UPDATE (not NO KEY) because the rows are about to be deleted: a
// concurrent insert of an event for the message (a late complaint) takes
// FOR KEY SHARE for its foreign key and waits, then fails rather than
// pointing at nothing.
//
// $1 now or NULL, $2 limit, $3 age in microseconds.
const pickExpiredMessagesSQL = `
SELECT m.id FROM messages m
WHERE m.status IN ` + finalStatuses + `
  AND m.updated_at < coalesce($1::timestamptz, now()) - $3::bigint * interval '1 microsecond'
  AND NOT EXISTS (
      SELECT 1 FROM events e, webhook_fanout_cursor c
      WHERE e.message_id = m.id AND (e.txid, e.id) > (c.txid, c.event_id))
ORDER BY m.updated_at
LIMIT $2
FOR UPDATE OF m SKIP LOCKED`

// The rows of the picked messages, children first, each statement by the
// index on its message_id. Deleting them explicitly rather than through
// ON DELETE CASCADE gives each table's count; the cascades then find
// nothing left. Idempotency keys of a deleted message go with it: a retry
// of its request that late is a new request.
//
// $1 message ids.
const (
	deleteEventsOfMessagesSQL      = `DELETE FROM events WHERE message_id = ANY($1::uuid[])`
	deleteAttemptsOfMessagesSQL    = `DELETE FROM attempts WHERE message_id = ANY($1::uuid[])`
	deleteRecipientsOfMessagesSQL  = `DELETE FROM recipients WHERE message_id = ANY($1::uuid[])`
	deleteIdempotencyOfMessagesSQL = `DELETE FROM idempotency_keys WHERE message_id = ANY($1::uuid[])`
	deleteMessagesSQL              = `DELETE FROM messages WHERE id = ANY($1::uuid[])`
)

// DeletedMessages counts what one DeleteExpiredMessages batch deleted.
type DeletedMessages struct {
	Messages        int64
	Recipients      int64
	Attempts        int64
	Events          int64
	IdempotencyKeys int64
}

// DeleteExpiredMessages deletes up to p.Limit messages that have been final
// for longer than p.Age, oldest first, with their recipients, attempts,
// events and idempotency keys, in one transaction. Messages with events the
// webhook fan-out has yet to read are left for a later batch.
func (d *DB) DeleteExpiredMessages(ctx context.Context, p RetentionParams) (DeletedMessages, error) {
	if err := p.validate(); err != nil {
		return DeletedMessages{}, fmt.Errorf("delete expired messages: %w", err)
	}
	var out DeletedMessages
	err := d.atomic(ctx, func(tx *DB) error {
		out = DeletedMessages{}
		rows, _ := tx.pool.Query(ctx, pickExpiredMessagesSQL, nowParam(p.Now), p.Limit, p.Age.Microseconds())
		ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return fmt.Errorf("pick: %w", mapError(err))
		}
		if len(ids) == 0 {
			return nil
		}
		b := &pgx.Batch{}
		for _, s := range []string{deleteEventsOfMessagesSQL, deleteAttemptsOfMessagesSQL,
			deleteRecipientsOfMessagesSQL, deleteIdempotencyOfMessagesSQL, deleteMessagesSQL} {
			b.Queue(s, ids)
		}
		br := tx.pool.SendBatch(ctx, b)
		defer br.Close()
		for _, n := range []*int64{&out.Events, &out.Attempts, &out.Recipients, &out.IdempotencyKeys, &out.Messages} {
			tag, err := br.Exec()
			if err != nil {
				return fmt.Errorf("delete: %w", mapError(err))
			}
			*n = tag.RowsAffected()
		}
		if err := br.Close(); err != nil {
			return fmt.Errorf("delete: %w", mapError(err))
		}
		return nil
	})
	if err != nil {
		return DeletedMessages{}, fmt.Errorf("delete expired messages: %w", err)
	}
	return out, nil
}

// deleteFinishedWebhookDeliveriesSQL deletes up to $2 delivered or failed
// webhook deliveries created before $1 minus $3, oldest first, by
// webhook_deliveries_finished_idx. Deliveries have no foreign key to their
// message and carry the body they send, so they are aged on their own;
// they are created when their event is, so a message's deliveries go
// about when the message does. Pending ones are never deleted.
//
// $1 now or NULL, $2 limit, $3 age in microseconds.
const deleteFinishedWebhookDeliveriesSQL = `
DELETE FROM webhook_deliveries
WHERE id IN (
    SELECT id FROM webhook_deliveries
    WHERE state IN ('delivered', 'failed')
      AND created_at < coalesce($1::timestamptz, now()) - $3::bigint * interval '1 microsecond'
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED)`

// DeleteFinishedWebhookDeliveries deletes up to p.Limit webhook deliveries
// that were delivered or finally failed and were created longer than p.Age
// ago, and reports how many.
func (d *DB) DeleteFinishedWebhookDeliveries(ctx context.Context, p RetentionParams) (int64, error) {
	if err := p.validate(); err != nil {
		return 0, fmt.Errorf("delete finished webhook deliveries: %w", err)
	}
	tag, err := d.pool.Exec(ctx, deleteFinishedWebhookDeliveriesSQL, nowParam(p.Now), p.Limit, p.Age.Microseconds())
	if err != nil {
		return 0, fmt.Errorf("delete finished webhook deliveries: %w", mapError(err))
	}
	return tag.RowsAffected(), nil
}

// deleteExpiredIdempotencyBatchSQL is deleteExpiredIdempotencyKeysSQL in a
// bounded batch, by idempotency_keys_expires_at_idx.
//
// $1 limit.
const deleteExpiredIdempotencyBatchSQL = `
DELETE FROM idempotency_keys
WHERE (project_id, key) IN (
    SELECT project_id, key FROM idempotency_keys
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED)`

// DeleteExpiredIdempotencyKeyBatch is DeleteExpiredIdempotencyKeys for at
// most limit keys, so that a backlog is removed in short transactions.
func (d *DB) DeleteExpiredIdempotencyKeyBatch(ctx context.Context, limit int) (int64, error) {
	if limit <= 0 {
		return 0, fmt.Errorf("delete expired idempotency keys: limit must be positive, got %d", limit)
	}
	tag, err := d.pool.Exec(ctx, deleteExpiredIdempotencyBatchSQL, limit)
	if err != nil {
		return 0, fmt.Errorf("delete expired idempotency keys: %w", mapError(err))
	}
	return tag.RowsAffected(), nil
}

// vacuumRetainedTablesSQL vacuums the tables retention deletes from.
// SKIP_LOCKED passes over a table someone holds a conflicting lock on (a
// migration, a manual VACUUM FULL) rather than waiting behind it. VACUUM
// takes a lock that lets reads and writes go on.
const vacuumRetainedTablesSQL = `VACUUM (SKIP_LOCKED) messages, recipients, attempts, events, idempotency_keys, webhook_deliveries`

// VacuumRetainedTables vacuums the tables that retention deletes from, so
// the space of the rows it deleted can be reused at once rather than when
// autovacuum next comes round.
func (d *DB) VacuumRetainedTables(ctx context.Context) error {
	if d.tx != nil {
		return errors.New("vacuum retained tables: VACUUM cannot run inside a transaction")
	}
	if _, err := d.pool.Exec(ctx, vacuumRetainedTablesSQL); err != nil {
		return fmt.Errorf("vacuum retained tables: %w", mapError(err))
	}
	return nil
}

const (
	tryAdvisoryLockSQL = `SELECT pg_try_advisory_lock($1)`
	advisoryUnlockSQL  = `SELECT pg_advisory_unlock($1)`
)

// SessionLock is a session-level advisory lock held on a connection of its
// own, taken from the pool for as long as the lock is held.
type SessionLock struct {
	conn *pgxpool.Conn
	id   int64
}

// TryRetentionLock takes the retention advisory lock (RetentionLockID) on a
// dedicated connection, without waiting: ok is false when another session
// holds it. The lock is the session's, not a transaction's, so it spans
// every batch of a run while each batch commits on its own; should the
// process die, the server ends the session and the lock with it. Release
// gives it back.
func (d *DB) TryRetentionLock(ctx context.Context) (lock *SessionLock, ok bool, err error) {
	conn, err := d.root.Acquire(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("retention lock: %w", mapError(err))
	}
	if err := conn.QueryRow(ctx, tryAdvisoryLockSQL, RetentionLockID).Scan(&ok); err != nil {
		conn.Release()
		return nil, false, fmt.Errorf("retention lock: %w", mapError(err))
	}
	if !ok {
		conn.Release()
		return nil, false, nil
	}
	return &SessionLock{conn: conn, id: RetentionLockID}, true, nil
}

// Release unlocks and gives the connection back to the pool. When the
// unlock cannot be confirmed, the connection is closed instead, which ends
// the session and so the lock: a connection still holding it must never go
// back to the pool.
func (l *SessionLock) Release(ctx context.Context) error {
	var unlocked bool
	err := l.conn.QueryRow(ctx, advisoryUnlockSQL, l.id).Scan(&unlocked)
	if err != nil || !unlocked {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = l.conn.Conn().Close(closeCtx)
	}
	l.conn.Release()
	if err != nil {
		return fmt.Errorf("release retention lock: %w", mapError(err))
	}
	return nil
}
