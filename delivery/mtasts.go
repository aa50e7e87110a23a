package delivery

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/netguard"
)

// MTA-STS (RFC 8461): a domain publishes a TXT record at _mta-sts.<domain>
// naming the current policy, and the policy itself at
// https://mta-sts.<domain>/.well-known/mta-sts.txt. In enforce mode a
// sender delivers only to the MX hosts the policy lists, over TLS with a
// certificate valid for the MX host name; in testing mode it delivers as
// usual and reports what enforce mode would have refused.

// Policy modes (RFC 8461 section 3.2).
const (
	stsEnforce = "enforce"
	stsTesting = "testing"
	stsNone    = "none"
)

const (
	// stsMaxPolicySize caps a policy body: RFC 8461 section 3.3
	// recommends 64 KiB.
	stsMaxPolicySize = 64 << 10
	// stsMaxAge is the largest max_age allowed, about one year (RFC 8461
	// section 3.2).
	stsMaxAge = 31557600
)

// stsPolicy is a parsed MTA-STS policy (RFC 8461 section 3.2).
type stsPolicy struct {
	mode   string
	mx     []string // lower case, without a trailing dot
	maxAge time.Duration
	// id is the TXT record's id the policy was fetched for, and expires
	// when it stops applying: fetched at, plus max_age.
	id      string
	expires time.Time
}

// parseSTSPolicy parses a policy body: "key: value" lines ending in CRLF
// or LF, of which version, mode and max_age are required, mx at least once
// unless the mode is none; unknown keys are ignored (RFC 8461 section 3.2).
func parseSTSPolicy(text string) (*stsPolicy, error) {
	p := &stsPolicy{}
	var version, maxAge string
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\r\n")
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("policy line %q is not key: value", line)
		}
		key, value = strings.TrimSpace(key), strings.TrimSpace(value)
		switch key {
		case "version":
			version = value
		case "mode":
			p.mode = value
		case "max_age":
			maxAge = value
		case "mx":
			p.mx = append(p.mx, strings.ToLower(strings.TrimSuffix(value, ".")))
		}
	}
	if version != "STSv1" {
		return nil, fmt.Errorf("policy version %q is not STSv1", version)
	}
	switch p.mode {
	case stsEnforce, stsTesting:
		if len(p.mx) == 0 {
			return nil, fmt.Errorf("policy in %s mode lists no mx", p.mode)
		}
	case stsNone:
	default:
		return nil, fmt.Errorf("policy mode %q is not enforce, testing or none", p.mode)
	}
	// max_age is a plain decimal, at most 10 digits (section 3.2).
	secs, err := strconv.ParseUint(maxAge, 10, 32)
	if err != nil || len(maxAge) > 10 || secs > stsMaxAge {
		return nil, fmt.Errorf("policy max_age %q is not a number of seconds up to %d", maxAge, stsMaxAge)
	}
	p.maxAge = time.Duration(secs) * time.Second
	return p, nil
}

// matchMX reports whether host is one of the policy's mx patterns. A
// pattern "*.example.com" matches exactly one more label on the left:
// mx1.example.com, but neither example.com nor a.b.example.com (RFC 8461
// section 4.1).
func (p *stsPolicy) matchMX(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	for _, pattern := range p.mx {
		if rest, ok := strings.CutPrefix(pattern, "*."); ok {
			label, parent, found := strings.Cut(host, ".")
			if found && label != "" && parent == rest {
				return true
			}
			continue
		}
		if host == pattern {
			return true
		}
	}
	return false
}

// unexpired returns p while it applies at now, else nil.
func (p *stsPolicy) unexpired(now time.Time) *stsPolicy {
	if p == nil || !now.Before(p.expires) {
		return nil
	}
	return p
}

// parseSTSRecord returns the id of the domain's MTA-STS TXT record. Of the
// TXT records at _mta-sts, those that do not start with "v=STSv1" are
// ignored; unless exactly one is left, and it is well formed, the domain
// has no MTA-STS policy available (RFC 8461 section 3.1).
func parseSTSRecord(txts []string) (string, bool) {
	var found []string
	for _, t := range txts {
		if strings.HasPrefix(t, "v=STSv1") {
			found = append(found, t)
		}
	}
	if len(found) != 1 {
		return "", false
	}
	id := ""
	for i, field := range strings.Split(found[0], ";") {
		field = strings.TrimSpace(field)
		if field == "" {
			continue
		}
		key, value, ok := strings.Cut(field, "=")
		if !ok {
			return "", false
		}
		switch {
		case i == 0 && (key != "v" || value != "STSv1"):
			return "", false
		case key == "id":
			id = value
		}
	}
	// sts-id = 1*32(ALPHA / DIGIT)
	if id == "" || len(id) > 32 || strings.IndexFunc(id, func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9')
	}) >= 0 {
		return "", false
	}
	return id, true
}

// stsStore is where policies are shared between instances; *db.DB is one.
type stsStore interface {
	GetMTASTSPolicy(ctx context.Context, domain string) (db.MTASTSPolicy, error)
	PutMTASTSPolicy(ctx context.Context, p db.MTASTSPolicy) error
}

// mtaSTS finds the MTA-STS policy of recipient domains. Policies are
// cached twice: in the database, so that every instance shares each fetch,
// and in memory in front of it, so that a transaction costs one TXT lookup
// (itself usually a cached DNS answer) and no database query. The memory
// cache also remembers, for RecheckInterval, that a domain has no policy
// or that its fetch failed.
type mtaSTS struct {
	res    resolver
	store  stsStore // nil: memory only
	client *http.Client
	cfg    MTASTSConfig
	log    *slog.Logger
	now    func() time.Time

	mu      sync.Mutex
	entries map[string]*stsEntry
	flights map[string]*stsFlight
}

// stsEntry is what memory knows of a domain.
type stsEntry struct {
	policy *stsPolicy // nil: none applies
	// txtID is the TXT record id the entry answers for; a different id
	// in DNS means a new policy to fetch (RFC 8461 section 5.1).
	txtID string
	// checkAt is when the entry stops being the answer without asking
	// the database (or fetching) again.
	checkAt time.Time
}

// stsFlight is a refresh in progress; concurrent callers for the same
// domain wait for it instead of fetching too.
type stsFlight struct {
	done   chan struct{}
	policy *stsPolicy
}

// newMTASTS returns a policy finder. Policy hosts are resolved with res,
// checked against guard, and dialed with dialer; their certificates are
// verified against roots (the system's when nil), as RFC 8461 section 3.3
// requires.
func newMTASTS(cfg MTASTSConfig, res resolver, families []uint16, guard *netguard.Guard, dialer Dialer,
	roots *x509.CertPool, store stsStore, log *slog.Logger) *mtaSTS {
	m := &mtaSTS{res: res, store: store, cfg: cfg, log: log, now: time.Now,
		entries: make(map[string]*stsEntry), flights: make(map[string]*stsFlight)}
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) {
		return guardedDial(ctx, res, families, guard, dialer, addr)
	}
	m.client = &http.Client{
		Transport: &http.Transport{
			DialContext:     dial,
			TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
			// One fetch per domain and max_age: nothing to keep a
			// connection open for.
			DisableKeepAlives:      true,
			MaxResponseHeaderBytes: 16 << 10,
		},
		// RFC 8461 section 3.3: redirects MUST NOT be followed.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Timeout:       cfg.FetchTimeout,
	}
	return m
}

// guardedDial connects to addr ("host:port") at the first address of host
// that the guard allows.
func guardedDial(ctx context.Context, res resolver, families []uint16, guard *netguard.Guard, dialer Dialer,
	addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("port of %s: %w", addr, err)
	}
	ips, err := res.lookupAddrs(ctx, host, families)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", host, err)
	}
	lastErr := fmt.Errorf("%s has no address", host)
	for _, ip := range ips {
		if err := guard.CheckAddr(ip); err != nil {
			lastErr = fmt.Errorf("%s: %w", host, err)
			continue
		}
		conn, err := dialer.DialContext(ctx, "tcp", netip.AddrPortFrom(ip, uint16(port)).String())
		if err == nil {
			return conn, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

// policy returns the MTA-STS policy that applies to domain (lower case),
// nil when none does.
func (m *mtaSTS) policy(ctx context.Context, domain string) *stsPolicy {
	id, found := m.lookupID(ctx, domain)
	now := m.now()
	m.mu.Lock()
	e := m.entries[domain]
	// Without a TXT record a cached policy still applies until it expires
	// (RFC 8461 section 5.1): removing the record does not end a policy.
	if e != nil && now.Before(e.checkAt) && (!found || e.txtID == id) {
		m.mu.Unlock()
		return e.policy.unexpired(now)
	}
	if f := m.flights[domain]; f != nil {
		m.mu.Unlock()
		select {
		case <-f.done:
			return f.policy
		case <-ctx.Done():
			return nil
		}
	}
	f := &stsFlight{done: make(chan struct{})}
	m.flights[domain] = f
	m.mu.Unlock()

	entry := m.refresh(ctx, domain, id, found, e)
	f.policy = entry.policy
	m.mu.Lock()
	delete(m.flights, domain)
	if ctx.Err() == nil {
		// A refresh cut short by its caller's context says nothing about
		// the domain.
		if len(m.entries) >= m.cfg.CacheSize && m.entries[domain] == nil {
			for k := range m.entries { // evict one, whichever
				delete(m.entries, k)
				break
			}
		}
		m.entries[domain] = entry
	}
	m.mu.Unlock()
	close(f.done)
	return f.policy
}

// lookupID returns the id of domain's MTA-STS TXT record. A failed lookup
// counts as no record: a cached policy still applies, and without one
// the domain is treated as having none (RFC 8461 section 5.1).
func (m *mtaSTS) lookupID(ctx context.Context, domain string) (string, bool) {
	txts, err := m.res.lookupTXT(ctx, "_mta-sts."+domain)
	if err != nil {
		if !isNotFound(err) {
			m.log.Debug("delivery: MTA-STS TXT lookup failed", "domain", domain, "err", err)
		}
		return "", false
	}
	return parseSTSRecord(txts)
}

// refresh works out the policy of domain from the database and, when the
// TXT record names a policy that is not stored, from its HTTPS server. A
// fetch that fails leaves the previous policy in place until it expires
// (RFC 8461 section 5.1).
func (m *mtaSTS) refresh(ctx context.Context, domain, id string, found bool, e *stsEntry) *stsEntry {
	now := m.now()
	var cur *stsPolicy
	if e != nil {
		cur = e.policy.unexpired(now)
	}
	if m.store != nil {
		stored, err := m.store.GetMTASTSPolicy(ctx, domain)
		switch {
		case err == nil && now.Before(stored.ExpiresAt):
			if p, perr := parseSTSPolicy(stored.Policy); perr == nil {
				p.id, p.expires = stored.PolicyID, stored.ExpiresAt
				cur = p
			}
		case err == nil, errors.Is(err, db.ErrNotFound):
		default:
			m.log.Warn("delivery: reading the stored MTA-STS policy failed", "domain", domain, "err", err)
		}
	}
	checkAt := now.Add(m.cfg.RecheckInterval)
	if found && (cur == nil || cur.id != id) {
		body, p, err := m.fetch(ctx, domain)
		if err != nil {
			m.log.Info("delivery: MTA-STS policy fetch failed", "domain", domain, "id", id, "err", err)
		} else {
			p.id, p.expires = id, now.Add(p.maxAge)
			if m.store != nil {
				err := m.store.PutMTASTSPolicy(ctx, db.MTASTSPolicy{Domain: domain, PolicyID: id, Mode: p.mode,
					Policy: body, FetchedAt: now, ExpiresAt: p.expires})
				if err != nil {
					m.log.Warn("delivery: storing the MTA-STS policy failed", "domain", domain, "err", err)
				}
			}
			// A policy applies to the delivery it was fetched for, even
			// with a max_age of 0.
			return &stsEntry{policy: p, txtID: id, checkAt: p.expires}
		}
	}
	if cur != nil && (!found || cur.id == id) {
		checkAt = cur.expires
	}
	txtID := id
	if !found && cur != nil {
		txtID = cur.id
	}
	return &stsEntry{policy: cur, txtID: txtID, checkAt: checkAt}
}

// fetch gets and parses the policy of domain (RFC 8461 section 3.3): over
// HTTPS with a certificate valid for mta-sts.<domain>, no redirects, a 200
// answer of type text/plain, at most stsMaxPolicySize bytes.
func (m *mtaSTS) fetch(ctx context.Context, domain string) (string, *stsPolicy, error) {
	url := "https://mta-sts." + domain + "/.well-known/mta-sts.txt"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", nil, fmt.Errorf("fetch %s: %w", url, err)
	}
	resp, err := m.client.Do(req)
	if err != nil {
		return "", nil, fmt.Errorf("fetch %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", nil, fmt.Errorf("fetch %s: HTTP status %d (redirects are not followed)", url, resp.StatusCode)
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != "text/plain" {
		return "", nil, fmt.Errorf("fetch %s: media type %q is not text/plain", url, resp.Header.Get("Content-Type"))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, stsMaxPolicySize+1))
	if err != nil {
		return "", nil, fmt.Errorf("fetch %s: %w", url, err)
	}
	if len(body) > stsMaxPolicySize {
		return "", nil, fmt.Errorf("fetch %s: policy larger than %d bytes", url, stsMaxPolicySize)
	}
	p, err := parseSTSPolicy(string(body))
	if err != nil {
		return "", nil, fmt.Errorf("policy of %s: %w", domain, err)
	}
	return string(body), p, nil
}
