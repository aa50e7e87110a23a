-- +goose NO TRANSACTION

-- +goose Up

-- Sender restrictions and rate limits (see README "Rate limits" and
-- docs/operations.md). Columns without defaults, or with constant ones,
-- are added without rewriting the tables.
--
-- sender_domains: the From and envelope sender domains a key may send
-- from; empty allows any.
-- requests_per_second: the key's request rate, per instance; NULL takes
-- the project's, then the configured default.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS sender_domains text[] NOT NULL DEFAULT '{}';
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS requests_per_second integer
    CHECK (requests_per_second IS NULL OR requests_per_second >= 0);

-- Per project overrides of the configured defaults; NULL takes the default,
-- 0 is no limit.
ALTER TABLE projects ADD COLUMN IF NOT EXISTS requests_per_second integer
    CHECK (requests_per_second IS NULL OR requests_per_second >= 0);
ALTER TABLE projects ADD COLUMN IF NOT EXISTS recipients_per_day bigint
    CHECK (recipients_per_day IS NULL OR recipients_per_day >= 0);

-- Recipients accepted per project and UTC day, counted by the intake with
-- one UPSERT per call when a daily limit applies. One small row per project
-- and day.
CREATE TABLE IF NOT EXISTS project_daily_usage (
    project_id uuid   NOT NULL,
    day        date   NOT NULL,
    recipients bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, day)
);

-- The claim takes first attempts and retries in separate lists (see
-- db/queue.go claimSQL); each walks its own partial index, so that a large
-- backlog of one kind is never read past to find the other.
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_fresh_idx;
CREATE INDEX CONCURRENTLY recipients_due_fresh_idx ON recipients (next_attempt_at)
    WHERE status IN ('queued', 'scheduled', 'deferred') AND attempts = 0;
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_retry_idx;
CREATE INDEX CONCURRENTLY recipients_due_retry_idx ON recipients (next_attempt_at)
    WHERE status IN ('queued', 'scheduled', 'deferred') AND attempts > 0;

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_retry_idx;
DROP INDEX CONCURRENTLY IF EXISTS recipients_due_fresh_idx;
DROP TABLE IF EXISTS project_daily_usage;
ALTER TABLE projects DROP COLUMN IF EXISTS recipients_per_day;
ALTER TABLE projects DROP COLUMN IF EXISTS requests_per_second;
ALTER TABLE api_keys DROP COLUMN IF EXISTS requests_per_second;
ALTER TABLE api_keys DROP COLUMN IF EXISTS sender_domains;
