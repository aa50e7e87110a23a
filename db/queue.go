package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// ClaimParams says what ClaimRecipients takes and for how long.
type ClaimParams struct {
	// Owner names this claim in the lease; it must be unique per call.
	Owner string
	// Limit is how many rows to pick, oldest due first. The claim then adds
	// the other due rows of each (message, domain) group it picked, so that
	// a message's recipients at one domain are claimed together and can go
	// out in one SMTP transaction: a batch may exceed Limit by the rest of
	// the groups it picked. Rows of a group due at the same time are picked
	// together, so usually only the last group adds any. Claimers racing
	// for the same group may still split it between them, each taking the
	// rows the other had not locked yet.
	Limit int
	// LeaseFor is how long the rows stay leased before the rescuer may take
	// them back.
	LeaseFor time.Duration
	// Now is the time the claim runs at; zero means the database's clock.
	// Tests pin it.
	Now time.Time
}

// ClaimedRecipient is a recipient leased for one delivery attempt.
type ClaimedRecipient struct {
	ID        uuid.UUID
	MessageID uuid.UUID
	// Position is the recipient's place in its message, unique per message:
	// the VERP address of a transaction with one recipient names it.
	Position int
	Address  string
	Domain   string
	// Attempts counts the attempts made before this one.
	Attempts int
	// MessageCreatedAt is when the message was accepted.
	MessageCreatedAt time.Time
	// DueSince is the later of the message's creation and its send_at: when
	// the message first became due. The age after which a recipient is no
	// longer retried counts from here, so that a message scheduled far ahead
	// is not already too old at its first attempt.
	DueSince time.Time
	// AmbiguousAttempts counts the attempts before this one whose outcome
	// was unknown (see NewAttempt.Ambiguous).
	AmbiguousAttempts int
	LeaseOwner        string
	LeaseUntil        time.Time
}

// MessageContent is what delivery needs of a message to send it.
type MessageContent struct {
	ID           uuid.UUID
	EnvelopeFrom string
	Raw          []byte
}

// NewAttempt is one SMTP host tried for a recipient in a delivery attempt.
type NewAttempt struct {
	// ID identifies the attempt row; uuid.Nil makes one (NewAttemptID). A
	// caller that may write the same outcome again, after an error that
	// leaves unknown whether the first write committed, sets it once so
	// that the second write recognises the first.
	ID         uuid.UUID
	StartedAt  time.Time
	Duration   time.Duration
	MXHost     string
	IP         string
	TLS        bool
	TLSVersion string
	// TLSCipher is the cipher suite, e.g. "TLS_AES_128_GCM_SHA256"; empty
	// without TLS.
	TLSCipher string
	// TLSVerified reports that the server's certificate chained to a
	// trusted root and was valid for MXHost.
	TLSVerified bool
	// TLSPolicy is the TLS policy that applied to the host (see
	// delivery.TLSPolicy); empty when no host was tried.
	TLSPolicy string
	// TLSPolicyFailure says why the host did not meet TLSPolicy, empty when
	// it did.
	TLSPolicyFailure string
	// The host's reply: for the host that ran the transaction, the reply
	// that decided the recipient; for a host left for the next, the reply
	// that refused the session (a 421 greeting, say), or code 0 when there
	// was none (connection refused, timeout) with Text saying what happened.
	Code         int
	EnhancedCode string
	Text         string
	// Source says whose words the reply is: AttemptSourceRemote (the
	// server's) or AttemptSourceLocal (made up here: no reply came, as with
	// a refused connection or a DNS failure). Empty means remote.
	Source string
	// Ambiguous marks the host whose connection failed after the end of
	// DATA and before its reply: the receiver may have the message. Its row
	// gets the outcome "ambiguous" whatever the recipient's status.
	Ambiguous bool
}

// NewAttemptID makes an id for a NewAttempt. Version 7 ids grow with time,
// so attempts that start within the same microsecond still list in the
// order they were made.
func NewAttemptID() (uuid.UUID, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.Nil, fmt.Errorf("attempt id: %w", err)
	}
	return id, nil
}

// Attempt sources: whose words an attempt's reply is.
const (
	AttemptSourceRemote = "remote"
	AttemptSourceLocal  = "local"
)

// AttemptAmbiguous is the outcome of an attempt row whose transaction may or
// may not have delivered the message.
const AttemptAmbiguous = "ambiguous"

// Outcome is the result of delivering one claimed recipient.
type Outcome struct {
	RecipientID uuid.UUID
	// LeaseOwner is the owner the recipient was claimed with.
	LeaseOwner string
	// Status is delivered, deferred, bounced or failed.
	Status string
	// NextAttemptAt is when a deferred recipient is due again.
	NextAttemptAt time.Time
	// The reply, or one made up for a failure without one (DNS, network).
	Code         int
	EnhancedCode string
	Text         string
	// Ambiguous reports that the attempt ended without knowing whether the
	// receiver took the message; the recipient's AmbiguousAttempts grows by
	// one.
	Ambiguous bool
	// Class and Permanent classify a refusal (see delivery.ClassifyBounce);
	// they go into the event's payload. Empty for a delivery.
	Class     string
	Permanent bool
	// Suppress, on a bounced outcome, adds the recipient's address to its
	// project's suppression list in the same statement, with a suppressed
	// event when the entry is new. Empty adds nothing, and an outcome batch
	// without any runs the statement without the suppression part.
	Suppress SuppressionReason
	// Attempts are the rows to write for this attempt, in order: one per
	// SMTP host tried, or a single row without a host when none was tried
	// (null MX, NXDOMAIN, a DNS failure), carrying the local reply. Every
	// row but the last was given up for the next, and its outcome is
	// deferred; the last row's outcome is Status (or ambiguous, see
	// NewAttempt.Ambiguous). The recipient's attempt count grows by one
	// however many rows there are. It may be empty, and then no row is
	// written.
	Attempts []NewAttempt
}

// nowParam is NULL for the zero time, so that SQL falls back to now().
func nowParam(t time.Time) pgtype.Timestamptz {
	return pgtype.Timestamptz{Time: t, Valid: !t.IsZero()}
}

// claimSQL leases due rows oldest-due first, whole (message, domain) groups
// at a time, so that the recipients of one message at one domain can go out
// in one SMTP transaction.
//
// picked takes up to $2 due rows. Its order keeps a group's rows together
// when they are due at the same time, as the rows of a new message are, so
// that the limit cuts at most the last group in two. rest then takes the
// other due rows of every group picked: those past the limit, and those due
// at other times (deferred rows each have their own next_attempt_at). It
// looks each group up on its own (LATERAL), by recipients_due_group_idx,
// whatever the planner guesses of the number of due rows. The picked rows,
// locked by this statement already, are found again by rest and counted
// once. SKIP LOCKED lets claimers run side by side without waiting for or
// taking each other's rows. greatest() skips a NULL send_at, so an
// unscheduled message is due since its creation.
//
// First attempts and retries share the batch fairly: fresh takes up to
// $2 due rows never attempted, retry up to $2 due rows attempted before
// (each by its own partial index), and picked alternates between the two
// lists by rank, so a batch is half of each when both have enough, and the
// share one cannot fill goes to the other. A backlog of due retries (a
// provider that defers everything for an hour) thus never holds new mail
// back behind it, nor new mail the retries. The rows of the two lists that
// picked leaves out stay locked until the claim's transaction commits.
//
// $1 owner, $2 limit, $3 lease length in microseconds, $4 now or NULL.
const claimSQL = `
WITH fresh AS (
    SELECT id, message_id, domain, next_attempt_at FROM recipients
    WHERE status IN ('queued', 'scheduled', 'deferred') AND attempts = 0
      AND next_attempt_at <= coalesce($4::timestamptz, now())
    ORDER BY next_attempt_at, message_id, domain
    LIMIT $2
    FOR NO KEY UPDATE SKIP LOCKED
), retry AS (
    SELECT id, message_id, domain, next_attempt_at FROM recipients
    WHERE status IN ('queued', 'scheduled', 'deferred') AND attempts > 0
      AND next_attempt_at <= coalesce($4::timestamptz, now())
    ORDER BY next_attempt_at, message_id, domain
    LIMIT $2
    FOR NO KEY UPDATE SKIP LOCKED
), picked AS (
    SELECT id, message_id, domain FROM (
        SELECT id, message_id, domain, next_attempt_at, 0 AS kind,
            row_number() OVER (ORDER BY next_attempt_at, message_id, domain) AS n
        FROM fresh
        UNION ALL
        SELECT id, message_id, domain, next_attempt_at, 1 AS kind,
            row_number() OVER (ORDER BY next_attempt_at, message_id, domain) AS n
        FROM retry
    ) both_lists
    ORDER BY n, kind
    LIMIT $2
), rest AS (
    SELECT g.id
    FROM (SELECT DISTINCT message_id, domain FROM picked) p
    CROSS JOIN LATERAL (
        SELECT r.id FROM recipients r
        WHERE r.message_id = p.message_id AND r.domain = p.domain
          AND r.status IN ('queued', 'scheduled', 'deferred')
          AND r.next_attempt_at <= coalesce($4::timestamptz, now())
        FOR NO KEY UPDATE SKIP LOCKED
    ) g
), due AS (
    SELECT id FROM picked
    UNION
    SELECT id FROM rest
)
UPDATE recipients r
SET status = 'sending',
    lease_owner = $1,
    lease_until = coalesce($4::timestamptz, now()) + $3::bigint * interval '1 microsecond',
    updated_at = now()
FROM due, messages m
WHERE r.id = due.id AND m.id = r.message_id
RETURNING r.id, r.message_id, r.position, r.address, r.domain, r.attempts, m.created_at,
    greatest(m.created_at, m.send_at), r.ambiguous_attempts, r.lease_owner, r.lease_until`

// ClaimRecipients leases due recipients (queued, scheduled or deferred, with
// next_attempt_at passed) to p.Owner for p.LeaseFor, and marks their messages
// as sending. It takes whole groups of the same message and domain: up to
// p.Limit rows, then the other due rows of their groups (see
// ClaimParams.Limit). Rows another claimer holds are skipped.
func (d *DB) ClaimRecipients(ctx context.Context, p ClaimParams) ([]ClaimedRecipient, error) {
	c, err := d.claim(ctx, p, false)
	if err != nil {
		return nil, err
	}
	return c.Recipients, nil
}

// Claim is what ClaimWithContents leased: the recipients, and the envelope
// sender and bytes of each of their messages, once per message.
type Claim struct {
	Recipients []ClaimedRecipient
	// Messages holds the claimed recipients' messages by id. A message
	// deleted since its recipients were queued is missing.
	Messages map[uuid.UUID]MessageContent
}

// ClaimWithContents is ClaimRecipients that also returns the messages to
// send, read in the same transaction as the claim, each once however many
// of its recipients were claimed.
func (d *DB) ClaimWithContents(ctx context.Context, p ClaimParams) (Claim, error) {
	return d.claim(ctx, p, true)
}

func (d *DB) claim(ctx context.Context, p ClaimParams, withContents bool) (Claim, error) {
	switch {
	case p.Owner == "":
		return Claim{}, errors.New("claim recipients: Owner is required")
	case p.Limit <= 0:
		return Claim{}, errors.New("claim recipients: Limit must be positive")
	case p.LeaseFor <= 0:
		return Claim{}, errors.New("claim recipients: LeaseFor must be positive")
	}
	// The claim commits synchronously, like every change. A claim that
	// returned before its commit reached the disk could be lost in a crash of
	// the database server while its dispatcher goes on sending; once the
	// server is back the rows would be due again and a second send could
	// start before the first one's outcome is written. A durable claim keeps
	// them leased until that outcome, kept in memory meanwhile, is written.
	//
	// One transaction: the claim, then, by the ids it returned, the status
	// of its messages and their contents; four round trips with BEGIN and
	// COMMIT, for up to Limit recipients. Finding those messages again in
	// the claim's own round trip would mean looking up the owner's leased
	// rows, whose partial indexes hold an entry for every
	// row leased since the last vacuum, so that lookup grew with the
	// throughput; by id it costs one probe per message.
	var c Claim
	err := d.atomic(ctx, func(tx *DB) error {
		rows, _ := tx.pool.Query(ctx, claimSQL, p.Owner, p.Limit, p.LeaseFor.Microseconds(), nowParam(p.Now))
		var err error
		c.Recipients, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (ClaimedRecipient, error) {
			var c ClaimedRecipient
			err := row.Scan(&c.ID, &c.MessageID, &c.Position, &c.Address, &c.Domain, &c.Attempts,
				&c.MessageCreatedAt, &c.DueSince, &c.AmbiguousAttempts, &c.LeaseOwner, &c.LeaseUntil)
			return c, err
		})
		if err != nil || len(c.Recipients) == 0 {
			return err
		}
		ids := claimedMessageIDs(c.Recipients)
		b := &pgx.Batch{}
		if withContents {
			b.Queue(loadMessageContentsSQL, ids)
		}
		return tx.sendChange(ctx, b, messagesClaimedWithIDs(ids), func(br pgx.BatchResults) error {
			if !withContents {
				return nil
			}
			c.Messages, err = collectContents(br.Query())
			return err
		})
	})
	if err != nil {
		return Claim{}, fmt.Errorf("claim recipients: %w", mapError(err))
	}
	if withContents && c.Messages == nil {
		c.Messages = map[uuid.UUID]MessageContent{}
	}
	return c, nil
}

// claimedMessageIDs is the messages of the claimed rows, each once.
func claimedMessageIDs(rows []ClaimedRecipient) []uuid.UUID {
	ids := make([]uuid.UUID, 0, len(rows))
	seen := make(map[uuid.UUID]struct{}, len(rows))
	for _, r := range rows {
		if _, dup := seen[r.MessageID]; !dup {
			seen[r.MessageID] = struct{}{}
			ids = append(ids, r.MessageID)
		}
	}
	return ids
}

// collectContents reads rows of (id, envelope_from, raw) by id.
func collectContents(rows pgx.Rows, err error) (map[uuid.UUID]MessageContent, error) {
	if err != nil {
		return nil, err
	}
	out := make(map[uuid.UUID]MessageContent)
	var c MessageContent
	_, err = pgx.ForEachRow(rows, []any{&c.ID, &c.EnvelopeFrom, &c.Raw}, func() error {
		out[c.ID] = c
		c = MessageContent{}
		return nil
	})
	return out, err
}

// rescueSQL gives expired leases back. Rows locked right now are skipped:
// whoever holds them is changing them, and the next run sees the result.
//
// $1 now or NULL, $2 the payload of the canceled events.
const rescueSQL = `
WITH expired AS (
    SELECT id FROM recipients
    WHERE status = 'sending' AND lease_until < coalesce($1::timestamptz, now())
    FOR NO KEY UPDATE SKIP LOCKED
), upd AS (
    UPDATE recipients r
    SET status = CASE WHEN r.cancel_requested_at IS NULL THEN 'queued' ELSE 'canceled' END,
        next_attempt_at = CASE WHEN r.cancel_requested_at IS NULL THEN r.next_attempt_at END,
        lease_owner = NULL,
        lease_until = NULL,
        updated_at = now()
    FROM expired e
    WHERE r.id = e.id
    RETURNING r.id, r.message_id, r.status
), new_events AS (
    SELECT (SELECT m.project_id FROM messages m WHERE m.id = upd.message_id) AS project_id,
        message_id, id AS recipient_id, status AS type, $2::jsonb AS details
    FROM upd WHERE status = 'canceled'
), ` + writeEventsCTE + `
SELECT message_id, count(*), count(*) FILTER (WHERE status = 'canceled') FROM upd GROUP BY message_id`

// Rescued is what RescueExpiredLeases gave back.
type Rescued struct {
	// Recipients is how many leases it gave back.
	Recipients int
	// Canceled is how many of those recipients it ended canceled, a cancel
	// having been requested while they were leased: nothing else counts
	// them as ended.
	Canceled int
}

// RescueExpiredLeases returns recipients whose lease ran out before now
// (zero means the database's clock) to queued, or to canceled when a cancel
// was requested meanwhile, and reports how many it returned. Their attempt
// count is left alone: whether the lost worker got as far as an attempt is
// unknown.
func (d *DB) RescueExpiredLeases(ctx context.Context, now time.Time) (Rescued, error) {
	canceled, err := encodePayload(EventPayload{})
	if err != nil {
		return Rescued{}, fmt.Errorf("rescue expired leases: %w", err)
	}
	var res Rescued
	// Which messages the rescue touched is known only from its result, so
	// the status recomputation takes a second round trip, in the same
	// transaction.
	err = d.atomic(ctx, func(tx *DB) error {
		res = Rescued{}
		rows, _ := tx.pool.Query(ctx, rescueSQL, nowParam(now), canceled)
		var ids []uuid.UUID
		var id uuid.UUID
		var n, c int
		_, err := pgx.ForEachRow(rows, []any{&id, &n, &c}, func() error {
			ids = append(ids, id)
			res.Recipients += n
			res.Canceled += c
			return nil
		})
		if err != nil || len(ids) == 0 {
			return err
		}
		return tx.sendChange(ctx, &pgx.Batch{}, messagesWithIDs(ids), nil)
	})
	if err != nil {
		return Rescued{}, fmt.Errorf("rescue expired leases: %w", mapError(err))
	}
	return res, nil
}

const loadMessageContentsSQL = `
SELECT id, envelope_from, raw FROM messages WHERE id = ANY($1::uuid[])`

// LoadMessageContents returns the envelope sender and raw bytes of the
// messages with the given ids. Ids that do not exist are left out of the map.
func (d *DB) LoadMessageContents(ctx context.Context, ids []uuid.UUID) (map[uuid.UUID]MessageContent, error) {
	if len(ids) == 0 {
		return map[uuid.UUID]MessageContent{}, nil
	}
	out, err := collectContents(d.pool.Query(ctx, loadMessageContentsSQL, ids))
	if err != nil {
		return nil, fmt.Errorf("load message contents: %w", mapError(err))
	}
	return out, nil
}

// lockRecipientsSQL locks recipient rows in id order, so transactions that
// lock several of them never wait on each other in a circle.
//
// $1 recipient ids.
const lockRecipientsSQL = `
SELECT id FROM recipients
WHERE id = ANY($1::uuid[])
ORDER BY id
FOR NO KEY UPDATE`

// recordOutcomesSQL applies a batch of outcomes in one statement. A row is
// applied only while it is still sending under the lease it was claimed
// with; anything else (rescued, re-claimed), and its attempt rows and event,
// are skipped.
//
// The outcomes, one element per recipient in each @outcome_ array (see
// outcomeColumns); the attempt rows, any number per recipient, one element
// per row in each @attempt_ array (see attemptRowColumns). An applied row's
// event is of its new status, with the outcome's payload; a canceled one
// says nothing of a retry that will not happen.
//
// recordOutcomesSuppressingSQL is the same statement with the suppression
// part (suppressCTE) added; RecordOutcomes sends it only for a batch that
// holds an outcome that suppresses, so deliveries never pay for it.
const (
	recordOutcomesHead = `
WITH input AS (
    SELECT * FROM unnest(
        @outcome_ids::uuid[], @outcome_owners::text[], @outcome_statuses::text[],
        @outcome_next_attempt_at::timestamptz[], @outcome_codes::integer[],
        @outcome_enhanced_codes::text[], @outcome_texts::text[], @outcome_ambiguous::boolean[],
        @outcome_events::jsonb[]
    ) AS i(id, owner, outcome, next_attempt_at, code, enhanced_code, text, ambiguous, event)
), upd AS (
    UPDATE recipients r
    SET status = CASE
            WHEN r.cancel_requested_at IS NOT NULL AND i.outcome IN ('deferred', 'failed') THEN 'canceled'
            ELSE i.outcome
        END,
        attempts = r.attempts + 1,
        ambiguous_attempts = r.ambiguous_attempts + CASE WHEN i.ambiguous THEN 1 ELSE 0 END,
        next_attempt_at = CASE
            WHEN i.outcome = 'deferred' AND r.cancel_requested_at IS NULL THEN i.next_attempt_at
        END,
        lease_owner = NULL,
        lease_until = NULL,
        last_code = i.code,
        last_enhanced_code = i.enhanced_code,
        last_text = i.text,
        delivered_at = CASE WHEN i.outcome = 'delivered' THEN now() ELSE r.delivered_at END,
        updated_at = now()
    FROM input i
    -- The redundant r.id = ANY(...) gives the planner the primary key to
    -- look the rows up by; joined to the unnest alone it guessed its size
    -- and could walk every sending row of the lease owner instead.
    WHERE r.id = ANY(@outcome_ids::uuid[])
      AND r.id = i.id AND r.lease_owner = i.owner AND r.status = 'sending'
    RETURNING r.id, r.message_id, r.address, r.status
), att AS (
    INSERT INTO attempts (id, recipient_id, message_id, started_at, duration, mx_host, ip, tls,
        tls_version, code, enhanced_code, text, outcome, source,
        tls_cipher, tls_verified, tls_policy, tls_policy_failure)
    SELECT a.id, u.id, u.message_id, a.started_at, a.duration_us * interval '1 microsecond',
        a.mx_host, a.ip, a.tls, a.tls_version, a.code, a.enhanced_code, a.text, a.outcome, a.source,
        a.tls_cipher, a.tls_verified, a.tls_policy, a.tls_policy_failure
    FROM unnest(
        @attempt_ids::uuid[], @attempt_recipient_ids::uuid[], @attempt_outcomes::text[],
        @attempt_started_at::timestamptz[], @attempt_durations_us::bigint[], @attempt_mx_hosts::text[],
        @attempt_ips::text[], @attempt_tls::boolean[], @attempt_tls_versions::text[],
        @attempt_codes::integer[], @attempt_enhanced_codes::text[], @attempt_texts::text[],
        @attempt_sources::text[],
        @attempt_tls_ciphers::text[], @attempt_tls_verified::boolean[], @attempt_tls_policies::text[],
        @attempt_tls_policy_failures::text[]
    ) AS a(id, recipient_id, outcome, started_at, duration_us, mx_host, ip, tls, tls_version,
           code, enhanced_code, text, source,
           tls_cipher, tls_verified, tls_policy, tls_policy_failure)
    JOIN upd u ON u.id = a.recipient_id
), `

	// suppressCTE adds the addresses of the applied bounced rows named in
	// the @supp_ arrays (see suppressColumns) to their projects'
	// suppression lists. Only rows that passed the fence and ended bounced
	// count (a cancel does not undo a bounce, see upd). One entry per
	// address: two outcomes of one batch to the same address (two messages)
	// would otherwise make ON CONFLICT meet its own row twice. An entry that
	// exists stays as it is, its first reason kept, unless it expired; an
	// expired one is renewed. supp returns the recipients whose entry was
	// added or renewed: they get a suppressed event.
	suppressCTE = `supp_input AS (
    SELECT * FROM unnest(@supp_recipient_ids::uuid[], @supp_ids::uuid[], @supp_reasons::text[],
        @supp_events::jsonb[]) AS s(recipient_id, id, reason, event)
), supp_rows AS (
    SELECT DISTINCT ON (m.project_id, lower(u.address))
        si.id, m.project_id, lower(u.address) AS address, si.reason, u.message_id,
        u.id AS recipient_id, i.code, i.enhanced_code, i.text, si.event
    FROM supp_input si
    JOIN upd u ON u.id = si.recipient_id AND u.status = 'bounced'
    JOIN input i ON i.id = u.id
    JOIN messages m ON m.id = u.message_id
    ORDER BY m.project_id, lower(u.address), u.id
), supp AS (
    ` + insertSuppressionsSQL + `
), `

	outcomeEventsSQL = `
    SELECT (SELECT m.project_id FROM messages m WHERE m.id = u.message_id) AS project_id,
        u.message_id, u.id AS recipient_id, u.status AS type,
        CASE WHEN u.status = 'canceled' THEN i.event - 'next_attempt_at' ELSE i.event END AS details
    FROM upd u JOIN input i ON i.id = u.id`

	// An outcome whose attempt rows are already stored was written by an
	// earlier call whose commit succeeded but whose answer was lost (the
	// connection or the server went down at the commit): it counts as
	// applied, not as fenced off. Attempt ids are chosen by the caller and
	// kept across its retries.
	//
	// Such an earlier outcome is returned with the status that call stored
	// where that status can still be told (see Applied.Status): the caller
	// never had the earlier answer, so it has not counted the recipient yet.
	// Only deferred and failed outcomes may have become canceled (see upd);
	// a canceled row never changes again, and a failed one only to bounced,
	// by a late report. A deferred outcome whose row is canceled now is the
	// one case left unknown: it was canceled by that call or since, by a
	// cancel (which counts it) or by a later attempt.
	recordOutcomesTail = `,
prior AS (
    SELECT DISTINCT recipient_id AS id FROM attempts WHERE id = ANY(@attempt_ids::uuid[])
)
SELECT id, status, false FROM upd
UNION ALL
SELECT p.id,
    CASE
        WHEN i.outcome IN ('delivered', 'bounced') THEN i.outcome
        WHEN r.status IS NULL THEN ''
        WHEN i.outcome = 'failed' AND r.status = 'canceled' THEN 'canceled'
        WHEN i.outcome = 'failed' THEN 'failed'
        WHEN r.status = 'canceled' THEN ''
        ELSE 'deferred'
    END,
    true
FROM prior p
JOIN input i ON i.id = p.id
LEFT JOIN recipients r ON r.id = p.id
WHERE p.id NOT IN (SELECT id FROM upd)`

	recordOutcomesSQL = recordOutcomesHead + `new_events AS (` + outcomeEventsSQL + `
), ` + writeEventsCTE + recordOutcomesTail

	recordOutcomesSuppressingSQL = recordOutcomesHead + suppressCTE + `new_events AS (` + outcomeEventsSQL + `
    UNION ALL
    ` + suppressedEventsSQL + `
), ` + writeEventsCTE + recordOutcomesTail
)

func validateOutcome(o Outcome) error {
	switch {
	case o.RecipientID == uuid.Nil:
		return errors.New("RecipientID is required")
	case o.LeaseOwner == "":
		return errors.New("LeaseOwner is required")
	}
	switch o.Status {
	case StatusDelivered, StatusBounced, StatusFailed:
	case StatusDeferred:
		if o.NextAttemptAt.IsZero() {
			return errors.New("NextAttemptAt is required for a deferred outcome")
		}
	default:
		return fmt.Errorf("Status %q is not delivered, deferred, bounced or failed", o.Status)
	}
	for i, a := range o.Attempts {
		switch {
		case a.StartedAt.IsZero():
			return fmt.Errorf("Attempts[%d].StartedAt is required", i)
		case a.Duration < 0:
			return fmt.Errorf("Attempts[%d].Duration must not be negative", i)
		case a.Source != "" && a.Source != AttemptSourceRemote && a.Source != AttemptSourceLocal:
			return fmt.Errorf("Attempts[%d].Source %q is not remote or local", i, a.Source)
		}
	}
	return nil
}

// outcomeColumns are the outcomes of a RecordOutcomes call as the
// @outcome_ arrays of recordOutcomesSQL: one element per recipient.
type outcomeColumns struct {
	ids          []uuid.UUID
	owners       []string
	statuses     []string
	nextAttempts []pgtype.Timestamptz
	codes        []int32
	enhanced     []string
	texts        []string
	ambiguous    []bool
	events       []string
}

func newOutcomeColumns(n int) outcomeColumns {
	return outcomeColumns{
		ids:          make([]uuid.UUID, 0, n),
		owners:       make([]string, 0, n),
		statuses:     make([]string, 0, n),
		nextAttempts: make([]pgtype.Timestamptz, 0, n),
		codes:        make([]int32, 0, n),
		enhanced:     make([]string, 0, n),
		texts:        make([]string, 0, n),
		ambiguous:    make([]bool, 0, n),
		events:       make([]string, 0, n),
	}
}

// add appends o and the payload of the event it writes if it applies.
func (c *outcomeColumns) add(o Outcome) error {
	event, err := encodePayload(outcomePayload(o))
	if err != nil {
		return err
	}
	var next pgtype.Timestamptz
	if o.Status == StatusDeferred {
		next = pgtype.Timestamptz{Time: o.NextAttemptAt, Valid: true}
	}
	c.ids = append(c.ids, o.RecipientID)
	c.owners = append(c.owners, o.LeaseOwner)
	c.statuses = append(c.statuses, o.Status)
	c.nextAttempts = append(c.nextAttempts, next)
	c.codes = append(c.codes, int32(o.Code))
	c.enhanced = append(c.enhanced, o.EnhancedCode)
	c.texts = append(c.texts, o.Text)
	c.ambiguous = append(c.ambiguous, o.Ambiguous)
	c.events = append(c.events, event)
	return nil
}

func (c *outcomeColumns) addArgs(args pgx.NamedArgs) {
	args["outcome_ids"] = c.ids
	args["outcome_owners"] = c.owners
	args["outcome_statuses"] = c.statuses
	args["outcome_next_attempt_at"] = c.nextAttempts
	args["outcome_codes"] = c.codes
	args["outcome_enhanced_codes"] = c.enhanced
	args["outcome_texts"] = c.texts
	args["outcome_ambiguous"] = c.ambiguous
	args["outcome_events"] = c.events
}

// attemptRowColumns are the attempt rows of a RecordOutcomes call as the
// @attempt_ arrays of recordOutcomesSQL: one element per row.
type attemptRowColumns struct {
	ids          []uuid.UUID
	recipientIDs []uuid.UUID
	outcomes     []string
	startedAt    []time.Time
	durations    []int64
	mxHosts      []string
	ips          []string
	tls          []bool
	tlsVersions  []string
	codes        []int32
	enhanced     []string
	texts        []string
	sources      []string
	// TLS details, migration 00013.
	tlsCiphers        []string
	tlsVerified       []bool
	tlsPolicies       []string
	tlsPolicyFailures []string
}

// add appends the rows of o's attempts: deferred but for the last, which
// gets o.Status.
func (c *attemptRowColumns) add(o Outcome) error {
	for i, a := range o.Attempts {
		id := a.ID
		if id == uuid.Nil {
			var err error
			if id, err = NewAttemptID(); err != nil {
				return err
			}
		}
		outcome := StatusDeferred
		if i == len(o.Attempts)-1 {
			outcome = o.Status
		}
		if a.Ambiguous {
			outcome = AttemptAmbiguous
		}
		source := a.Source
		if source == "" {
			source = AttemptSourceRemote
		}
		c.ids = append(c.ids, id)
		c.recipientIDs = append(c.recipientIDs, o.RecipientID)
		c.outcomes = append(c.outcomes, outcome)
		c.startedAt = append(c.startedAt, a.StartedAt)
		c.durations = append(c.durations, a.Duration.Microseconds())
		c.mxHosts = append(c.mxHosts, a.MXHost)
		c.ips = append(c.ips, a.IP)
		c.tls = append(c.tls, a.TLS)
		c.tlsVersions = append(c.tlsVersions, a.TLSVersion)
		c.codes = append(c.codes, int32(a.Code))
		c.enhanced = append(c.enhanced, a.EnhancedCode)
		c.texts = append(c.texts, a.Text)
		c.sources = append(c.sources, source)
		c.tlsCiphers = append(c.tlsCiphers, a.TLSCipher)
		c.tlsVerified = append(c.tlsVerified, a.TLSVerified)
		c.tlsPolicies = append(c.tlsPolicies, a.TLSPolicy)
		c.tlsPolicyFailures = append(c.tlsPolicyFailures, a.TLSPolicyFailure)
	}
	return nil
}

// suppressColumns are the outcomes of a RecordOutcomes call that suppress
// their address, as the @supp_ arrays of recordOutcomesSuppressingSQL.
type suppressColumns struct {
	recipientIDs []uuid.UUID
	ids          []uuid.UUID
	reasons      []string
	events       []string
}

// add appends o when it is a bounce that suppresses.
func (c *suppressColumns) add(o Outcome) error {
	if o.Suppress == "" || o.Status != StatusBounced {
		return nil
	}
	id, err := uuid.NewV7()
	if err != nil {
		return fmt.Errorf("suppression id: %w", err)
	}
	event, err := encodePayload(suppressedPayload(o.Suppress, o.Class, o.Permanent, o.Code, o.EnhancedCode, o.Text))
	if err != nil {
		return err
	}
	c.recipientIDs = append(c.recipientIDs, o.RecipientID)
	c.ids = append(c.ids, id)
	c.reasons = append(c.reasons, string(o.Suppress))
	c.events = append(c.events, event)
	return nil
}

func (c *suppressColumns) addArgs(args pgx.NamedArgs) {
	args["supp_recipient_ids"] = c.recipientIDs
	args["supp_ids"] = c.ids
	args["supp_reasons"] = c.reasons
	args["supp_events"] = c.events
}

func (c *attemptRowColumns) addArgs(args pgx.NamedArgs) {
	args["attempt_ids"] = c.ids
	args["attempt_recipient_ids"] = c.recipientIDs
	args["attempt_outcomes"] = c.outcomes
	args["attempt_started_at"] = c.startedAt
	args["attempt_durations_us"] = c.durations
	args["attempt_mx_hosts"] = c.mxHosts
	args["attempt_ips"] = c.ips
	args["attempt_tls"] = c.tls
	args["attempt_tls_versions"] = c.tlsVersions
	args["attempt_codes"] = c.codes
	args["attempt_enhanced_codes"] = c.enhanced
	args["attempt_texts"] = c.texts
	args["attempt_sources"] = c.sources
	args["attempt_tls_ciphers"] = c.tlsCiphers
	args["attempt_tls_verified"] = c.tlsVerified
	args["attempt_tls_policies"] = c.tlsPolicies
	args["attempt_tls_policy_failures"] = c.tlsPolicyFailures
}

// Applied is a recipient whose outcome RecordOutcomes found applied.
type Applied struct {
	RecipientID uuid.UUID
	// Status is what the outcome made of the recipient: the outcome's
	// status, or canceled when a cancel requested while the recipient was
	// being sent turned a deferred or failed outcome into its end. A metric
	// of final statuses counts this, not the outcome's status.
	//
	// For an outcome applied by an earlier call (Earlier), Status is the
	// status that call stored, so that the caller, which never had that
	// call's answer, counts the recipient now and once. It is empty when
	// that status can no longer be told: a deferred outcome whose
	// recipient is canceled now, by that call or by something since that
	// counted it itself. Such a recipient is better left uncounted than
	// counted twice.
	Status string
	// Earlier reports an outcome applied by an earlier call whose commit
	// succeeded but whose answer was lost: its attempt rows were found
	// stored (see NewAttempt.ID).
	Earlier bool
}

// Final reports whether a's status ends its recipient.
func (a Applied) Final() bool {
	return a.Status != "" && a.Status != StatusDeferred
}

// RecordOutcomes applies delivery outcomes in one transaction and returns
// the recipients it applied, with the status each was stored with.
//
// Each row is fenced on its lease: it is applied only while it is still
// sending and leased to o.LeaseOwner; rows that were rescued or claimed by
// someone else since are skipped, attempt rows and all. An applied row
// counts one more attempt, keeps the reply, clears its lease, gets one
// attempt row per host in o.Attempts and an event of its new status. A row
// whose message was canceled while it was in flight ends canceled unless it
// was delivered or bounced. An applied bounce with o.Suppress set adds its
// address to the project's suppression list, and a suppressed event when the
// entry is new, in the same statement. Finally the status of the affected
// messages is brought up to date.
func (d *DB) RecordOutcomes(ctx context.Context, outcomes []Outcome) ([]Applied, error) {
	if len(outcomes) == 0 {
		return nil, nil
	}
	var (
		rows     = newOutcomeColumns(len(outcomes))
		attempts attemptRowColumns
		supp     suppressColumns
		seen     = make(map[uuid.UUID]struct{}, len(outcomes))
	)
	for i, o := range outcomes {
		if err := validateOutcome(o); err != nil {
			return nil, fmt.Errorf("record outcomes: outcomes[%d]: %w", i, err)
		}
		if _, dup := seen[o.RecipientID]; dup {
			return nil, fmt.Errorf("record outcomes: outcomes[%d]: recipient %s appears twice", i, o.RecipientID)
		}
		seen[o.RecipientID] = struct{}{}
		if err := rows.add(o); err != nil {
			return nil, fmt.Errorf("record outcomes: %w", err)
		}
		if err := attempts.add(o); err != nil {
			return nil, fmt.Errorf("record outcomes: %w", err)
		}
		if err := supp.add(o); err != nil {
			return nil, fmt.Errorf("record outcomes: %w", err)
		}
	}
	args := pgx.NamedArgs{}
	rows.addArgs(args)
	attempts.addArgs(args)
	query := recordOutcomesSQL
	if len(supp.ids) > 0 {
		query = recordOutcomesSuppressingSQL
		supp.addArgs(args)
	}

	b := &pgx.Batch{}
	b.Queue(lockRecipientsSQL, rows.ids)
	b.Queue(query, args)
	var applied []Applied
	err := d.sendChange(ctx, b, messagesOfRecipientIDs(rows.ids), func(br pgx.BatchResults) error {
		if _, err := br.Exec(); err != nil {
			return err
		}
		r, _ := br.Query()
		var err error
		applied, err = pgx.CollectRows(r, func(row pgx.CollectableRow) (Applied, error) {
			var a Applied
			err := row.Scan(&a.RecipientID, &a.Status, &a.Earlier)
			return a, err
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("record outcomes: %w", mapError(err))
	}
	return applied, nil
}

// releaseSQL gives leases back without counting an attempt.
//
// $1 owner, $2 recipient ids, $3 the payload of the canceled events, $4
// the earliest time they are due again, or NULL for when they were due.
const releaseSQL = `
WITH upd AS (
    UPDATE recipients r
    SET status = CASE WHEN r.cancel_requested_at IS NULL THEN 'queued' ELSE 'canceled' END,
        next_attempt_at = CASE WHEN r.cancel_requested_at IS NULL
            THEN greatest(r.next_attempt_at, $4::timestamptz) END,
        lease_owner = NULL,
        lease_until = NULL,
        updated_at = now()
    WHERE r.id = ANY($2::uuid[]) AND r.lease_owner = $1 AND r.status = 'sending'
    RETURNING r.id, r.message_id, r.status
), new_events AS (
    SELECT (SELECT m.project_id FROM messages m WHERE m.id = upd.message_id) AS project_id,
        message_id, id AS recipient_id, status AS type, $3::jsonb AS details
    FROM upd WHERE status = 'canceled'
), ` + writeEventsCTE + `
SELECT count(*) FROM upd WHERE status = 'canceled'`

// ReleaseLeases gives back the leases owner holds on the given recipients
// without an attempt, as on shutdown: they become queued again (canceled if
// a cancel was requested), due as before, their attempt count unchanged.
// Rows no longer leased to owner are left alone. It returns how many
// recipients it ended canceled: nothing else counts them as ended.
func (d *DB) ReleaseLeases(ctx context.Context, owner string, ids []uuid.UUID) (canceled int, err error) {
	return d.ReleaseLeasesUntil(ctx, owner, ids, time.Time{})
}

// ReleaseLeasesUntil is ReleaseLeases for recipients that must wait: they
// are due no earlier than until (the zero time keeps when they were due).
// Delivery uses it for recipients a provider's limits held back, which
// were not attempted.
func (d *DB) ReleaseLeasesUntil(ctx context.Context, owner string, ids []uuid.UUID, until time.Time) (canceled int, err error) {
	if len(ids) == 0 {
		return 0, nil
	}
	if owner == "" {
		return 0, errors.New("release leases: owner is required")
	}
	payload, err := encodePayload(EventPayload{})
	if err != nil {
		return 0, fmt.Errorf("release leases of %s: %w", owner, err)
	}
	b := &pgx.Batch{}
	b.Queue(lockRecipientsSQL, ids)
	b.Queue(releaseSQL, owner, ids, payload, nowParam(until))
	err = d.sendChange(ctx, b, messagesOfRecipientIDs(ids), func(br pgx.BatchResults) error {
		if _, err := br.Exec(); err != nil {
			return err
		}
		return br.QueryRow().Scan(&canceled)
	})
	if err != nil {
		return 0, fmt.Errorf("release leases of %s: %w", owner, mapError(err))
	}
	return canceled, nil
}
