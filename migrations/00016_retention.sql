-- +goose NO TRANSACTION

-- +goose Up

-- Retention (see docs/operations.md). A message's raw body is emptied some
-- days after the message became final, and raw_purged_at says when, so the
-- API can tell "purged" from "never had a body". Its rows go some days
-- later. A message is final when its derived status is one of delivered,
-- bounced, failed, canceled, partially_delivered; it became final at its
-- updated_at, which the status recomputation (db/status.go) sets to the
-- latest change of its recipients and nothing changes afterwards.
--
-- A nullable column without a default is added without rewriting the table.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS raw_purged_at timestamptz;

-- The janitor's scans: final messages oldest first, those whose body is
-- still there, and all of them. Partial, so that the listings and the hot
-- path of waiting messages never write these indexes; only the statement
-- that makes a message final adds an entry. Two indexes rather than one
-- with a filter on raw_purged_at: between the two retention times a single
-- index would hold weeks of purged messages that every purge batch would
-- read past.
DROP INDEX CONCURRENTLY IF EXISTS messages_final_unpurged_idx;
CREATE INDEX CONCURRENTLY messages_final_unpurged_idx ON messages (updated_at)
    WHERE status IN ('delivered', 'bounced', 'failed', 'canceled', 'partially_delivered')
      AND raw_purged_at IS NULL;
DROP INDEX CONCURRENTLY IF EXISTS messages_final_idx;
CREATE INDEX CONCURRENTLY messages_final_idx ON messages (updated_at)
    WHERE status IN ('delivered', 'bounced', 'failed', 'canceled', 'partially_delivered');

-- Finished webhook deliveries, oldest first. Deliveries still pending or
-- being sent are never deleted, so they are left out.
DROP INDEX CONCURRENTLY IF EXISTS webhook_deliveries_finished_idx;
CREATE INDEX CONCURRENTLY webhook_deliveries_finished_idx ON webhook_deliveries (created_at)
    WHERE state IN ('delivered', 'failed');

-- Autovacuum on the hot tables. The defaults wait for a fifth of a table to
-- be dead before vacuuming it, which on a table of ten million recipients is
-- two million dead rows scanned past by every claim. Every recipient and
-- message is updated several times on its way through the queue, and the
-- janitor deletes whole days of rows at once: vacuuming after 2% (and
-- analyzing after 5%) keeps the dead share small and the planner's numbers
-- current. The insert-only tables (attempts, events) get the same treatment
-- for inserts, so their visibility map stays current for index-only scans.
--
-- No fillfactor: recipient and message updates change indexed columns (the
-- status is in the partial indexes' predicates), so they can never be HOT
-- updates, and free space kept on each page would only make the tables
-- larger.
ALTER TABLE recipients SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE messages SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    toast.autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE attempts SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE events SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE webhook_deliveries SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05);

-- +goose Down
ALTER TABLE webhook_deliveries RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor);
ALTER TABLE events RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor);
ALTER TABLE attempts RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor);
ALTER TABLE messages RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor,
    toast.autovacuum_vacuum_scale_factor);
ALTER TABLE recipients RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor);
DROP INDEX CONCURRENTLY IF EXISTS webhook_deliveries_finished_idx;
DROP INDEX CONCURRENTLY IF EXISTS messages_final_idx;
DROP INDEX CONCURRENTLY IF EXISTS messages_final_unpurged_idx;
ALTER TABLE messages DROP COLUMN IF EXISTS raw_purged_at;
