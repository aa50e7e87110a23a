-- +goose NO TRANSACTION

-- +goose Up

-- An event's id is taken when its row is inserted, but rows become visible
-- when their transaction commits, which is not in id order: a reader that
-- remembers "after id 10" skips an id 9 committed later. txid records the
-- writing transaction, so a reader can order by (txid, id) and read only
-- rows of transactions older than every transaction still in flight
-- (pg_snapshot_xmin), none of which can commit behind its position.
--
-- Rows written before this column existed get txid 0, so they are read
-- first, in id order; they were committed before any reader of the column
-- started. In one statement, the constant default fills the existing rows
-- without rewriting the table, and the transaction's id becomes the default
-- for new rows only.
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS txid xid8 NOT NULL DEFAULT '0',
    ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

-- The event feed reads in (txid, id) order. Built concurrently so that state
-- changes, which all write events, go on meanwhile; an index left invalid by
-- a build that failed is dropped first when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS events_txid_id_idx;
CREATE INDEX CONCURRENTLY events_txid_id_idx ON events (txid, id);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS events_txid_id_idx;
ALTER TABLE events DROP COLUMN IF EXISTS txid;
