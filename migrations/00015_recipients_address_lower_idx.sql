-- +goose NO TRANSACTION

-- +goose Up

-- ListMessages' recipient filter compares addresses without regard to case
-- (BOUNCE@example.com finds bounce@example.com), as mail systems treat them
-- in practice: it matches lower(address), which needs an expression index.
-- It replaces the plain index on address, which served only the exact
-- comparison this filter made before and nothing else, so intake still
-- writes one recipients index for the address, not two.
--
-- Built concurrently so that intake goes on meanwhile; an index left invalid
-- by a failed build is dropped first when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS recipients_address_lower_idx;
CREATE INDEX CONCURRENTLY recipients_address_lower_idx ON recipients (lower(address));
DROP INDEX CONCURRENTLY IF EXISTS recipients_address_idx;

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS recipients_address_idx;
CREATE INDEX CONCURRENTLY recipients_address_idx ON recipients (address);
DROP INDEX CONCURRENTLY IF EXISTS recipients_address_lower_idx;
