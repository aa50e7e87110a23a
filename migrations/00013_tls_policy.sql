-- +goose Up

-- What protected each attempt's session: whether the server's certificate
-- verified (a chain to a trusted root, valid for the MX host name), the
-- cipher suite, and the TLS policy that applied (none, opportunistic,
-- require, require-verified, mta-sts-enforce, mta-sts-testing).
-- tls_policy_failure says why the host did not meet its policy: the reason
-- a host was refused, or, under an MTA-STS policy in testing mode, what
-- enforce mode would have refused while the message was delivered anyway
-- (RFC 8461 section 5). Rows written before this migration get the
-- defaults: unverified, no cipher, no policy recorded.
ALTER TABLE attempts
    ADD COLUMN tls_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN tls_cipher text NOT NULL DEFAULT '',
    ADD COLUMN tls_policy text NOT NULL DEFAULT '',
    ADD COLUMN tls_policy_failure text NOT NULL DEFAULT '';

-- MTA-STS policies (RFC 8461), shared by every instance: one row per policy
-- domain, the policy as fetched, the id of the TXT record it was fetched
-- for, and until when it may be used (fetched_at + max_age, section 3.2).
-- A row is replaced when the TXT record's id changes or the policy expires
-- (section 5.1). While a refetch fails the row stays in use until
-- expires_at; after that the domain counts as having no policy.
CREATE TABLE mta_sts_policies (
    domain     text        PRIMARY KEY,
    policy_id  text        NOT NULL,
    mode       text        NOT NULL CHECK (mode IN ('enforce', 'testing', 'none')),
    policy     text        NOT NULL,
    fetched_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

-- +goose Down
DROP TABLE mta_sts_policies;
ALTER TABLE attempts
    DROP COLUMN tls_policy_failure,
    DROP COLUMN tls_policy,
    DROP COLUMN tls_cipher,
    DROP COLUMN tls_verified;
