-- +goose Up

-- An attempt row says whose words its reply is: the remote server's, or one
-- Posthaste made up itself (a refused connection, a DNS failure, a hang-up
-- after the final dot). Rows written before this migration were mostly
-- replies from the remote side.
ALTER TABLE attempts
    ADD COLUMN source text NOT NULL DEFAULT 'remote',
    ADD CONSTRAINT attempts_source_check CHECK (source IN ('remote', 'local'));

-- ambiguous: the connection dropped or timed out after the end of DATA and
-- before the reply, so the receiver may have the message.
ALTER TABLE attempts DROP CONSTRAINT attempts_outcome_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_outcome_check
    CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'failed', 'ambiguous'));

-- How many attempts of a recipient ended ambiguous, so that a limit on
-- retrying them can be kept without counting attempt rows.
ALTER TABLE recipients
    ADD COLUMN ambiguous_attempts integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT recipients_ambiguous_attempts_check CHECK (ambiguous_attempts >= 0);

-- +goose Down
ALTER TABLE recipients DROP COLUMN ambiguous_attempts;
ALTER TABLE attempts DROP CONSTRAINT attempts_outcome_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_outcome_check
    CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'failed'));
ALTER TABLE attempts DROP COLUMN source;
