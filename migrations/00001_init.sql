-- +goose Up

-- API keys are stored as the SHA-256 of the key; the key itself is shown
-- once, when it is made. prefix is the readable start of the key, so an
-- operator can tell keys apart.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL,
    prefix       text        NOT NULL,
    hash         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_used_at timestamptz,
    CONSTRAINT api_keys_hash_key UNIQUE (hash)
);

-- messages.status is derived from the message's recipients and rewritten in
-- every transaction that changes them, so listing by status needs no join.
CREATE TABLE messages (
    id                uuid        PRIMARY KEY,
    api_key_id        uuid        REFERENCES api_keys (id) ON DELETE SET NULL,
    status            text        NOT NULL,
    message_id_header text        NOT NULL DEFAULT '',
    envelope_from     text        NOT NULL,
    from_header       text        NOT NULL DEFAULT '',
    subject           text        NOT NULL DEFAULT '',
    raw               bytea       NOT NULL,
    size_bytes        bigint      NOT NULL,
    tags              text[]      NOT NULL DEFAULT '{}',
    metadata          jsonb       NOT NULL DEFAULT '{}',
    send_at           timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_status_check CHECK (status IN (
        'scheduled', 'queued', 'sending', 'deferred',
        'delivered', 'bounced', 'failed', 'canceled', 'partially_delivered')),
    CONSTRAINT messages_size_bytes_check CHECK (size_bytes >= 0)
);

-- Keyset paging walks (created_at, id) newest first.
CREATE INDEX messages_created_at_idx ON messages (created_at DESC, id DESC);
CREATE INDEX messages_status_created_at_idx ON messages (status, created_at DESC, id DESC);
CREATE INDEX messages_tags_idx ON messages USING gin (tags);

-- One row per envelope recipient. position keeps the order the caller gave.
--
-- A row is claimable while queued, scheduled or deferred and next_attempt_at
-- has passed; a worker moves it to sending under a lease (lease_owner,
-- lease_until) and every later write is fenced on that lease. A lease that
-- runs out is rescued back to queued.
CREATE TABLE recipients (
    id                  uuid        PRIMARY KEY,
    message_id          uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position            integer     NOT NULL,
    address             text        NOT NULL,
    domain              text        NOT NULL,
    kind                text        NOT NULL,
    status              text        NOT NULL,
    attempts            integer     NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz,
    lease_owner         text,
    lease_until         timestamptz,
    cancel_requested_at timestamptz,
    last_code           integer,
    last_enhanced_code  text,
    last_text           text,
    delivered_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recipients_message_id_position_key UNIQUE (message_id, position),
    CONSTRAINT recipients_kind_check CHECK (kind IN ('to', 'cc', 'bcc', 'envelope')),
    CONSTRAINT recipients_status_check CHECK (status IN (
        'scheduled', 'queued', 'sending', 'deferred',
        'delivered', 'bounced', 'failed', 'canceled')),
    CONSTRAINT recipients_attempts_check CHECK (attempts >= 0),
    -- A lease exists exactly while the row is being sent.
    CONSTRAINT recipients_lease_check CHECK (
        CASE WHEN status = 'sending'
            THEN lease_owner IS NOT NULL AND lease_until IS NOT NULL
            ELSE lease_owner IS NULL AND lease_until IS NULL
        END),
    -- A waiting row must say when it is due; a final row is never due.
    CONSTRAINT recipients_next_attempt_check CHECK (
        CASE
            WHEN status IN ('scheduled', 'queued', 'deferred') THEN next_attempt_at IS NOT NULL
            WHEN status IN ('delivered', 'bounced', 'failed', 'canceled') THEN next_attempt_at IS NULL
            ELSE true
        END)
);

-- The claim: due rows in next_attempt_at order.
CREATE INDEX recipients_due_idx ON recipients (next_attempt_at)
    WHERE status IN ('queued', 'scheduled', 'deferred');
-- The rescuer: expired leases.
CREATE INDEX recipients_lease_until_idx ON recipients (lease_until)
    WHERE status = 'sending';
-- A claim finds the messages of the rows it leased by owner.
CREATE INDEX recipients_lease_owner_idx ON recipients (lease_owner)
    WHERE status = 'sending';
CREATE INDEX recipients_address_idx ON recipients (address);

-- One row per SMTP attempt of one recipient.
CREATE TABLE attempts (
    id            uuid        PRIMARY KEY,
    recipient_id  uuid        NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    message_id    uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    started_at    timestamptz NOT NULL,
    duration      interval    NOT NULL,
    mx_host       text        NOT NULL DEFAULT '',
    ip            text        NOT NULL DEFAULT '',
    tls           boolean     NOT NULL DEFAULT false,
    tls_version   text        NOT NULL DEFAULT '',
    code          integer     NOT NULL,
    enhanced_code text        NOT NULL DEFAULT '',
    text          text        NOT NULL DEFAULT '',
    outcome       text        NOT NULL,
    CONSTRAINT attempts_outcome_check CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'failed')),
    CONSTRAINT attempts_duration_check CHECK (duration >= interval '0')
);

CREATE INDEX attempts_recipient_id_idx ON attempts (recipient_id, started_at);
CREATE INDEX attempts_message_id_idx ON attempts (message_id, started_at);

-- The history of every message, in id order.
CREATE TABLE events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient_id uuid        REFERENCES recipients (id) ON DELETE CASCADE,
    type         text        NOT NULL,
    details      jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_type_check CHECK (type IN (
        'accepted', 'scheduled', 'deferred', 'delivered', 'bounced', 'failed', 'canceled'))
);

CREATE INDEX events_message_id_idx ON events (message_id, id);
-- Without it, deleting a message would scan events once per recipient.
CREATE INDEX events_recipient_id_idx ON events (recipient_id) WHERE recipient_id IS NOT NULL;

-- Idempotency keys are scoped to the API key that used them; api_key_id is
-- the nil UUID for requests made without one, so the primary key holds.
-- The key row is written before the message in the same transaction, hence
-- the deferred foreign key.
CREATE TABLE idempotency_keys (
    api_key_id   uuid        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    message_id   uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE
                                 DEFERRABLE INITIALLY DEFERRED,
    response     bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (api_key_id, key)
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
CREATE INDEX idempotency_keys_message_id_idx ON idempotency_keys (message_id);

-- +goose Down
DROP TABLE idempotency_keys;
DROP TABLE events;
DROP TABLE attempts;
DROP TABLE recipients;
DROP TABLE messages;
DROP TABLE api_keys;
