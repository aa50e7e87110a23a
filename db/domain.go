package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// DKIM key states (see migrations/00014_domains.sql).
const (
	// KeyPending was added and its DNS record not seen yet.
	KeyPending = "pending"
	// KeyActive signs the domain's mail.
	KeyActive = "active"
	// KeyRetiring was replaced and stays published until RetireAfter.
	KeyRetiring = "retiring"
	// KeyRetired need not be published any more.
	KeyRetired = "retired"
)

// DKIM key algorithms (RFC 6376 section 3.3, RFC 8463).
const (
	KeyRSA     = "rsa"
	KeyEd25519 = "ed25519"
)

// ErrKeyPending is returned by AddDomainKey when the domain already has a
// key waiting for its DNS record: a second one would leave the user two
// records to publish and no way to tell which one signs next.
var ErrKeyPending = errors.New("the domain already has a new key waiting for its DNS record")

// Domain is a sending domain of a project with its DKIM keys.
type Domain struct {
	ID        uuid.UUID
	ProjectID uuid.UUID
	// Name is the domain in lowercase A-labels.
	Name string
	// VerifiedAt is when a check first found the signing key's record; nil
	// while the domain is not verified.
	VerifiedAt *time.Time
	// LastCheckedAt and LastCheck are the time and the results (JSON, as
	// the service wrote them) of the last check; nil and "{}" before any.
	LastCheckedAt *time.Time
	LastCheck     []byte
	CreatedAt     time.Time
	UpdatedAt     time.Time
	// Keys are the domain's DKIM keys, newest first.
	Keys []DomainKey
}

// ActiveKey returns the key that signs the domain's mail, if any.
func (d Domain) ActiveKey() (DomainKey, bool) {
	for _, k := range d.Keys {
		if k.State == KeyActive {
			return k, true
		}
	}
	return DomainKey{}, false
}

// DomainKey is one DKIM key of a domain. Its private half is only ever
// stored sealed (see internal/keyenc).
type DomainKey struct {
	ID       uuid.UUID
	DomainID uuid.UUID
	Selector string
	// Algorithm is KeyRSA or KeyEd25519.
	Algorithm string
	// PublicKey is the base64 of the DNS record's p= tag.
	PublicKey string
	// PrivateKeyEnc is the sealed private key, opened with the
	// key-encryption key named by KEKID and the key's id as context.
	PrivateKeyEnc []byte
	KEKID         string
	// State is KeyPending, KeyActive, KeyRetiring or KeyRetired.
	State       string
	VerifiedAt  *time.Time
	ActivatedAt *time.Time
	// RetireAfter is when a retiring key becomes retired.
	RetireAfter *time.Time
	CreatedAt   time.Time
}

// NewDomainKey is a key to store. The caller makes the id first, since it
// is the context the private key is sealed under.
type NewDomainKey struct {
	ID            uuid.UUID
	Selector      string
	Algorithm     string
	PublicKey     string
	PrivateKeyEnc []byte
	KEKID         string
}

// NewDomainParams is a domain to add to a project with its first key.
type NewDomainParams struct {
	ProjectID uuid.UUID
	// Name must already be normalized (lowercase A-labels).
	Name string
	Key  NewDomainKey
}

const domainColumns = `d.id, d.project_id, d.name, d.verified_at, d.last_checked_at, d.last_check::text, d.created_at, d.updated_at`

// The keys come along as an array of records, newest first, so a domain is
// read in one statement.
const domainKeysColumn = `
    ARRAY(SELECT ROW(k.id, k.domain_id, k.selector, k.algorithm, k.public_key, k.private_key_enc,
                     k.kek_id, k.state, k.verified_at, k.activated_at, k.retire_after, k.created_at)
          FROM domain_keys k WHERE k.domain_id = d.id ORDER BY k.created_at DESC, k.id DESC)`

const selectDomainSQL = `SELECT ` + domainColumns + `,` + domainKeysColumn + ` FROM domains d`

const (
	insertDomainSQL = `
INSERT INTO domains (id, project_id, name) VALUES ($1, $2, $3)`

	insertDomainKeySQL = `
INSERT INTO domain_keys (id, domain_id, selector, algorithm, public_key, private_key_enc, kek_id)
VALUES ($1, $2, $3, $4, $5, $6, $7)`

	getDomainSQL       = selectDomainSQL + ` WHERE d.project_id = $1 AND d.id = $2`
	lockDomainSQL      = selectDomainSQL + ` WHERE d.project_id = $1 AND d.id = $2 FOR UPDATE OF d`
	listDomainsSQL     = selectDomainSQL + ` WHERE d.project_id = $1 ORDER BY d.name`
	deleteDomainSQL    = `DELETE FROM domains WHERE project_id = $1 AND id = $2`
	touchDomainSQL     = `UPDATE domains SET updated_at = now() WHERE id = $1`
	pendingKeyCountSQL = `SELECT count(*) FROM domain_keys WHERE domain_id = $1 AND state = 'pending'`

	// The check's outcome: the domain's verification and results, then each
	// key whose state or verification changed.
	recordDomainCheckSQL = `
UPDATE domains SET verified_at = $2, last_checked_at = $3, last_check = $4::jsonb, updated_at = $3
WHERE id = $1`
	updateDomainKeySQL = `
UPDATE domain_keys SET state = $2, verified_at = $3, activated_at = $4, retire_after = $5
WHERE id = $1`

	// What signing needs of every verified domain of a project: the active
	// key, sealed.
	signingDomainsSQL = `
SELECT d.id, d.name, k.id, k.selector, k.algorithm, k.private_key_enc, k.kek_id
FROM domains d
JOIN domain_keys k ON k.domain_id = d.id AND k.state = 'active'
WHERE d.project_id = $1 AND d.verified_at IS NOT NULL`
)

// domainKeyRecord scans one record of domainKeysColumn.
type domainKeyRecord struct {
	DomainKey
	fields []any
}

// ScanNull refuses a NULL record: ARRAY(SELECT ROW(...)) never holds one.
func (r *domainKeyRecord) ScanNull() error { return errors.New("domain key record is NULL") }

// ScanIndex returns where the i-th column of the record goes.
func (r *domainKeyRecord) ScanIndex(i int) any {
	if r.fields == nil {
		k := &r.DomainKey
		r.fields = []any{&k.ID, &k.DomainID, &k.Selector, &k.Algorithm, &k.PublicKey, &k.PrivateKeyEnc,
			&k.KEKID, &k.State, &k.VerifiedAt, &k.ActivatedAt, &k.RetireAfter, &k.CreatedAt}
	}
	if i >= len(r.fields) {
		return nil
	}
	return r.fields[i]
}

func scanDomain(row pgx.CollectableRow) (Domain, error) {
	var (
		d        Domain
		lastJSON string
		keys     []domainKeyRecord
	)
	err := row.Scan(&d.ID, &d.ProjectID, &d.Name, &d.VerifiedAt, &d.LastCheckedAt, &lastJSON, &d.CreatedAt, &d.UpdatedAt, &keys)
	if err != nil {
		return Domain{}, err
	}
	d.LastCheck = []byte(lastJSON)
	d.Keys = make([]DomainKey, len(keys))
	for i, k := range keys {
		d.Keys[i] = k.DomainKey
	}
	return d, nil
}

// CreateDomain stores a domain and its first key in one transaction. A
// domain of the same name in the project is ErrAlreadyExists.
func (d *DB) CreateDomain(ctx context.Context, p NewDomainParams) (Domain, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return Domain{}, fmt.Errorf("create domain %s: new id: %w", p.Name, err)
	}
	project := projectOrDefault(p.ProjectID)
	var out Domain
	err = d.atomic(ctx, func(tx *DB) error {
		if _, err := tx.pool.Exec(ctx, insertDomainSQL, id, project, p.Name); err != nil {
			return err
		}
		if err := tx.insertDomainKey(ctx, id, p.Key); err != nil {
			return err
		}
		out, err = tx.GetDomain(ctx, project, id)
		return err
	})
	if err != nil {
		if isUniqueViolation(err) {
			return Domain{}, fmt.Errorf("create domain %s: %w", p.Name, ErrAlreadyExists)
		}
		return Domain{}, fmt.Errorf("create domain %s: %w", p.Name, mapError(err))
	}
	return out, nil
}

func (d *DB) insertDomainKey(ctx context.Context, domainID uuid.UUID, k NewDomainKey) error {
	_, err := d.pool.Exec(ctx, insertDomainKeySQL, k.ID, domainID, k.Selector, k.Algorithm, k.PublicKey, k.PrivateKeyEnc, k.KEKID)
	return err
}

// GetDomain returns a domain of the project with its keys, or ErrNotFound
// (for another project's domain too).
func (d *DB) GetDomain(ctx context.Context, projectID, id uuid.UUID) (Domain, error) {
	rows, _ := d.pool.Query(ctx, getDomainSQL, projectOrDefault(projectID), id)
	dom, err := pgx.CollectExactlyOneRow(rows, scanDomain)
	if err != nil {
		return Domain{}, fmt.Errorf("domain %s: %w", id, mapError(err))
	}
	return dom, nil
}

// ListDomains returns the project's domains by name, with their keys.
func (d *DB) ListDomains(ctx context.Context, projectID uuid.UUID) ([]Domain, error) {
	rows, _ := d.pool.Query(ctx, listDomainsSQL, projectOrDefault(projectID))
	ds, err := pgx.CollectRows(rows, scanDomain)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", mapError(err))
	}
	return ds, nil
}

// DeleteDomain deletes a domain of the project and its keys, or returns
// ErrNotFound.
func (d *DB) DeleteDomain(ctx context.Context, projectID, id uuid.UUID) error {
	tag, err := d.pool.Exec(ctx, deleteDomainSQL, projectOrDefault(projectID), id)
	if err != nil {
		return fmt.Errorf("delete domain %s: %w", id, mapError(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("delete domain %s: %w", id, ErrNotFound)
	}
	return nil
}

// AddDomainKey adds a pending key to a domain of the project (a rotation):
// the active key keeps signing until a check finds the new key's record.
// It returns ErrNotFound for an unknown domain, ErrKeyPending when a key is
// already pending, and ErrAlreadyExists for a selector the domain has.
func (d *DB) AddDomainKey(ctx context.Context, projectID, domainID uuid.UUID, k NewDomainKey) (Domain, error) {
	project := projectOrDefault(projectID)
	var out Domain
	err := d.atomic(ctx, func(tx *DB) error {
		rows, _ := tx.pool.Query(ctx, lockDomainSQL, project, domainID)
		if _, err := pgx.CollectExactlyOneRow(rows, scanDomain); err != nil {
			return err
		}
		var pending int
		if err := tx.pool.QueryRow(ctx, pendingKeyCountSQL, domainID).Scan(&pending); err != nil {
			return err
		}
		if pending > 0 {
			return ErrKeyPending
		}
		if err := tx.insertDomainKey(ctx, domainID, k); err != nil {
			return err
		}
		if _, err := tx.pool.Exec(ctx, touchDomainSQL, domainID); err != nil {
			return err
		}
		var err error
		out, err = tx.GetDomain(ctx, project, domainID)
		return err
	})
	if err != nil {
		if isUniqueViolation(err) {
			return Domain{}, fmt.Errorf("add key %s to domain %s: %w", k.Selector, domainID, ErrAlreadyExists)
		}
		return Domain{}, fmt.Errorf("add key %s to domain %s: %w", k.Selector, domainID, mapError(err))
	}
	return out, nil
}

// KeyCheck is what a DNS check found for one key's record.
type KeyCheck int

// Outcomes of a key's DNS check.
const (
	// KeyUnknown: the lookup failed (timeout, SERVFAIL); nothing changes.
	KeyUnknown KeyCheck = iota
	// KeyFound: the record holds the key's public half.
	KeyFound
	// KeyNotFound: there is no such record, or it holds another key.
	KeyNotFound
)

// DomainCheckParams is the outcome of a check of a domain's DNS records.
type DomainCheckParams struct {
	ProjectID uuid.UUID
	DomainID  uuid.UUID
	// Keys maps a key's selector to what its record showed; a key not in
	// the map counts as KeyUnknown.
	Keys map[string]KeyCheck
	// Result is the check's report, as JSON, kept for reading back.
	Result []byte
	// Grace is how long a replaced key stays published (retiring).
	Grace time.Duration
	// Now is the check's time. Defaults to time.Now().
	Now time.Time
}

// RecordDomainCheck applies a check to a domain of the project under a row
// lock, so concurrent checks apply one after the other:
//
//   - a key whose record was found is marked verified;
//   - when the newest found key is pending, it becomes active and the key
//     it replaces retiring until Now+Grace (the rotation completes);
//   - retiring keys past their RetireAfter become retired;
//   - the domain is verified while the active key's record is found: set on
//     the first such check, cleared when a check finds the record missing
//     or wrong, unchanged when the lookup failed.
//
// It returns the domain as it is afterwards, or ErrNotFound.
func (d *DB) RecordDomainCheck(ctx context.Context, p DomainCheckParams) (Domain, error) {
	now := p.Now
	if now.IsZero() {
		now = time.Now()
	}
	project := projectOrDefault(p.ProjectID)
	var out Domain
	err := d.atomic(ctx, func(tx *DB) error {
		rows, _ := tx.pool.Query(ctx, lockDomainSQL, project, p.DomainID)
		dom, err := pgx.CollectExactlyOneRow(rows, scanDomain)
		if err != nil {
			return err
		}
		keys := applyKeyChecks(dom.Keys, p.Keys, now, p.Grace)
		// The key leaving the active state is written before the one
		// entering it: at most one active key per domain at any moment.
		for _, activeNow := range []bool{false, true} {
			for i, k := range keys {
				if (k.State == KeyActive) != activeNow || !keyChanged(dom.Keys[i], k) {
					continue
				}
				if _, err := tx.pool.Exec(ctx, updateDomainKeySQL, k.ID, k.State, k.VerifiedAt, k.ActivatedAt, k.RetireAfter); err != nil {
					return err
				}
			}
		}
		verifiedAt := dom.VerifiedAt
		active, hasActive := Domain{Keys: keys}.ActiveKey()
		switch {
		case !hasActive:
			verifiedAt = nil
		case p.Keys[active.Selector] == KeyFound:
			if verifiedAt == nil {
				verifiedAt = &now
			}
		case p.Keys[active.Selector] == KeyNotFound:
			verifiedAt = nil
		}
		result := p.Result
		if len(result) == 0 {
			result = []byte("{}")
		}
		if _, err := tx.pool.Exec(ctx, recordDomainCheckSQL, dom.ID, verifiedAt, now, string(result)); err != nil {
			return err
		}
		out, err = tx.GetDomain(ctx, project, dom.ID)
		return err
	})
	if err != nil {
		return Domain{}, fmt.Errorf("record check of domain %s: %w", p.DomainID, mapError(err))
	}
	return out, nil
}

// applyKeyChecks returns keys (newest first) with the check's outcome
// applied; see RecordDomainCheck.
func applyKeyChecks(keys []DomainKey, found map[string]KeyCheck, now time.Time, grace time.Duration) []DomainKey {
	out := make([]DomainKey, len(keys))
	copy(out, keys)
	promote := -1
	for i := range out {
		k := &out[i]
		if found[k.Selector] == KeyFound && k.VerifiedAt == nil {
			k.VerifiedAt = &now
		}
		if k.State == KeyRetiring && k.RetireAfter != nil && !now.Before(*k.RetireAfter) {
			k.State = KeyRetired
		}
		// Newest first: the first found key that may sign is the one to
		// sign with.
		if promote < 0 && found[k.Selector] == KeyFound && (k.State == KeyPending || k.State == KeyActive) {
			promote = i
		}
	}
	if promote >= 0 && out[promote].State == KeyPending {
		retire := now.Add(grace)
		for i := range out {
			if out[i].State == KeyActive {
				out[i].State = KeyRetiring
				out[i].RetireAfter = &retire
			}
		}
		out[promote].State = KeyActive
		out[promote].ActivatedAt = &now
	}
	return out
}

// keyChanged reports whether applyKeyChecks changed what updateDomainKeySQL
// writes; it replaces the pointers it changes.
func keyChanged(before, after DomainKey) bool {
	return before.State != after.State || before.VerifiedAt != after.VerifiedAt ||
		before.ActivatedAt != after.ActivatedAt || before.RetireAfter != after.RetireAfter
}

// SigningDomain is a verified domain of a project with its active key,
// what signing a message needs.
type SigningDomain struct {
	DomainID uuid.UUID
	Name     string
	Key      DomainKey
}

// SigningDomains returns the project's verified domains that have an
// active key.
func (d *DB) SigningDomains(ctx context.Context, projectID uuid.UUID) ([]SigningDomain, error) {
	rows, _ := d.pool.Query(ctx, signingDomainsSQL, projectOrDefault(projectID))
	ds, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (SigningDomain, error) {
		var s SigningDomain
		err := row.Scan(&s.DomainID, &s.Name, &s.Key.ID, &s.Key.Selector, &s.Key.Algorithm, &s.Key.PrivateKeyEnc, &s.Key.KEKID)
		s.Key.DomainID = s.DomainID
		s.Key.State = KeyActive
		return s, err
	})
	if err != nil {
		return nil, fmt.Errorf("signing domains: %w", mapError(err))
	}
	return ds, nil
}
