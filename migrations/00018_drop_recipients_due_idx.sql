-- +goose NO TRANSACTION

-- +goose Up

-- recipients_due_idx (all due rows by next_attempt_at) served the claim
-- until 00017 split it into first attempts and retries, each with its own
-- partial index. What still read it, the queue-depth count and the age of
-- the oldest due row, now read those two (db/observe.go), so intake and
-- every deferral write one index entry fewer per recipient.
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_idx;

-- +goose Down
CREATE INDEX CONCURRENTLY IF NOT EXISTS recipients_due_idx ON recipients (next_attempt_at)
    WHERE status IN ('queued', 'scheduled', 'deferred');
