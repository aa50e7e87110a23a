-- +goose NO TRANSACTION

-- +goose Up

-- A claim takes the recipients of a message at one domain together, so that
-- they go out in one SMTP transaction: after picking rows in due order it
-- looks up the other due rows of each (message_id, domain) it picked. The
-- planner cannot tell how many rows are due (it takes next_attempt_at and
-- status to be independent, while only waiting rows have a next_attempt_at),
-- and without this index it may read every due row for that lookup.
--
-- Built concurrently so that accepting mail goes on meanwhile. An index left
-- invalid by a build that failed is dropped first when the migration runs
-- again.
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_group_idx;
CREATE INDEX CONCURRENTLY recipients_due_group_idx ON recipients (message_id, domain)
    WHERE status IN ('queued', 'scheduled', 'deferred');

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_group_idx;
