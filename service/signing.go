package service

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	"github.com/posthaste/posthaste/internal/keyenc"
)

// DefaultDomainCacheTTL is how long a project's verified domains are
// trusted by default before they are read again.
const DefaultDomainCacheTTL = 5 * time.Second

// signerMaxProjects bounds the cache; past it, expired projects are dropped.
const signerMaxProjects = 10000

// signer checks the From domains of accepted mail against the project's
// verified domains and signs the message with the domain's DKIM key. A
// project's verified domains are read at most once per ttl (concurrent
// misses share one read), and each private key is opened and parsed once
// per process and key: keys are never changed in place, so a key's id and
// sealed bytes name one parsed key for good. Signing thus costs no database
// round trip on most messages.
type signer struct {
	store           *db.DB
	kek             *keyenc.KEK
	ttl             time.Duration
	allowUnverified bool
	now             func() time.Time

	mu       sync.Mutex
	projects map[uuid.UUID]*signingEntry
}

// signingEntry is a project's verified domains, or a read of them in
// flight (ready open).
type signingEntry struct {
	ready   chan struct{}
	domains map[string]*signingKey
	err     error
	expires time.Time
}

// signingKey is the active key of one verified domain, parsed; err says why
// it cannot sign (no or another key-encryption key).
type signingKey struct {
	id     uuid.UUID
	sealed []byte
	key    message.DKIMKey
	err    error
}

func newSigner(store *db.DB, kek *keyenc.KEK, ttl time.Duration, allowUnverified bool) *signer {
	return &signer{
		store: store, kek: kek, ttl: ttl, allowUnverified: allowUnverified,
		now: time.Now, projects: make(map[uuid.UUID]*signingEntry),
	}
}

// seal refuses raw when a domain of fromDomains (the From header's, which
// DMARC aligns on: RFC 7489 section 3.1) is not a verified domain of the
// project, unless unverified domains are allowed, and signs it with the
// key of the first From domain that is verified (RFC 6376: one signature,
// d= the domain or a parent of it, which relaxed alignment accepts). field
// names the From in errors. The result is raw when nothing signs.
func (s *signer) seal(ctx context.Context, projectID uuid.UUID, field string, fromDomains []string, raw []byte) ([]byte, error) {
	if len(fromDomains) == 0 {
		return raw, nil
	}
	domains, err := s.domains(ctx, projectID)
	if err != nil {
		return nil, fmt.Errorf("verified domains of project %s: %w", projectID, err)
	}
	var use *signingKey
	for _, from := range fromDomains {
		k := matchDomain(domains, from)
		if k == nil {
			if !s.allowUnverified {
				return nil, &unverifiedDomainError{field: field, domain: from}
			}
			continue
		}
		if use == nil {
			use = k
		}
	}
	if use == nil {
		return raw, nil
	}
	if use.err != nil {
		return nil, fmt.Errorf("dkim key %s of %s: %w", use.key.Selector, use.key.Domain, use.err)
	}
	signed, err := message.SignDKIM(raw, use.key)
	if err != nil {
		return nil, err
	}
	return signed, nil
}

// matchDomain returns the key of domain, or of its nearest verified parent
// with at least two labels.
func matchDomain(domains map[string]*signingKey, domain string) *signingKey {
	domain = strings.ToLower(domain)
	for {
		if k, ok := domains[domain]; ok {
			return k
		}
		_, parent, ok := strings.Cut(domain, ".")
		if !ok || !strings.Contains(parent, ".") {
			return nil
		}
		domain = parent
	}
}

// forget drops the project's cached domains, so this instance sees a
// verification, rotation or deletion at once.
func (s *signer) forget(projectID uuid.UUID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.projects[projectID]; ok && e.ready == nil {
		delete(s.projects, projectID)
	}
}

// domains returns the project's verified domains by name.
func (s *signer) domains(ctx context.Context, projectID uuid.UUID) (map[string]*signingKey, error) {
	if s.ttl < 0 {
		return s.load(ctx, projectID, nil)
	}
	now := s.now()
	s.mu.Lock()
	e, ok := s.projects[projectID]
	if ok && e.ready == nil && now.Before(e.expires) {
		s.mu.Unlock()
		return e.domains, nil
	}
	if ok && e.ready != nil {
		ready := e.ready
		s.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return e.domains, e.err
	}
	var previous map[string]*signingKey
	if ok {
		previous = e.domains
	}
	e = &signingEntry{ready: make(chan struct{})}
	s.projects[projectID] = e
	s.mu.Unlock()

	// The read belongs to every waiter, so it must not end with the first
	// caller's cancellation.
	domains, err := s.load(context.WithoutCancel(ctx), projectID, previous)
	s.mu.Lock()
	e.domains, e.err, e.expires = domains, err, s.now().Add(s.ttl)
	if err != nil {
		delete(s.projects, projectID)
	} else if len(s.projects) > signerMaxProjects {
		for id, other := range s.projects {
			if other.ready == nil && !now.Before(other.expires) {
				delete(s.projects, id)
			}
		}
	}
	ready := e.ready
	e.ready = nil
	s.mu.Unlock()
	close(ready)
	return domains, err
}

// load reads the project's verified domains, reusing the parsed keys of
// previous that are still the active ones.
func (s *signer) load(ctx context.Context, projectID uuid.UUID, previous map[string]*signingKey) (map[string]*signingKey, error) {
	rows, err := s.store.SigningDomains(ctx, projectID)
	if err != nil {
		return nil, err
	}
	out := make(map[string]*signingKey, len(rows))
	for _, r := range rows {
		if old, ok := previous[r.Name]; ok && old.id == r.Key.ID && bytes.Equal(old.sealed, r.Key.PrivateKeyEnc) {
			out[r.Name] = old
			continue
		}
		out[r.Name] = s.parse(r)
	}
	return out, nil
}

// parse opens and parses the key of r. A key that cannot be opened is kept
// with its error, so sending from its domain fails clearly (it must not go
// out unsigned) while other domains sign.
func (s *signer) parse(r db.SigningDomain) *signingKey {
	k := &signingKey{
		id:     r.Key.ID,
		sealed: r.Key.PrivateKeyEnc,
		key:    message.DKIMKey{Domain: r.Name, Selector: r.Key.Selector},
	}
	if s.kek == nil {
		k.err = ErrNoKeyEncryptionKey
		return k
	}
	if r.Key.KEKID != s.kek.ID() {
		k.err = fmt.Errorf("sealed under key-encryption key %s, but %s is configured", r.Key.KEKID, s.kek.ID())
		return k
	}
	der, err := s.kek.Open(r.Key.PrivateKeyEnc, r.Key.ID.String())
	if err != nil {
		k.err = err
		return k
	}
	k.key.Signer, k.err = message.ParseDKIMKey(der)
	clear(der)
	return k
}
