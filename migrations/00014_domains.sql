-- +goose Up

-- A sending domain belongs to a project, like everything a caller creates.
-- A project may send with a From address at a domain only once the domain
-- is verified: its DKIM record (RFC 6376 section 3.6.2) was found in DNS
-- holding the public half of one of the domain's keys. name is the domain
-- in lowercase A-labels, so "Example.com" and "example.com" are one domain.
--
-- verified_at is set when a verification first finds the signing key's
-- record and cleared when a later one finds it missing or wrong; a DNS
-- failure leaves it as it was. The last verification's per-record results
-- are kept as JSON for the API (last_check), since they are only ever shown.
CREATE TABLE domains (
    id              uuid        PRIMARY KEY,
    project_id      uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name            text        NOT NULL,
    verified_at     timestamptz,
    last_checked_at timestamptz,
    last_check      jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT domains_project_name_key UNIQUE (project_id, name),
    CONSTRAINT domains_name_check CHECK (name = lower(name) AND name <> '')
);

-- A domain's DKIM keys, one per selector. The private key is stored only
-- encrypted (AES-256-GCM under the key-encryption key of the configuration,
-- bound to the row's id), never in the clear; kek_id names the
-- key-encryption key that sealed it so a wrong one is reported as such.
--
-- A key's state says what it is used for:
--   pending   added, its DNS record not seen yet; not used to sign
--   active    signs the domain's mail; at most one per domain
--   retiring  replaced by a newer key, still published so that mail it
--             signed verifies until retire_after; then it is retired
--   retired   no longer needed in DNS
-- Keys are never changed in place: a rotation adds a key, so a row's id
-- names one key for good (signers cache parsed keys by it).
CREATE TABLE domain_keys (
    id              uuid        PRIMARY KEY,
    domain_id       uuid        NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    selector        text        NOT NULL,
    algorithm       text        NOT NULL,
    public_key      text        NOT NULL,
    private_key_enc bytea       NOT NULL,
    kek_id          text        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending',
    verified_at     timestamptz,
    activated_at    timestamptz,
    retire_after    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT domain_keys_domain_selector_key UNIQUE (domain_id, selector),
    CONSTRAINT domain_keys_algorithm_check CHECK (algorithm IN ('rsa', 'ed25519')),
    CONSTRAINT domain_keys_state_check CHECK (state IN ('pending', 'active', 'retiring', 'retired')),
    CONSTRAINT domain_keys_selector_check CHECK (selector ~ '^[a-z0-9][a-z0-9-]{0,62}$')
);

-- The one signing key of a domain.
CREATE UNIQUE INDEX domain_keys_active_idx ON domain_keys (domain_id) WHERE state = 'active';

-- +goose Down
DROP TABLE domain_keys;
DROP TABLE domains;
