-- +goose Up

-- A project owns its data: API keys, messages and idempotency keys today;
-- suppressions, webhooks, domains and rate limits carry a project_id the same
-- way. A key only ever sees its own project's rows.
--
-- The default project has a fixed id, so code can name it without a lookup:
-- everything stored before projects existed belongs to it, and so does a
-- message stored without a project (tools and tests that bypass the API).
-- It cannot be deleted.
CREATE TABLE projects (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_name_key UNIQUE (name),
    -- Names appear in command lines and URLs: lowercase, no spaces.
    CONSTRAINT projects_name_check CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$')
);

INSERT INTO projects (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'default');

-- Every key belongs to a project and carries scopes: send, read, admin
-- (admin implies the other two; see docs/architecture.md). Keys made before
-- projects existed could do everything the API offered, so they become admin
-- keys of the default project.
ALTER TABLE api_keys
    ADD COLUMN project_id uuid REFERENCES projects (id),
    ADD COLUMN scopes     text[];
UPDATE api_keys SET project_id = '00000000-0000-0000-0000-000000000001', scopes = '{admin}';
ALTER TABLE api_keys
    ALTER COLUMN project_id SET NOT NULL,
    ALTER COLUMN scopes SET NOT NULL,
    ADD CONSTRAINT api_keys_scopes_check
        CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['send', 'read', 'admin']);
CREATE INDEX api_keys_project_id_idx ON api_keys (project_id, created_at, id);

-- messages.project_id has no foreign key, on purpose. Every insert would take
-- a FOR KEY SHARE lock on the row it references, and nearly every message of
-- an installation references the same project (as it did the same API key
-- before): under load that one row becomes a hot spot of multixact locks.
-- The project of a message always comes from an authenticated key, and a
-- project's messages are deleted with it (posthaste projects delete --force),
-- so the reference cannot dangle in practice. The old foreign key to api_keys
-- goes for the same reason; api_key_id stays as a record of who sent it.
ALTER TABLE messages DROP CONSTRAINT messages_api_key_id_fkey;
ALTER TABLE messages ADD COLUMN project_id uuid;
UPDATE messages m
SET project_id = coalesce(
    (SELECT k.project_id FROM api_keys k WHERE k.id = m.api_key_id),
    '00000000-0000-0000-0000-000000000001');
ALTER TABLE messages ALTER COLUMN project_id SET NOT NULL;

-- Listing indexes lead with the project, so one project's listing never
-- walks another's rows. The tag index stays on tags alone: a tag filter is
-- answered by AND-ing it with the project index, and only the project's
-- rows are ever read from the table.
DROP INDEX messages_created_at_idx;
DROP INDEX messages_status_created_at_idx;
CREATE INDEX messages_project_created_at_idx ON messages (project_id, created_at DESC, id DESC);
CREATE INDEX messages_project_status_created_at_idx ON messages (project_id, status, created_at DESC, id DESC);

-- Idempotency keys are scoped to the project rather than the API key, so a
-- client that rotates its key keeps its retries safe. Two API keys of one
-- project may have used the same idempotency key; the newest use is kept
-- (the rows only live for a day).
ALTER TABLE idempotency_keys ADD COLUMN project_id uuid;
UPDATE idempotency_keys i
SET project_id = coalesce(
    (SELECT k.project_id FROM api_keys k WHERE k.id = i.api_key_id),
    '00000000-0000-0000-0000-000000000001');
DELETE FROM idempotency_keys i
WHERE EXISTS (
    SELECT 1 FROM idempotency_keys j
    WHERE j.project_id = i.project_id AND j.key = i.key
      AND (j.created_at, j.message_id) > (i.created_at, i.message_id));
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys DROP COLUMN api_key_id;
ALTER TABLE idempotency_keys ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (project_id, key);

-- +goose Down
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD COLUMN api_key_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000';
ALTER TABLE idempotency_keys ALTER COLUMN api_key_id DROP DEFAULT;
DELETE FROM idempotency_keys i
WHERE EXISTS (
    SELECT 1 FROM idempotency_keys j
    WHERE j.key = i.key AND (j.created_at, j.message_id) > (i.created_at, i.message_id));
ALTER TABLE idempotency_keys DROP COLUMN project_id;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (api_key_id, key);

DROP INDEX messages_project_status_created_at_idx;
DROP INDEX messages_project_created_at_idx;
CREATE INDEX messages_created_at_idx ON messages (created_at DESC, id DESC);
CREATE INDEX messages_status_created_at_idx ON messages (status, created_at DESC, id DESC);
ALTER TABLE messages DROP COLUMN project_id;
UPDATE messages m SET api_key_id = NULL
WHERE api_key_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.id = m.api_key_id);
ALTER TABLE messages ADD CONSTRAINT messages_api_key_id_fkey
    FOREIGN KEY (api_key_id) REFERENCES api_keys (id) ON DELETE SET NULL;

DROP INDEX api_keys_project_id_idx;
ALTER TABLE api_keys DROP COLUMN scopes;
ALTER TABLE api_keys DROP COLUMN project_id;
DROP TABLE projects;
