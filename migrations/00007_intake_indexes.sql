-- +goose NO TRANSACTION

-- +goose Up

-- The tag index only holds messages that have tags. A GIN index stores an
-- entry even for an empty array, so every message paid a GIN insert at
-- intake, while most transactional mail carries no tag and a tag filter can
-- never match one without. ListMessages repeats the predicate (tags <> '{}')
-- next to its tag filter so that the planner can use this index.
--
-- The other indexes stay; each serves a statement that runs often:
--   messages: pkey; (project_id, created_at, id) and (project_id, status,
--     created_at, id) for the listings.
--   recipients: pkey (outcomes by id); unique (message_id, position) reads a
--     message's recipients in order and serves the cascade from messages;
--     due and due_group (partial, waiting rows) the claim; lease_until and
--     lease_owner (partial, sending rows only, so intake never writes them)
--     the rescuer and the claim's message lookup; address the recipient
--     filter of the listing.
--
-- Built concurrently so that intake goes on meanwhile; an index left invalid
-- by a failed build is dropped first when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS messages_tags_nonempty_idx;
CREATE INDEX CONCURRENTLY messages_tags_nonempty_idx ON messages USING gin (tags)
    WHERE tags <> '{}';
DROP INDEX CONCURRENTLY IF EXISTS messages_tags_idx;

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS messages_tags_idx;
CREATE INDEX CONCURRENTLY messages_tags_idx ON messages USING gin (tags);
DROP INDEX CONCURRENTLY IF EXISTS messages_tags_nonempty_idx;
