-- +goose Up

-- Events belong to the project of their message, like everything a caller
-- creates, so a project's feed is read without touching another's rows.
-- The writer sets it in the same statement as the event (see db/events.go),
-- which is why there is no default.
ALTER TABLE events ADD COLUMN project_id uuid;
UPDATE events e SET project_id = m.project_id FROM messages m WHERE m.id = e.message_id;
ALTER TABLE events ALTER COLUMN project_id SET NOT NULL;

-- A project's feed in commit-safe order; events_txid_id_idx stays for
-- readers of every project's events (dispatchers that serve all projects).
CREATE INDEX events_project_txid_id_idx ON events (project_id, txid, id);

-- +goose Down
DROP INDEX events_project_txid_id_idx;
ALTER TABLE events DROP COLUMN project_id;
