package db

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// InsertOutcome is what InsertMessages did with one message.
type InsertOutcome struct {
	// Result is set when Err is nil: stored, or replayed.
	Result InsertResult
	// Err is this message's own failure: an invalid NewMessage or
	// ErrIdempotencyConflict. Nothing of this message was written.
	Err error
}

// InsertMessages stores several messages in one transaction, each with its
// recipients (queued, or scheduled when SendAt is in the future) and its
// "accepted" event ("scheduled" too when scheduled), with one multi-row
// statement for all of them. It is the intake's group commit: many callers'
// messages share one commit.
//
// One message's problem does not fail the others: an invalid NewMessage or
// an idempotency conflict is reported in that message's InsertOutcome and
// the rest are stored. The error return is for the group: when it is not
// nil, nothing was stored.
//
// With Idempotency set, the key is taken before the message is written. A
// key that is already held and has not expired writes nothing: the same
// request hash replays the holder's response, a different one is
// ErrIdempotencyConflict. An expired key is taken over. Two messages of the
// call with the same key behave as if they came one after the other: the
// first takes the key, the second replays or conflicts with it. Callers
// racing with one key in different transactions wait for each other, and
// exactly one of them stores a message.
//
// The stored status is set by the insert itself: every recipient of a new
// message starts in the same state, so the status the recomputation of
// sendChange would derive is known, and no other transaction can change the
// recipients before this one commits.
func (d *DB) InsertMessages(ctx context.Context, msgs []NewMessage) ([]InsertOutcome, error) {
	out := make([]InsertOutcome, len(msgs))
	var (
		valid []int // indexes of msgs that passed validation
		keyed bool
	)
	for i := range msgs {
		if err := msgs[i].validate(); err != nil {
			out[i].Err = fmt.Errorf("insert message: %w", err)
			continue
		}
		valid = append(valid, i)
		keyed = keyed || msgs[i].Idempotency != nil
	}
	if len(valid) == 0 {
		return out, nil
	}
	if !keyed {
		// One statement: on the pool it is its own implicit transaction,
		// one round trip.
		suppressed, err := d.insertMessageRows(ctx, msgs, valid)
		if err != nil {
			return nil, fmt.Errorf("insert %d messages: %w", len(valid), mapError(err))
		}
		setSuppressed(msgs, valid, suppressed, out)
		return out, nil
	}
	err := d.atomic(ctx, func(tx *DB) error {
		winners, err := takeIdempotencyKeys(ctx, tx.tx, msgs, valid, out)
		if err != nil {
			return err
		}
		if len(winners) == 0 {
			return nil
		}
		suppressed, err := tx.insertMessageRows(ctx, msgs, winners)
		if err != nil {
			return err
		}
		setSuppressed(msgs, winners, suppressed, out)
		return amendResponses(ctx, tx.tx, msgs, valid, winners, out)
	})
	if err != nil {
		return nil, fmt.Errorf("insert %d messages: %w", len(valid), mapError(err))
	}
	return out, nil
}

// setSuppressed records in out which recipients of msgs[which] the insert
// stored suppressed.
func setSuppressed(msgs []NewMessage, which []int, suppressed map[uuid.UUID]SuppressionReason, out []InsertOutcome) {
	if len(suppressed) == 0 {
		return
	}
	for _, i := range which {
		for _, r := range msgs[i].Recipients {
			if reason, ok := suppressed[r.ID]; ok {
				out[i].Result.Suppressed = append(out[i].Result.Suppressed, SuppressedRecipient{RecipientID: r.ID, Reason: reason})
			}
		}
	}
}

// amendIdempotencyResponsesSQL replaces the responses kept for keys that
// this transaction took.
const amendIdempotencyResponsesSQL = `
UPDATE idempotency_keys k SET response = u.response
FROM unnest(@project_ids::uuid[], @keys::text[], @responses::bytea[]) AS u(project_id, key, response)
WHERE k.project_id = u.project_id AND k.key = u.key`

// amendResponses rewrites the kept response of every stored message with a
// key whose recipients were partly or wholly suppressed (see
// Idempotency.Amend), and hands the new response to the messages of the
// group that replay the same key. A group without suppressed recipients
// sends nothing.
func amendResponses(ctx context.Context, tx pgx.Tx, msgs []NewMessage, valid, winners []int, out []InsertOutcome) error {
	var (
		projects  []uuid.UUID
		keys      []string
		responses [][]byte
		amended   map[idemKey][]byte
	)
	for _, i := range winners {
		idem := msgs[i].Idempotency
		if idem == nil || idem.Amend == nil || len(out[i].Result.Suppressed) == 0 {
			continue
		}
		resp, err := idem.Amend(out[i].Result.Suppressed)
		if err != nil {
			return fmt.Errorf("amend response of %s: %w", msgs[i].ID, err)
		}
		k := idemKey{projectOrDefault(msgs[i].ProjectID), idem.Key}
		if amended == nil {
			amended = make(map[idemKey][]byte)
		}
		amended[k] = resp
		projects, keys, responses = append(projects, k.project), append(keys, k.key), append(responses, resp)
	}
	if len(amended) == 0 {
		return nil
	}
	if _, err := tx.Exec(ctx, amendIdempotencyResponsesSQL, pgx.NamedArgs{
		"project_ids": projects, "keys": keys, "responses": responses,
	}); err != nil {
		return fmt.Errorf("amend idempotency responses: %w", err)
	}
	for _, i := range valid {
		if idem := msgs[i].Idempotency; idem != nil && out[i].Result.Replayed {
			if resp, ok := amended[idemKey{projectOrDefault(msgs[i].ProjectID), idem.Key}]; ok {
				out[i].Result.Response = resp
			}
		}
	}
	return nil
}

// idemKey is an idempotency key in its project.
type idemKey struct {
	project uuid.UUID
	key     string
}

func compareIdemKeys(a, b idemKey) int {
	if c := bytes.Compare(a.project[:], b.project[:]); c != 0 {
		return c
	}
	return cmp.Compare(a.key, b.key)
}

// holder is who holds an idempotency key: the request hash and response
// that a later use of the key is compared with and replays.
type holder struct {
	hash, response []byte
}

// takeIdempotencyKeysSQL takes keys for messages, in the order given: the
// caller sorts them, so that two transactions taking overlapping keys lock
// them in one order and cannot deadlock. A row that meets an uncommitted
// row with the same key waits for its transaction. RETURNING names the keys
// taken; the others are held by someone else.
const takeIdempotencyKeysSQL = `
INSERT INTO idempotency_keys AS k (project_id, key, request_hash, message_id, response, expires_at)
SELECT u.project_id, u.key, u.request_hash, u.message_id, u.response,
    now() + u.ttl * interval '1 microsecond'
FROM unnest(@project_ids::uuid[], @keys::text[], @request_hashes::bytea[], @message_ids::uuid[],
    @responses::bytea[], @ttls::bigint[]) AS u(project_id, key, request_hash, message_id, response, ttl)
ON CONFLICT (project_id, key) DO UPDATE
SET request_hash = excluded.request_hash,
    message_id = excluded.message_id,
    response = excluded.response,
    created_at = now(),
    expires_at = excluded.expires_at
WHERE k.expires_at <= now()
RETURNING k.project_id, k.key`

// getIdempotencyKeysSQL reads the holders of keys.
const getIdempotencyKeysSQL = `
SELECT k.project_id, k.key, k.request_hash, k.response
FROM idempotency_keys k
JOIN unnest(@project_ids::uuid[], @keys::text[]) AS u(project_id, key)
    ON k.project_id = u.project_id AND k.key = u.key`

// takeIdempotencyKeys takes the keys of the keyed messages among valid,
// records replays and conflicts in out, and returns the messages to write:
// those without a key and those that took theirs, in their order in msgs.
func takeIdempotencyKeys(ctx context.Context, tx pgx.Tx, msgs []NewMessage, valid []int, out []InsertOutcome) ([]int, error) {
	// The first message with a key claims it in the database; later ones
	// with the same key are settled against whoever holds it then.
	first := map[idemKey]int{}
	var claims []idemKey
	for _, i := range valid {
		if msgs[i].Idempotency == nil {
			continue
		}
		k := idemKey{projectOrDefault(msgs[i].ProjectID), msgs[i].Idempotency.Key}
		if _, seen := first[k]; !seen {
			first[k] = i
			claims = append(claims, k)
		}
	}
	slices.SortFunc(claims, compareIdemKeys)

	holders := map[idemKey]holder{}
	taken := map[idemKey]bool{}
	pending := claims
	// A holder can expire and be deleted between taking and reading; its
	// key is free then and is tried again.
	for attempt := 0; len(pending) > 0; attempt++ {
		if attempt == 3 {
			return nil, errors.New("take idempotency keys: keys kept changing hands")
		}
		got, err := claimKeys(ctx, tx, msgs, first, pending)
		if err != nil {
			return nil, err
		}
		var missing []idemKey
		for _, k := range pending {
			if got[k] {
				taken[k] = true
				idem := msgs[first[k]].Idempotency
				holders[k] = holder{hash: idem.RequestHash, response: idem.Response}
			} else {
				missing = append(missing, k)
			}
		}
		if len(missing) == 0 {
			break
		}
		found, err := readKeys(ctx, tx, missing)
		if err != nil {
			return nil, err
		}
		pending = pending[:0:0]
		for _, k := range missing {
			if h, ok := found[k]; ok {
				holders[k] = h
			} else {
				pending = append(pending, k)
			}
		}
	}

	var winners []int
	for _, i := range valid {
		idem := msgs[i].Idempotency
		if idem == nil {
			winners = append(winners, i)
			continue
		}
		k := idemKey{projectOrDefault(msgs[i].ProjectID), idem.Key}
		if taken[k] && first[k] == i {
			winners = append(winners, i)
			continue
		}
		h := holders[k]
		if !bytes.Equal(h.hash, idem.RequestHash) {
			out[i].Err = fmt.Errorf("insert message %s: %w", msgs[i].ID, ErrIdempotencyConflict)
			continue
		}
		out[i].Result = InsertResult{Replayed: true, Response: h.response}
	}
	return winners, nil
}

// claimKeys runs takeIdempotencyKeysSQL for keys and returns the ones taken.
func claimKeys(ctx context.Context, tx pgx.Tx, msgs []NewMessage, first map[idemKey]int, keys []idemKey) (map[idemKey]bool, error) {
	n := len(keys)
	projects := make([]uuid.UUID, n)
	names := make([]string, n)
	hashes := make([][]byte, n)
	ids := make([]uuid.UUID, n)
	responses := make([][]byte, n)
	ttls := make([]int64, n)
	for j, k := range keys {
		m := msgs[first[k]]
		ttl := m.Idempotency.TTL
		if ttl == 0 {
			ttl = DefaultIdempotencyTTL
		}
		projects[j], names[j] = k.project, k.key
		hashes[j], ids[j] = nonNilBytes(m.Idempotency.RequestHash), m.ID
		responses[j], ttls[j] = m.Idempotency.Response, ttl.Microseconds()
	}
	rows, _ := tx.Query(ctx, takeIdempotencyKeysSQL, pgx.NamedArgs{
		"project_ids": projects, "keys": names, "request_hashes": hashes,
		"message_ids": ids, "responses": responses, "ttls": ttls,
	})
	got := make(map[idemKey]bool, n)
	var k idemKey
	_, err := pgx.ForEachRow(rows, []any{&k.project, &k.key}, func() error {
		got[k] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("take idempotency keys: %w", err)
	}
	return got, nil
}

// readKeys returns the holders of keys that exist.
func readKeys(ctx context.Context, tx pgx.Tx, keys []idemKey) (map[idemKey]holder, error) {
	projects := make([]uuid.UUID, len(keys))
	names := make([]string, len(keys))
	for j, k := range keys {
		projects[j], names[j] = k.project, k.key
	}
	rows, _ := tx.Query(ctx, getIdempotencyKeysSQL, pgx.NamedArgs{"project_ids": projects, "keys": names})
	found := make(map[idemKey]holder, len(keys))
	var (
		k idemKey
		h holder
	)
	_, err := pgx.ForEachRow(rows, []any{&k.project, &k.key, &h.hash, &h.response}, func() error {
		found[k] = h
		h = holder{}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read idempotency keys: %w", err)
	}
	return found, nil
}

// insertMessagesSQL stores messages, their recipients and their events in
// one statement: one row per element of the message arrays, one recipient
// per element of the recipient arrays (rcpt_message_ids says whose). Tags
// come as one JSON array per message, because SQL arrays must be
// rectangular; metadata and event payloads as JSON text.
//
// Each recipient is looked up on its project's suppression list on the way
// in (v): its address, and its domain for a domain-wide entry, both in the
// lower case entries are stored in (SuppressionAddress), one probe of the
// unique key's index each, skipping expired entries. An address's own entry
// wins over its domain's. A recipient that matches is stored suppressed,
// with the entry's reason and a suppressed event, and is never claimed; a
// message whose recipients all match is stored failed, the status the
// derivation gives it (status.go). The statement returns the suppressed
// recipients and why; a group without any returns no rows.
//
// The suppressed events' payloads, one per reason, come in as parameters
// (supp_reasons, supp_payloads) like every other payload.
const insertMessagesSQL = `
WITH u AS (
    SELECT * FROM unnest(@ids::uuid[], @project_ids::uuid[], @api_key_ids::uuid[],
        @message_id_headers::text[], @envelope_froms::text[], @from_headers::text[], @subjects::text[],
        @raws::bytea[], @tags::text[], @metadata::text[], @send_ats::timestamptz[], @nows::timestamptz[],
        @accepted::text[], @scheduled::text[])
        AS u(id, project_id, api_key_id, message_id_header, envelope_from, from_header, subject,
            raw, tags, metadata, send_at, now, accepted, scheduled)
), v AS (
    SELECT v.id, v.message_id, v.position, v.address, v.domain, v.kind, v.ord, s.reason AS suppressed
    FROM unnest(@rcpt_ids::uuid[], @rcpt_message_ids::uuid[], @rcpt_positions::int[],
        @rcpt_addresses::text[], @rcpt_domains::text[], @rcpt_kinds::text[])
        WITH ORDINALITY AS v(id, message_id, position, address, domain, kind, ord)
    JOIN u ON u.id = v.message_id
    LEFT JOIN LATERAL (
        SELECT s.reason FROM suppressions s
        WHERE s.project_id = u.project_id
          AND s.address IN (lower(v.address), lower(v.domain))
          AND s.domain_wide = (s.address = lower(v.domain))
          AND (s.expires_at IS NULL OR s.expires_at > now())
        ORDER BY s.domain_wide
        LIMIT 1
    ) s ON true
), c AS (
    SELECT v.message_id, bool_and(v.suppressed IS NOT NULL) AS all_suppressed
    FROM v GROUP BY v.message_id
), m AS (
    INSERT INTO messages (id, project_id, api_key_id, status, message_id_header, envelope_from, from_header,
        subject, raw, size_bytes, tags, metadata, send_at)
    SELECT u.id, u.project_id, u.api_key_id,
        CASE
            WHEN c.all_suppressed THEN 'failed'
            WHEN u.send_at > coalesce(u.now, now()) THEN 'scheduled'
            ELSE 'queued'
        END,
        u.message_id_header, u.envelope_from, u.from_header, u.subject, u.raw, octet_length(u.raw),
        ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)), u.metadata::jsonb, u.send_at
    FROM u JOIN c ON c.message_id = u.id
    RETURNING id, project_id, status, send_at
), r AS (
    INSERT INTO recipients (id, message_id, position, address, domain, kind, status, next_attempt_at,
        suppression_reason)
    SELECT v.id, m.id, v.position, v.address, v.domain, v.kind,
        CASE WHEN v.suppressed IS NULL THEN m.status ELSE 'suppressed' END,
        CASE
            WHEN v.suppressed IS NOT NULL THEN NULL
            WHEN m.status = 'scheduled' THEN m.send_at
            ELSE now()
        END,
        v.suppressed
    FROM v JOIN m ON m.id = v.message_id
    -- Rows go in in the caller's order, whatever order the join yields:
    -- recipients due at the same instant are claimed in the order they
    -- were stored, so they reach the MX in the order they were given.
    ORDER BY v.ord
), new_events AS (
    SELECT m.project_id, m.id AS message_id, NULL::uuid AS recipient_id, 'accepted' AS type,
        u.accepted::jsonb AS details
    FROM m JOIN u ON u.id = m.id
    UNION ALL
    SELECT m.project_id, m.id, NULL, 'scheduled', u.scheduled::jsonb
    FROM m JOIN u ON u.id = m.id
    WHERE m.status = 'scheduled'
    UNION ALL
    SELECT m.project_id, m.id, v.id, 'suppressed', sp.payload::jsonb
    FROM v JOIN m ON m.id = v.message_id
    JOIN unnest(@supp_reasons::text[], @supp_payloads::text[]) AS sp(reason, payload) ON sp.reason = v.suppressed
), ` + writeEventsCTE + `
SELECT v.id, v.suppressed FROM v WHERE v.suppressed IS NOT NULL`

// insertMessageRows writes msgs[which] with insertMessagesSQL and returns
// the recipients it stored suppressed, with the reason of the entry that
// matched each; nil when there were none.
func (d *DB) insertMessageRows(ctx context.Context, msgs []NewMessage, which []int) (map[uuid.UUID]SuppressionReason, error) {
	n := len(which)
	var (
		ids        = make([]uuid.UUID, n)
		projects   = make([]uuid.UUID, n)
		apiKeys    = make([]*uuid.UUID, n)
		idHeaders  = make([]string, n)
		envFroms   = make([]string, n)
		fromHdrs   = make([]string, n)
		subjects   = make([]string, n)
		raws       = make([][]byte, n)
		tags       = make([]string, n)
		metadata   = make([]string, n)
		sendAts    = make([]pgtype.Timestamptz, n)
		nows       = make([]pgtype.Timestamptz, n)
		accepted   = make([]string, n)
		scheduled  = make([]string, n)
		recipients int
	)
	for _, i := range which {
		recipients += len(msgs[i].Recipients)
	}
	var (
		rIDs       = make([]uuid.UUID, 0, recipients)
		rMessages  = make([]uuid.UUID, 0, recipients)
		rPositions = make([]int32, 0, recipients)
		rAddrs     = make([]string, 0, recipients)
		rDomains   = make([]string, 0, recipients)
		rKinds     = make([]string, 0, recipients)
	)
	for j, i := range which {
		p := &msgs[i]
		ids[j], projects[j], apiKeys[j] = p.ID, projectOrDefault(p.ProjectID), nullUUID(p.APIKeyID)
		idHeaders[j], envFroms[j], fromHdrs[j], subjects[j] = p.MessageIDHeader, p.EnvelopeFrom, p.FromHeader, p.Subject
		raws[j] = nonNilBytes(p.Raw)
		var err error
		if tags[j], err = jsonText(p.Tags, "[]"); err != nil {
			return nil, fmt.Errorf("encode tags of %s: %w", p.ID, err)
		}
		if metadata[j], err = jsonText(p.Metadata, "{}"); err != nil {
			return nil, fmt.Errorf("encode metadata of %s: %w", p.ID, err)
		}
		var sendAt *time.Time
		if !p.SendAt.IsZero() {
			sendAt = &p.SendAt
		}
		sendAts[j], nows[j] = nowParam(p.SendAt), nowParam(p.Now)
		if accepted[j], err = encodePayload(EventPayload{Recipients: len(p.Recipients)}); err != nil {
			return nil, err
		}
		if scheduled[j], err = encodePayload(EventPayload{SendAt: sendAt}); err != nil {
			return nil, err
		}
		for k, r := range p.Recipients {
			rIDs = append(rIDs, r.ID)
			rMessages = append(rMessages, p.ID)
			rPositions = append(rPositions, int32(k+1))
			rAddrs = append(rAddrs, r.Address)
			rDomains = append(rDomains, r.Domain)
			rKinds = append(rKinds, r.Kind)
		}
	}
	suppReasons, suppPayloads, err := intakeSuppressedPayloads()
	if err != nil {
		return nil, err
	}
	rows, _ := d.pool.Query(ctx, insertMessagesSQL, pgx.NamedArgs{
		"ids": ids, "project_ids": projects, "api_key_ids": apiKeys,
		"message_id_headers": idHeaders, "envelope_froms": envFroms, "from_headers": fromHdrs,
		"subjects": subjects, "raws": raws, "tags": tags, "metadata": metadata,
		"send_ats": sendAts, "nows": nows, "accepted": accepted, "scheduled": scheduled,
		"rcpt_ids": rIDs, "rcpt_message_ids": rMessages, "rcpt_positions": rPositions,
		"rcpt_addresses": rAddrs, "rcpt_domains": rDomains, "rcpt_kinds": rKinds,
		"supp_reasons": suppReasons, "supp_payloads": suppPayloads,
	})
	var (
		suppressed map[uuid.UUID]SuppressionReason
		rid        uuid.UUID
		reason     string
	)
	_, err = pgx.ForEachRow(rows, []any{&rid, &reason}, func() error {
		if suppressed == nil {
			suppressed = make(map[uuid.UUID]SuppressionReason)
		}
		suppressed[rid] = SuppressionReason(reason)
		return nil
	})
	return suppressed, err
}

// intakeSuppressedPayloads returns the payload of the suppressed event the
// intake writes for each suppression reason, as insertMessagesSQL takes
// them.
func intakeSuppressedPayloads() (reasons, payloads []string, err error) {
	for _, r := range []SuppressionReason{SuppressionHardBounce, SuppressionComplaint, SuppressionManual} {
		p, err := encodePayload(EventPayload{Reason: string(r)})
		if err != nil {
			return nil, nil, err
		}
		reasons = append(reasons, string(r))
		payloads = append(payloads, p)
	}
	return reasons, payloads, nil
}

// jsonText encodes v as JSON, or returns empty for a nil or empty v.
func jsonText[T any](v T, empty string) (string, error) {
	switch x := any(v).(type) {
	case []string:
		if len(x) == 0 {
			return empty, nil
		}
	case map[string]string:
		if len(x) == 0 {
			return empty, nil
		}
	}
	b, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	return string(b), nil
}
