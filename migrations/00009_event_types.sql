-- +goose NO TRANSACTION

-- +goose Up

-- New event types: a suppressed send, a complaint (feedback loop), a delay
-- reported by a DSN, and an automatic reply. The set only grows, so every
-- existing row satisfies the new check. Swapping the constraint in one
-- statement keeps the table checked throughout; NOT VALID makes that
-- statement take its exclusive lock only for an instant instead of for a
-- scan of the whole table, and the scan follows under a lock that lets
-- writers carry on.
ALTER TABLE events
    DROP CONSTRAINT IF EXISTS events_type_check,
    ADD CONSTRAINT events_type_check CHECK (type IN (
        'accepted', 'scheduled', 'deferred', 'delivered', 'bounced', 'failed', 'canceled',
        'suppressed', 'complained', 'delayed', 'auto_replied')) NOT VALID;
ALTER TABLE events VALIDATE CONSTRAINT events_type_check;

-- +goose Down
-- Rows of the new types would fail the old check; they are left in place,
-- unchecked, rather than deleted.
ALTER TABLE events
    DROP CONSTRAINT IF EXISTS events_type_check,
    ADD CONSTRAINT events_type_check CHECK (type IN (
        'accepted', 'scheduled', 'deferred', 'delivered', 'bounced', 'failed', 'canceled')) NOT VALID;
