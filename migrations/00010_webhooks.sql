-- +goose Up

-- Webhook endpoints belong to a project, like everything a caller creates.
-- The secret is kept as it is, not hashed: every request is signed with it
-- (HMAC), so it must be readable. previous_secret signs alongside the new
-- one until previous_secret_expires_at, so receivers can switch over.
--
-- consecutive_failures and failing_since describe the current run of
-- failed attempts (reset by a success); the sender disables an endpoint
-- whose run lasted too long, and records when and why in disabled_at and
-- disabled_reason.
CREATE TABLE webhook_endpoints (
    id                         uuid        PRIMARY KEY,
    project_id                 uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    url                        text        NOT NULL,
    description                text        NOT NULL DEFAULT '',
    event_types                text[]      NOT NULL DEFAULT '{}',
    enabled                    boolean     NOT NULL DEFAULT true,
    secret                     text        NOT NULL,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    consecutive_failures       integer     NOT NULL DEFAULT 0,
    failing_since              timestamptz,
    disabled_at                timestamptz,
    disabled_reason            text        NOT NULL DEFAULT '',
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_endpoints_project_idx ON webhook_endpoints (project_id, created_at, id);

-- One row per (endpoint, event): the webhook outbox. The fan-out writes
-- them from the event feed; the sender claims them like the delivery
-- dispatcher claims recipients (SKIP LOCKED, a lease owner and expiry).
--
-- event_id is the id sent as webhook-id and in the body: the events row's
-- id for message events, a fresh one for endpoint events. (event_txid,
-- event_seq) is the event's position in the feed, the order in which one
-- message's events go out to one endpoint. body is the exact JSON sent,
-- built once at fan-out so every retry sends the same bytes.
CREATE TABLE webhook_deliveries (
    id               uuid        PRIMARY KEY,
    endpoint_id      uuid        NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    project_id       uuid        NOT NULL,
    event_id         text        NOT NULL,
    event_type       text        NOT NULL,
    event_txid       xid8        NOT NULL,
    event_seq        bigint      NOT NULL,
    message_id       uuid,
    body             text        NOT NULL,
    state            text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_until      timestamptz,
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_latency_ms  integer,
    last_error       text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_deliveries_state_check
        CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    CONSTRAINT webhook_deliveries_lease_check
        CHECK ((state = 'sending') = (lease_owner IS NOT NULL AND lease_until IS NOT NULL)),
    -- A second fan-out of the same event to the same endpoint is refused,
    -- whatever happened to the cursor.
    CONSTRAINT webhook_deliveries_endpoint_event_key UNIQUE (endpoint_id, event_id)
);

-- The claim: due pending rows, oldest due first.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
-- The ordering check: an earlier unfinished event of the same message to the
-- same endpoint holds a row back.
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (endpoint_id, message_id, event_txid, event_seq)
    WHERE state IN ('pending', 'sending');
-- The rescuer.
CREATE INDEX webhook_deliveries_lease_idx ON webhook_deliveries (lease_until) WHERE state = 'sending';
-- The delivery log of one endpoint, newest first.
CREATE INDEX webhook_deliveries_endpoint_created_idx ON webhook_deliveries (endpoint_id, created_at DESC, id DESC);

-- Where the fan-out stands in the event feed. One row; the fan-out locks it
-- FOR UPDATE for the whole transaction that reads events after it, writes
-- their deliveries and moves it, so instances take turns and an event is
-- fanned out exactly once. It starts at the current end of the feed's
-- positions: events from before webhooks existed are not sent.
CREATE TABLE webhook_fanout_cursor (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    txid       xid8        NOT NULL,
    event_id   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- An event of a transaction still in flight now could commit behind that
-- position; no endpoint exists yet to miss it.
INSERT INTO webhook_fanout_cursor (txid, event_id)
SELECT coalesce((SELECT txid FROM events ORDER BY txid DESC, id DESC LIMIT 1), '0'::xid8),
       coalesce((SELECT id FROM events ORDER BY txid DESC, id DESC LIMIT 1), 0);

-- +goose Down
DROP TABLE webhook_fanout_cursor;
DROP TABLE webhook_deliveries;
DROP TABLE webhook_endpoints;
