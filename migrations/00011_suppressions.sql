-- +goose Up

-- The addresses a project no longer sends to. An entry is added by a hard
-- bounce (a permanent recipient or mailbox_disabled bounce, during the SMTP
-- session or later in a delivery status notification), by a complaint (a
-- feedback report, RFC 5965), or by hand.
--
-- address is normalized to lower case, the local part included: RFC 5321
-- section 2.4 lets a receiver treat local parts as case-sensitive, but no
-- mailbox provider does, and one spelling per mailbox is what makes the
-- unique key below catch every repeat. A domain-wide entry (*@example.net)
-- has domain_wide set and the domain alone in address.
--
-- message_id and recipient_id name what caused the entry. They have no
-- foreign key: the entry outlives the message, which may be deleted long
-- before the address works again. project_id has one, as webhook endpoints
-- do; entries are added only on bounces and complaints, so the key share
-- lock on the project row is taken rarely.
--
-- expires_at, when set, ends the entry; an expired entry that is hit again
-- is renewed rather than kept expired.
CREATE TABLE suppressions (
    id            uuid        PRIMARY KEY,
    project_id    uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    address       text        NOT NULL,
    domain_wide   boolean     NOT NULL DEFAULT false,
    reason        text        NOT NULL,
    message_id    uuid,
    recipient_id  uuid,
    code          integer,
    enhanced_code text,
    text          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    CONSTRAINT suppressions_reason_check CHECK (reason IN ('hard_bounce', 'complaint', 'manual')),
    CONSTRAINT suppressions_address_check CHECK (address <> '' AND address = lower(address)),
    -- One entry per address, and one per domain, in each project; it leads
    -- with the project, so one project's lookups and listings walk only its
    -- own entries.
    CONSTRAINT suppressions_project_address_key UNIQUE (project_id, address, domain_wide)
);

-- +goose Down
DROP TABLE suppressions;
