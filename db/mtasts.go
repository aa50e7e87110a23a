package db

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// MTASTSPolicy is a domain's MTA-STS policy (RFC 8461) as last fetched,
// shared by every instance so that each domain's policy is fetched once,
// not once per process.
type MTASTSPolicy struct {
	// Domain is the policy domain, lower case, without a trailing dot.
	Domain string
	// PolicyID is the id of the _mta-sts TXT record the policy was fetched
	// for (RFC 8461 section 3.1); a different id means a new policy.
	PolicyID string
	// Mode is enforce, testing or none.
	Mode string
	// Policy is the policy text as served.
	Policy string
	// FetchedAt is when the policy was fetched, and ExpiresAt that plus
	// its max_age: the policy applies until then (section 3.2).
	FetchedAt time.Time
	ExpiresAt time.Time
}

const getMTASTSPolicySQL = `
SELECT domain, policy_id, mode, policy, fetched_at, expires_at
FROM mta_sts_policies WHERE domain = $1`

// GetMTASTSPolicy returns the policy stored for domain, expired or not, or
// ErrNotFound.
func (d *DB) GetMTASTSPolicy(ctx context.Context, domain string) (MTASTSPolicy, error) {
	var p MTASTSPolicy
	err := d.pool.QueryRow(ctx, getMTASTSPolicySQL, domain).
		Scan(&p.Domain, &p.PolicyID, &p.Mode, &p.Policy, &p.FetchedAt, &p.ExpiresAt)
	if err != nil {
		return MTASTSPolicy{}, fmt.Errorf("mta-sts policy of %s: %w", domain, mapError(err))
	}
	return p, nil
}

// An older fetch never replaces a newer one: two instances that fetched
// the same domain at once may store in either order.
const putMTASTSPolicySQL = `
INSERT INTO mta_sts_policies (domain, policy_id, mode, policy, fetched_at, expires_at)
VALUES (@domain, @policy_id, @mode, @policy, @fetched_at, @expires_at)
ON CONFLICT (domain) DO UPDATE SET
    policy_id = excluded.policy_id,
    mode = excluded.mode,
    policy = excluded.policy,
    fetched_at = excluded.fetched_at,
    expires_at = excluded.expires_at
WHERE mta_sts_policies.fetched_at <= excluded.fetched_at`

// PutMTASTSPolicy stores p as the policy of p.Domain, unless the stored one
// was fetched later.
func (d *DB) PutMTASTSPolicy(ctx context.Context, p MTASTSPolicy) error {
	switch {
	case p.Domain == "":
		return errors.New("put mta-sts policy: Domain is required")
	case p.FetchedAt.IsZero() || p.ExpiresAt.IsZero():
		return fmt.Errorf("put mta-sts policy of %s: FetchedAt and ExpiresAt are required", p.Domain)
	}
	_, err := d.pool.Exec(ctx, putMTASTSPolicySQL, pgx.NamedArgs{
		"domain": p.Domain, "policy_id": p.PolicyID, "mode": p.Mode, "policy": p.Policy,
		"fetched_at": p.FetchedAt, "expires_at": p.ExpiresAt,
	})
	if err != nil {
		return fmt.Errorf("put mta-sts policy of %s: %w", p.Domain, mapError(err))
	}
	return nil
}
