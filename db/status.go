package db

// The message status is derived from its recipients in exactly one place,
// the statement below, and every transaction that changes recipients runs it
// for the messages it touched:
//
//   - if any recipient is not final, the first present of sending, deferred,
//     queued, scheduled;
//   - else if all recipients share one status, that status;
//   - else if any was delivered, partially_delivered;
//   - else failed.
//
// updated_at becomes the latest updated_at of the message's recipients, so a
// statement that changed nothing leaves the message untouched.
//
// Before it runs, the transaction locks the message rows in id order
// (lockMessages...) as a separate statement. That is what makes the result
// right under concurrency: the derivation statement takes its snapshot only
// after every earlier holder of those locks has committed, so the last
// transaction to touch a message sees all of its recipients as they are.

const deriveStatusHead = `
UPDATE messages m
SET status = d.status,
    updated_at = greatest(m.updated_at, d.updated_at)
FROM (
    SELECT r.message_id,
        CASE
            WHEN bool_or(r.status = 'sending') THEN 'sending'
            WHEN bool_or(r.status = 'deferred') THEN 'deferred'
            WHEN bool_or(r.status = 'queued') THEN 'queued'
            WHEN bool_or(r.status = 'scheduled') THEN 'scheduled'
            WHEN min(r.status) = max(r.status) THEN min(r.status)
            WHEN bool_or(r.status = 'delivered') THEN 'partially_delivered'
            ELSE 'failed'
        END AS status,
        max(r.updated_at) AS updated_at
    FROM recipients r
    WHERE r.message_id IN (`

const deriveStatusTail = `)
    GROUP BY r.message_id
) d
WHERE m.id = d.message_id
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
	// $1: lease owner.
	messagesLeasedBy = `SELECT message_id FROM recipients WHERE lease_owner = $1 AND status = 'sending'`
)

const (
	lockMessagesByID         = lockMessagesHead + messagesByID + lockMessagesTail
	deriveStatusByID         = deriveStatusHead + messagesByID + deriveStatusTail
	lockMessagesOfRecipients = lockMessagesHead + messagesOfRecipients + lockMessagesTail
	deriveStatusOfRecipients = deriveStatusHead + messagesOfRecipients + deriveStatusTail
	lockMessagesLeasedBy     = lockMessagesHead + messagesLeasedBy + lockMessagesTail
	deriveStatusLeasedBy     = deriveStatusHead + messagesLeasedBy + deriveStatusTail
)
