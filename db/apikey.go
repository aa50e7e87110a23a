package db

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// API key scopes. A key may do what its scopes allow; ScopeAdmin allows
// everything (see HasScope).
const (
	// ScopeSend allows sending and canceling messages.
	ScopeSend = "send"
	// ScopeRead allows reading and listing messages.
	ScopeRead = "read"
	// ScopeAdmin allows managing the project's keys and settings, and
	// everything the other scopes allow: an admin key can make itself a key
	// of any scope, so withholding them would protect nothing.
	ScopeAdmin = "admin"
)

// Scopes returns every scope in canonical order.
func Scopes() []string { return []string{ScopeSend, ScopeRead, ScopeAdmin} }

// NormalizeScopes checks scopes and returns them without duplicates, in
// canonical order. It fails naming the first unknown scope, or when none is
// given.
func NormalizeScopes(scopes []string) ([]string, error) {
	if len(scopes) == 0 {
		return nil, errors.New("at least one scope is required (send, read, admin)")
	}
	for _, s := range scopes {
		if !slices.Contains(Scopes(), s) {
			return nil, fmt.Errorf("unknown scope %q; want send, read or admin", s)
		}
	}
	var out []string
	for _, s := range Scopes() {
		if slices.Contains(scopes, s) {
			out = append(out, s)
		}
	}
	return out, nil
}

// MaxKeyNameLen bounds a key's name, in characters: it is a label for
// people, shown in listings.
const MaxKeyNameLen = 100

// ValidateKeyName reports why name cannot name an API key, or nil. The API
// and the command line both check with it, so neither stores a name the
// other would refuse.
func ValidateKeyName(name string) error {
	switch {
	case name == "":
		return errors.New("is required")
	case !utf8.ValidString(name):
		return errors.New("must be valid UTF-8")
	case utf8.RuneCountInString(name) > MaxKeyNameLen:
		return fmt.Errorf("must be at most %d characters", MaxKeyNameLen)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 {
			return errors.New("must not contain control characters")
		}
	}
	return nil
}

// APIKey is a stored API key. The key itself is never stored, only its
// hash.
type APIKey struct {
	ID uuid.UUID
	// ProjectID is the project whose data the key reaches.
	ProjectID uuid.UUID
	Name      string
	Prefix    string
	// Scopes are in canonical order (see NormalizeScopes).
	Scopes    []string
	CreatedAt time.Time
	// RevokedAt is nil while the key is active.
	RevokedAt *time.Time
	// LastUsedAt is when LookupAPIKey last found the key, to the minute.
	LastUsedAt *time.Time
	// SenderDomains are the domains the key may send from, lowercase;
	// empty allows any (see NormalizeSenderDomains).
	SenderDomains []string
	// RequestsPerSecond overrides the request rate of the key (and of its
	// project's); nil keeps them, 0 is no limit.
	RequestsPerSecond *int
	// Limits are the key's project's overrides. Only LookupAPIKey fills
	// them.
	Limits ProjectLimits
}

// AllowsSender reports whether the key may send from domain, which is
// lowercase.
func (k APIKey) AllowsSender(domain string) bool {
	return len(k.SenderDomains) == 0 || slices.Contains(k.SenderDomains, domain)
}

// NormalizeSenderDomains checks a key's sender domains and returns them
// lowercase, without a trailing dot or duplicates, in the order given. An
// address literal or anything but a host name is refused.
func NormalizeSenderDomains(domains []string) ([]string, error) {
	var out []string
	for _, d := range domains {
		d = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(d), "."))
		if !isDomainName(d) {
			return nil, fmt.Errorf("%q is not a domain name", d)
		}
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out, nil
}

// isDomainName reports whether d is a host name of LDH labels (RFC 1123
// section 2.1) with at least two labels, or its A-label form.
func isDomainName(d string) bool {
	if len(d) == 0 || len(d) > 253 || !strings.Contains(d, ".") {
		return false
	}
	for label := range strings.SplitSeq(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// HasScope reports whether the key may do what scope allows.
func (k APIKey) HasScope(scope string) bool {
	return slices.Contains(k.Scopes, scope) || slices.Contains(k.Scopes, ScopeAdmin)
}

// NewAPIKeyParams is a key to store.
type NewAPIKeyParams struct {
	// ProjectID is the key's project; uuid.Nil means the default project.
	ProjectID uuid.UUID
	Name      string
	Prefix    string
	Hash      []byte
	// Scopes are checked and normalized with NormalizeScopes.
	Scopes []string
	// SenderDomains are checked and normalized with
	// NormalizeSenderDomains; empty allows any.
	SenderDomains []string
	// RequestsPerSecond overrides the key's request rate; nil keeps the
	// project's or the default.
	RequestsPerSecond *int
}

const apiKeyColumns = `id, project_id, name, prefix, scopes, created_at, revoked_at, last_used_at,
    sender_domains, requests_per_second`

const createAPIKeySQL = `
INSERT INTO api_keys (id, project_id, name, prefix, hash, scopes, sender_domains, requests_per_second)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING ` + apiKeyColumns

// bootstrapKeyLock is the transaction advisory lock key that serializes
// CreateAPIKeyIfNone across instances.
const bootstrapKeyLock int64 = 0x706f7374686b6579 // "posthkey"

const lockBootstrapSQL = `SELECT pg_advisory_xact_lock($1)`

const anyAPIKeySQL = `SELECT EXISTS (SELECT 1 FROM api_keys)`

const listAPIKeysSQL = `
SELECT ` + apiKeyColumns + ` FROM api_keys WHERE project_id = $1 ORDER BY created_at, id`

// Revoking a revoked key keeps the first revocation time. A key of another
// project is not found, exactly like an unknown one.
const revokeAPIKeySQL = `
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE id = $1 AND project_id = $2
RETURNING ` + apiKeyColumns

// lookupAPIKeySQL finds an active key, with its project's limits, which
// the cache in front of it then holds as long as the key. It only reads:
// recording the use is TouchAPIKeys's, off the request's path.
const lookupAPIKeySQL = `
SELECT k.id, k.project_id, k.name, k.prefix, k.scopes, k.created_at, k.revoked_at, k.last_used_at,
    k.sender_domains, k.requests_per_second, p.requests_per_second, p.recipients_per_day
FROM api_keys k JOIN projects p ON p.id = k.project_id
WHERE k.hash = $1 AND k.revoked_at IS NULL`

// touchAPIKeysSQL records the use of keys, at most once a minute per key so
// that a busy key does not turn every flush into a write.
const touchAPIKeysSQL = `
UPDATE api_keys SET last_used_at = now()
WHERE id = ANY($1::uuid[]) AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')`

func scanAPIKey(row pgx.CollectableRow) (APIKey, error) {
	var k APIKey
	err := row.Scan(&k.ID, &k.ProjectID, &k.Name, &k.Prefix, &k.Scopes, &k.CreatedAt, &k.RevokedAt, &k.LastUsedAt,
		&k.SenderDomains, &k.RequestsPerSecond)
	return k, err
}

func scanAPIKeyWithLimits(row pgx.CollectableRow) (APIKey, error) {
	var k APIKey
	err := row.Scan(&k.ID, &k.ProjectID, &k.Name, &k.Prefix, &k.Scopes, &k.CreatedAt, &k.RevokedAt, &k.LastUsedAt,
		&k.SenderDomains, &k.RequestsPerSecond, &k.Limits.RequestsPerSecond, &k.Limits.RecipientsPerDay)
	return k, err
}

func (p *NewAPIKeyParams) validate() error {
	switch {
	case p.Name == "":
		return errors.New("name is required")
	case p.Prefix == "":
		return errors.New("prefix is required")
	case len(p.Hash) == 0:
		return errors.New("hash is required")
	}
	scopes, err := NormalizeScopes(p.Scopes)
	if err != nil {
		return fmt.Errorf("scopes: %w", err)
	}
	p.Scopes = scopes
	domains, err := NormalizeSenderDomains(p.SenderDomains)
	if err != nil {
		return fmt.Errorf("sender domains: %w", err)
	}
	p.SenderDomains = domains
	if p.RequestsPerSecond != nil && *p.RequestsPerSecond < 0 {
		return errors.New("requests per second must not be negative")
	}
	p.ProjectID = projectOrDefault(p.ProjectID)
	return nil
}

// CreateAPIKey stores a new key under the hash of its secret. An unknown
// project is ErrNotFound.
func (d *DB) CreateAPIKey(ctx context.Context, p NewAPIKeyParams) (APIKey, error) {
	if err := p.validate(); err != nil {
		return APIKey{}, fmt.Errorf("create api key: %w", err)
	}
	k, err := createAPIKey(ctx, d.pool, p)
	if err != nil {
		if isForeignKeyViolation(err) {
			return APIKey{}, fmt.Errorf("create api key %q: project %s: %w", p.Name, p.ProjectID, ErrNotFound)
		}
		return APIKey{}, fmt.Errorf("create api key %q: %w", p.Name, mapError(err))
	}
	return k, nil
}

func createAPIKey(ctx context.Context, q Querier, p NewAPIKeyParams) (APIKey, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return APIKey{}, err
	}
	domains := p.SenderDomains
	if domains == nil {
		domains = []string{}
	}
	rows, _ := q.Query(ctx, createAPIKeySQL, id, p.ProjectID, p.Name, p.Prefix, p.Hash, p.Scopes, domains, p.RequestsPerSecond)
	return pgx.CollectExactlyOneRow(rows, scanAPIKey)
}

// CreateAPIKeyIfNone stores a key only when there is no key at all, in any
// project, revoked or not, and reports whether it did. It is how a first key
// is made on an empty database; instances starting together make exactly
// one, because they take turns under a transaction advisory lock.
func (d *DB) CreateAPIKeyIfNone(ctx context.Context, p NewAPIKeyParams) (APIKey, bool, error) {
	if err := p.validate(); err != nil {
		return APIKey{}, false, fmt.Errorf("create first api key: %w", err)
	}
	var (
		k       APIKey
		created bool
	)
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, lockBootstrapSQL, bootstrapKeyLock); err != nil {
			return err
		}
		var exists bool
		if err := tx.QueryRow(ctx, anyAPIKeySQL).Scan(&exists); err != nil {
			return err
		}
		if exists {
			return nil
		}
		var err error
		k, err = createAPIKey(ctx, tx, p)
		created = err == nil
		return err
	})
	if err != nil {
		return APIKey{}, false, fmt.Errorf("create first api key: %w", mapError(err))
	}
	return k, created, nil
}

// ListAPIKeys returns every key of a project, revoked ones included, oldest
// first.
func (d *DB) ListAPIKeys(ctx context.Context, projectID uuid.UUID) ([]APIKey, error) {
	if projectID == uuid.Nil {
		return nil, errors.New("list api keys: project is required")
	}
	rows, _ := d.pool.Query(ctx, listAPIKeysSQL, projectID)
	keys, err := pgx.CollectRows(rows, scanAPIKey)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", mapError(err))
	}
	return keys, nil
}

// RevokeAPIKey revokes a key of a project for good and returns it. Revoking
// it again is not an error; an unknown id, or the id of another project's
// key, is ErrNotFound.
func (d *DB) RevokeAPIKey(ctx context.Context, projectID, id uuid.UUID) (APIKey, error) {
	if projectID == uuid.Nil {
		return APIKey{}, fmt.Errorf("revoke api key %s: project is required", id)
	}
	rows, _ := d.pool.Query(ctx, revokeAPIKeySQL, id, projectID)
	k, err := pgx.CollectExactlyOneRow(rows, scanAPIKey)
	if err != nil {
		return APIKey{}, fmt.Errorf("revoke api key %s: %w", id, mapError(err))
	}
	return k, nil
}

// LookupAPIKey finds the active key with the given hash, or ErrNotFound
// (also for a revoked key). It does not record the use; see TouchAPIKeys.
func (d *DB) LookupAPIKey(ctx context.Context, hash []byte) (APIKey, error) {
	rows, _ := d.pool.Query(ctx, lookupAPIKeySQL, nonNilBytes(hash))
	k, err := pgx.CollectExactlyOneRow(rows, scanAPIKeyWithLimits)
	if err != nil {
		return APIKey{}, fmt.Errorf("look up api key: %w", mapError(err))
	}
	return k, nil
}

// TouchAPIKeys records that the keys with the given ids were used now. A
// key whose use was recorded less than a minute ago is left alone, so
// LastUsedAt is exact to the minute.
func (d *DB) TouchAPIKeys(ctx context.Context, ids []uuid.UUID) error {
	if len(ids) == 0 {
		return nil
	}
	if _, err := d.pool.Exec(ctx, touchAPIKeysSQL, ids); err != nil {
		return fmt.Errorf("touch %d api keys: %w", len(ids), mapError(err))
	}
	return nil
}
