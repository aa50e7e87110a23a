-- +goose NO TRANSACTION

-- +goose Up

-- A recipient whose address is on its project's suppression list when the
-- message is accepted is never sent to: it is stored as 'suppressed', a
-- final status, with the entry's reason. A message whose recipients are all
-- suppressed derives 'failed' (db/status.go), so the messages table keeps
-- its statuses, and every reader of final message statuses (retention, the
-- timeline) keeps working unchanged.
--
-- Each constraint is swapped in one statement, so the table stays checked
-- throughout; NOT VALID makes that statement hold its exclusive lock only
-- for an instant, and the validating scan follows under a lock that lets
-- writers carry on. The set of statuses only grows, so every existing row
-- passes.
ALTER TABLE recipients
    DROP CONSTRAINT IF EXISTS recipients_status_check,
    ADD CONSTRAINT recipients_status_check CHECK (status IN (
        'scheduled', 'queued', 'sending', 'deferred',
        'delivered', 'bounced', 'failed', 'canceled', 'suppressed')) NOT VALID;
ALTER TABLE recipients VALIDATE CONSTRAINT recipients_status_check;

ALTER TABLE recipients
    DROP CONSTRAINT IF EXISTS recipients_next_attempt_check,
    ADD CONSTRAINT recipients_next_attempt_check CHECK (
        CASE
            WHEN status IN ('scheduled', 'queued', 'deferred') THEN next_attempt_at IS NOT NULL
            WHEN status IN ('delivered', 'bounced', 'failed', 'canceled', 'suppressed') THEN next_attempt_at IS NULL
            ELSE true
        END) NOT VALID;
ALTER TABLE recipients VALIDATE CONSTRAINT recipients_next_attempt_check;

-- Why a suppressed recipient was not sent to: the reason of the entry that
-- matched (hard_bounce, complaint, manual). NULL for every other recipient;
-- a nullable column without a default is added without rewriting the table.
ALTER TABLE recipients ADD COLUMN IF NOT EXISTS suppression_reason text;

-- Listing a project's entries newest first, page by page.
DROP INDEX CONCURRENTLY IF EXISTS suppressions_project_created_idx;
CREATE INDEX CONCURRENTLY suppressions_project_created_idx
    ON suppressions (project_id, created_at DESC, id DESC);

-- Listing by address prefix (LIKE 'prefix%'). The unique key's index cannot
-- serve a prefix under a collation other than C; text_pattern_ops compares
-- byte by byte whatever the database's collation.
DROP INDEX CONCURRENTLY IF EXISTS suppressions_project_address_prefix_idx;
CREATE INDEX CONCURRENTLY suppressions_project_address_prefix_idx
    ON suppressions (project_id, address text_pattern_ops);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS suppressions_project_address_prefix_idx;
DROP INDEX CONCURRENTLY IF EXISTS suppressions_project_created_idx;
-- Suppressed rows would fail the old checks; they are left in place,
-- unchecked, rather than deleted.
ALTER TABLE recipients
    DROP CONSTRAINT IF EXISTS recipients_next_attempt_check,
    ADD CONSTRAINT recipients_next_attempt_check CHECK (
        CASE
            WHEN status IN ('scheduled', 'queued', 'deferred') THEN next_attempt_at IS NOT NULL
            WHEN status IN ('delivered', 'bounced', 'failed', 'canceled') THEN next_attempt_at IS NULL
            ELSE true
        END) NOT VALID;
ALTER TABLE recipients
    DROP CONSTRAINT IF EXISTS recipients_status_check,
    ADD CONSTRAINT recipients_status_check CHECK (status IN (
        'scheduled', 'queued', 'sending', 'deferred',
        'delivered', 'bounced', 'failed', 'canceled')) NOT VALID;
ALTER TABLE recipients DROP COLUMN IF EXISTS suppression_reason;
