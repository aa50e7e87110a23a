package db

import (
	"context"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// The message status is derived from its recipients in exactly one place,
// the statement below, and every change of recipients runs it for the
// messages it touched, through sendChange:
//
//   - if any recipient is not final, the first present of sending, deferred,
//     queued, scheduled;
//   - else if all recipients share one status, that status, except that a
//     message whose recipients were all suppressed is failed: nothing was
//     sent, the recipients say why, and the message statuses stay the set
//     that retention and the timeline know as final;
//   - else if any was delivered, partially_delivered;
//   - else failed.
//
// updated_at becomes the latest updated_at of the message's recipients, so a
// statement that changed nothing leaves the message untouched.
//
// Before it runs, sendChange locks the message rows in id order
// (lockMessages...) as a separate statement. That is what makes the result
// right under concurrency: the derivation statement takes its snapshot only
// after every earlier holder of those locks has committed, so the last
// transaction to touch a message sees all of its recipients as they are.

const deriveStatusHead = `
UPDATE messages m
SET status = d.status,
    updated_at = greatest(m.updated_at, d.updated_at)
FROM (SELECT DISTINCT t.message_id FROM (`

// deriveStatusTail aggregates each touched message's recipients on its own
// (LATERAL), so every message costs one probe of the (message_id, position)
// index whatever the planner believes of the table. Written as a plain
// IN (...) GROUP BY, a table whose statistics are missing or stale (a fresh
// install before autovacuum's first ANALYZE) got a hash join over a full
// scan of recipients, whose cost grew with the table.
const deriveStatusTail = `) t(message_id)) s
CROSS JOIN LATERAL (
    SELECT
        CASE
            WHEN bool_or(r.status = 'sending') THEN 'sending'
            WHEN bool_or(r.status = 'deferred') THEN 'deferred'
            WHEN bool_or(r.status = 'queued') THEN 'queued'
            WHEN bool_or(r.status = 'scheduled') THEN 'scheduled'
            WHEN min(r.status) = max(r.status) AND min(r.status) <> 'suppressed' THEN min(r.status)
            WHEN bool_or(r.status = 'delivered') THEN 'partially_delivered'
            ELSE 'failed'
        END AS status,
        max(r.updated_at) AS updated_at
    FROM recipients r
    WHERE r.message_id = s.message_id
    GROUP BY r.message_id
) d
WHERE m.id = s.message_id
  AND (m.status <> d.status OR m.updated_at < d.updated_at)`

const lockMessagesHead = `
SELECT id FROM messages
WHERE id IN (`

const lockMessagesTail = `)
ORDER BY id
FOR NO KEY UPDATE`

// The sets of messages a transaction may have touched.
const (
	// $1: message ids.
	messagesByID = `SELECT unnest($1::uuid[])`
	// $1: recipient ids.
	messagesOfRecipients = `SELECT message_id FROM recipients WHERE id = ANY($1::uuid[])`
	// $1: message ids, $2: their project. Another project's ids are left
	// out, so a change made through them finds nothing.
	messagesOfProjectByID = `SELECT id FROM messages WHERE id = ANY($1::uuid[]) AND project_id = $2`
)

const (
	lockMessagesByID         = lockMessagesHead + messagesByID + lockMessagesTail
	deriveStatusByID         = deriveStatusHead + messagesByID + deriveStatusTail
	lockMessagesOfRecipients = lockMessagesHead + messagesOfRecipients + lockMessagesTail
	deriveStatusOfRecipients = deriveStatusHead + messagesOfRecipients + deriveStatusTail
	lockProjectMessagesByID  = lockMessagesHead + messagesOfProjectByID + lockMessagesTail
	deriveProjectMessages    = deriveStatusHead + messagesOfProjectByID + deriveStatusTail
)

// markSendingByID is what deriving the status of messages that have a
// recipient this transaction just leased comes to: sending ranks first, so
// their recipients need not be read. The claim uses it, after locking the
// messages like any other change.
//
// $1: message ids.
const markSendingByID = `
UPDATE messages
SET status = 'sending', updated_at = greatest(updated_at, now())
WHERE id = ANY($1::uuid[]) AND (status <> 'sending' OR updated_at < now())`

// messageSet is the set of messages a change touched: the lock and derive
// statements for it, and their arguments.
type messageSet struct {
	lock, derive string
	args         []any
}

// messagesWithIDs is the set of the given messages.
func messagesWithIDs(ids []uuid.UUID) messageSet {
	return messageSet{lockMessagesByID, deriveStatusByID, []any{ids}}
}

// messagesOfRecipientIDs is the set of the messages of the given recipients.
func messagesOfRecipientIDs(ids []uuid.UUID) messageSet {
	return messageSet{lockMessagesOfRecipients, deriveStatusOfRecipients, []any{ids}}
}

// messagesClaimedWithIDs is the set of the given messages, each of which
// has a recipient that the transaction just leased.
func messagesClaimedWithIDs(ids []uuid.UUID) messageSet {
	return messageSet{lockMessagesByID, markSendingByID, []any{ids}}
}

// projectMessagesWithIDs is the set of the given messages that belong to
// the project.
func projectMessagesWithIDs(projectID uuid.UUID, ids []uuid.UUID) messageSet {
	return messageSet{lockProjectMessagesByID, deriveProjectMessages, []any{ids, projectID}}
}

// sendChange is how every change of recipients reaches the database. b
// holds the change: its statements lock recipients (in id order or with
// SKIP LOCKED), change them and write their events. sendChange appends the
// recomputation of the status of the touched messages (lock them in id
// order, then derive) and sends it all as one batch: one round trip, and on
// the pool one implicit transaction. read, when not nil, reads results in
// order: b's statements, then, if it wants, the message lock's, whose row
// count is the number of touched messages that exist.
func (d *DB) sendChange(ctx context.Context, b *pgx.Batch, touched messageSet, read func(pgx.BatchResults) error) error {
	b.Queue(touched.lock, touched.args...)
	b.Queue(touched.derive, touched.args...)
	br := d.pool.SendBatch(ctx, b)
	defer br.Close()
	if read != nil {
		if err := read(br); err != nil {
			return err
		}
	}
	return br.Close()
}
