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

// This file holds the suppression list's own API: listing, reading, adding
// and deleting entries by hand. Entries added by bounces and complaints are
// written where those are recorded (bounce.go, queue.go); the intake's check
// is part of its insert (intake.go).

// SuppressionKey names one entry of a project's suppression list: an
// address, or with DomainWide a domain whose every address is suppressed.
type SuppressionKey struct {
	// Address is the address, or the domain of a domain-wide entry, as
	// entries are stored: normalized with SuppressionAddress, the domain
	// as an A-label.
	Address    string
	DomainWide bool
}

// suppressionColumns are the columns scanSuppression reads, in its order.
const suppressionColumns = `
s.id, s.project_id, s.address, s.domain_wide, s.reason,
coalesce(s.message_id, '00000000-0000-0000-0000-000000000000'),
coalesce(s.recipient_id, '00000000-0000-0000-0000-000000000000'),
coalesce(s.code, 0), coalesce(s.enhanced_code, ''), coalesce(s.text, ''), s.created_at, s.expires_at`

func scanSuppression(row pgx.CollectableRow) (Suppression, error) {
	var s Suppression
	err := row.Scan(&s.ID, &s.ProjectID, &s.Address, &s.DomainWide, &s.Reason, &s.MessageID, &s.RecipientID,
		&s.Code, &s.EnhancedCode, &s.Text, &s.CreatedAt, &s.ExpiresAt)
	return s, err
}

// Key returns the key of the entry.
func (s Suppression) Key() SuppressionKey {
	return SuppressionKey{Address: s.Address, DomainWide: s.DomainWide}
}

// Active reports whether the entry suppresses at now: it has not expired.
func (s Suppression) Active(now time.Time) bool {
	return s.ExpiresAt == nil || s.ExpiresAt.After(now)
}

const getSuppressionEntrySQL = `SELECT ` + suppressionColumns + `
FROM suppressions s
WHERE s.project_id = $1 AND s.address = $2 AND s.domain_wide = $3`

// GetSuppressionEntry returns the project's entry with the key, expired or
// not, or ErrNotFound (also when only another project has it). An
// address's entry and its domain's are different entries.
func (d *DB) GetSuppressionEntry(ctx context.Context, projectID uuid.UUID, key SuppressionKey) (Suppression, error) {
	rows, _ := d.pool.Query(ctx, getSuppressionEntrySQL, projectOrDefault(projectID), key.Address, key.DomainWide)
	s, err := pgx.CollectExactlyOneRow(rows, scanSuppression)
	if err != nil {
		return Suppression{}, fmt.Errorf("get suppression of %s: %w", key.Address, mapError(err))
	}
	return s, nil
}

// ListSuppressionsParams filters and pages ListSuppressions. Zero fields do
// not filter.
type ListSuppressionsParams struct {
	// ProjectID is the project whose entries are listed. Required.
	ProjectID uuid.UUID
	// Reason keeps entries with this reason.
	Reason SuppressionReason
	// DomainWide, when set, keeps only domain-wide entries (true) or only
	// address entries (false).
	DomainWide *bool
	// AddressPrefix keeps entries whose address (the domain, for a
	// domain-wide entry) starts with it, compared byte by byte; give it
	// normalized as entries are stored.
	AddressPrefix string
	// CreatedAfter keeps entries created (or last renewed) at or after it.
	CreatedAfter *time.Time
	// CreatedBefore keeps entries created before it.
	CreatedBefore *time.Time
	// Limit is the page size. Zero or less means DefaultListLimit.
	Limit int
	// After continues a listing after the entry it points at.
	After *Cursor
}

// The listing is put together from these fragments, as ListMessages is, so
// each combination of filters gets a plan that can use its index.
//
// The prefix is a range in byte order (the operators of text_pattern_ops,
// which the prefix index of migration 00012 serves) rather than LIKE: a
// LIKE pattern that arrives as a parameter cannot use an index in a generic
// plan, a range can. Its upper bound is the prefix followed by U+10FFFF,
// the last code point, so it takes in every address that continues the
// prefix (but one whose next character is U+10FFFF itself, a noncharacter
// no mail address holds).
const (
	listSuppressionsSelect   = `SELECT ` + suppressionColumns + ` FROM suppressions s WHERE s.project_id = @project_id`
	listSuppressionsReason   = ` AND s.reason = @reason`
	listSuppressionsDomain   = ` AND s.domain_wide = @domain_wide`
	listSuppressionsPrefix   = ` AND s.address ~>=~ @prefix AND s.address ~<~ (@prefix || U&'\+10FFFF')`
	listSuppressionsAfter    = ` AND s.created_at >= @created_after`
	listSuppressionsBefore   = ` AND s.created_at < @created_before`
	listSuppressionsCursor   = ` AND (s.created_at, s.id) < (@cursor_created_at::timestamptz, @cursor_id::uuid)`
	listSuppressionsOrdering = ` ORDER BY s.created_at DESC, s.id DESC LIMIT @limit`
)

// ListSuppressions returns the project's entries that pass every filter in
// p, expired ones included, newest first (by created_at, then id). A page
// after p.After starts right behind that entry.
func (d *DB) ListSuppressions(ctx context.Context, p ListSuppressionsParams) ([]Suppression, error) {
	if p.ProjectID == uuid.Nil {
		return nil, errors.New("list suppressions: ProjectID is required")
	}
	limit := p.Limit
	if limit <= 0 {
		limit = DefaultListLimit
	}
	query := listSuppressionsSelect
	args := pgx.NamedArgs{"project_id": p.ProjectID, "limit": limit}
	if p.Reason != "" {
		query += listSuppressionsReason
		args["reason"] = string(p.Reason)
	}
	if p.DomainWide != nil {
		query += listSuppressionsDomain
		args["domain_wide"] = *p.DomainWide
	}
	if p.AddressPrefix != "" {
		query += listSuppressionsPrefix
		args["prefix"] = p.AddressPrefix
	}
	if p.CreatedAfter != nil {
		query += listSuppressionsAfter
		args["created_after"] = *p.CreatedAfter
	}
	if p.CreatedBefore != nil {
		query += listSuppressionsBefore
		args["created_before"] = *p.CreatedBefore
	}
	if p.After != nil {
		query += listSuppressionsCursor
		args["cursor_created_at"] = p.After.CreatedAt
		args["cursor_id"] = p.After.ID
	}
	rows, _ := d.pool.Query(ctx, query+listSuppressionsOrdering, args)
	out, err := pgx.CollectRows(rows, scanSuppression)
	if err != nil {
		return nil, fmt.Errorf("list suppressions: %w", mapError(err))
	}
	return out, nil
}

// NewSuppression is an entry to add by hand.
type NewSuppression struct {
	Key SuppressionKey
	// ExpiresAt ends the entry; nil never does.
	ExpiresAt *time.Time
}

// AddedSuppression is an entry as AddSuppressions left it.
type AddedSuppression struct {
	Suppression
	// Added is set when the call stored the entry (new, or renewing an
	// expired one); unset when an entry in force was kept as it was.
	Added bool
}

// addSuppressionsSQL adds manual entries. An entry in force is kept as it
// is, its first reason and evidence included (a complaint stays a
// complaint); an expired one is renewed as a manual entry, as a bounce
// renews it. The entries kept are read from the statement's snapshot, so
// the answer names every entry of the call but one that a concurrent call
// added first, which the snapshot cannot see.
const addSuppressionsSQL = `
WITH input AS (
    SELECT * FROM unnest(@ids::uuid[], @addresses::text[], @domain_wides::boolean[], @expires_ats::timestamptz[])
        WITH ORDINALITY AS i(id, address, domain_wide, expires_at, ord)
), ins AS (
    INSERT INTO suppressions AS s (id, project_id, address, domain_wide, reason, expires_at)
    SELECT i.id, @project_id, i.address, i.domain_wide, 'manual', i.expires_at
    FROM input i ORDER BY i.ord
    ON CONFLICT (project_id, address, domain_wide) DO UPDATE
    SET reason = excluded.reason, message_id = NULL, recipient_id = NULL, code = NULL,
        enhanced_code = NULL, text = NULL, created_at = now(), expires_at = excluded.expires_at
    WHERE s.expires_at IS NOT NULL AND s.expires_at <= now()
    RETURNING ` + suppressionColumns + `
)
SELECT *, true FROM ins
UNION ALL
SELECT ` + suppressionColumns + `, false
FROM suppressions s JOIN input i ON s.address = i.address AND s.domain_wide = i.domain_wide
WHERE s.project_id = @project_id
  AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.address = s.address AND ins.domain_wide = s.domain_wide)`

// AddSuppressions adds entries to the project's suppression list with the
// reason manual, in one statement: all of them or, on an error, none. An
// entry in force is left as it is; an expired one is renewed. Keys given
// twice count once. It returns the entries as they stand, in no particular
// order.
func (d *DB) AddSuppressions(ctx context.Context, projectID uuid.UUID, entries []NewSuppression) ([]AddedSuppression, error) {
	seen := make(map[SuppressionKey]bool, len(entries))
	var (
		ids      = make([]uuid.UUID, 0, len(entries))
		addrs    = make([]string, 0, len(entries))
		domains  = make([]bool, 0, len(entries))
		expiries = make([]pgtype.Timestamptz, 0, len(entries))
	)
	for i, e := range entries {
		if e.Key.Address == "" || e.Key.Address != SuppressionAddress(e.Key.Address) {
			return nil, fmt.Errorf("add suppressions: entries[%d]: address %q is not normalized", i, e.Key.Address)
		}
		if seen[e.Key] {
			continue
		}
		seen[e.Key] = true
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("add suppressions: new id: %w", err)
		}
		exp := pgtype.Timestamptz{}
		if e.ExpiresAt != nil {
			exp = pgtype.Timestamptz{Time: *e.ExpiresAt, Valid: true}
		}
		ids, addrs, domains, expiries = append(ids, id), append(addrs, e.Key.Address),
			append(domains, e.Key.DomainWide), append(expiries, exp)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	rows, _ := d.pool.Query(ctx, addSuppressionsSQL, pgx.NamedArgs{
		"project_id": projectOrDefault(projectID), "ids": ids, "addresses": addrs,
		"domain_wides": domains, "expires_ats": expiries,
	})
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (AddedSuppression, error) {
		var a AddedSuppression
		s := &a.Suppression
		err := row.Scan(&s.ID, &s.ProjectID, &s.Address, &s.DomainWide, &s.Reason, &s.MessageID, &s.RecipientID,
			&s.Code, &s.EnhancedCode, &s.Text, &s.CreatedAt, &s.ExpiresAt, &a.Added)
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("add %d suppressions: %w", len(ids), mapError(err))
	}
	return out, nil
}

const deleteSuppressionsSQL = `
DELETE FROM suppressions s
USING unnest(@addresses::text[], @domain_wides::boolean[]) AS k(address, domain_wide)
WHERE s.project_id = @project_id AND s.address = k.address AND s.domain_wide = k.domain_wide
RETURNING s.address, s.domain_wide`

// DeleteSuppressions deletes the project's entries with the given keys, in
// one statement, and returns the keys of the entries it deleted; a key
// without an entry (or whose entry is another project's) is left out. The
// next send to a deleted address is not suppressed by it.
func (d *DB) DeleteSuppressions(ctx context.Context, projectID uuid.UUID, keys []SuppressionKey) ([]SuppressionKey, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	addrs := make([]string, len(keys))
	domains := make([]bool, len(keys))
	for i, k := range keys {
		addrs[i], domains[i] = k.Address, k.DomainWide
	}
	rows, _ := d.pool.Query(ctx, deleteSuppressionsSQL, pgx.NamedArgs{
		"project_id": projectOrDefault(projectID), "addresses": addrs, "domain_wides": domains,
	})
	deleted, err := pgx.CollectRows(rows, pgx.RowToStructByPos[SuppressionKey])
	if err != nil {
		return nil, fmt.Errorf("delete %d suppressions: %w", len(keys), mapError(err))
	}
	return deleted, nil
}
