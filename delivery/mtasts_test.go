package delivery

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/netguard"
	"github.com/posthaste/posthaste/internal/testenv"
)

// countingStore counts the database calls of the MTA-STS cache.
type countingStore struct {
	*db.DB
	gets, puts atomic.Int64
}

func (s *countingStore) GetMTASTSPolicy(ctx context.Context, domain string) (db.MTASTSPolicy, error) {
	s.gets.Add(1)
	return s.DB.GetMTASTSPolicy(ctx, domain)
}

func (s *countingStore) PutMTASTSPolicy(ctx context.Context, p db.MTASTSPolicy) error {
	s.puts.Add(1)
	return s.DB.PutMTASTSPolicy(ctx, p)
}

// policyServer is the HTTPS server of mta-sts.<domain>, on loopback with a
// certificate of the test CA.
type policyServer struct {
	srv     *httptest.Server
	fetches atomic.Int64

	mu     sync.Mutex
	status int
	ctype  string
	body   string
}

func (p *policyServer) set(status int, ctype, body string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.status, p.ctype, p.body = status, ctype, body
}

func (p *policyServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.fetches.Add(1)
	p.mu.Lock()
	status, ctype, body := p.status, p.ctype, p.body
	p.mu.Unlock()
	if r.URL.Path != "/.well-known/mta-sts.txt" {
		http.NotFound(w, r)
		return
	}
	if status/100 == 3 {
		w.Header().Set("Location", "https://elsewhere.test/policy.txt")
	}
	w.Header().Set("Content-Type", ctype)
	w.WriteHeader(status)
	w.Write([]byte(body))
}

// stsEnv is a senderEnv with MTA-STS on, its policies stored in a fresh
// database, and policy servers reachable at 127.0.0.1 (allowed by the
// guard) through the test dialer.
type stsEnv struct {
	*senderEnv
	ca    *testCA
	store *countingStore
	guard *netguard.Guard
}

func newSTSEnv(t *testing.T) *stsEnv {
	t.Helper()
	e, ca := newTLSEnv(t)
	s := &stsEnv{senderEnv: e, ca: ca, store: &countingStore{DB: testenv.DB(t)},
		guard: netguard.New(netip.MustParsePrefix("127.0.0.0/8"))}
	s.sender.sts = s.newMTASTS()
	return s
}

// newMTASTS returns a policy finder sharing the env's database, as another
// instance would.
func (s *stsEnv) newMTASTS() *mtaSTS {
	return newMTASTS(MTASTSConfig{}.WithDefaults(), s.sender.router.res, families4First, s.guard, s.dialer,
		s.ca.pool, s.store, slog.New(slog.DiscardHandler))
}

// publish serves policy for domain under TXT id, and returns its server.
// Each domain gets its own loopback address, so that servers do not share
// the test dialer's entry for port 443.
func (s *stsEnv) publish(t *testing.T, domain, ip, id, policy string) *policyServer {
	t.Helper()
	return s.publishWith(t, domain, ip, id, policy, s.ca.issue(t, "mta-sts."+domain))
}

// publishWith is publish with the HTTPS server's certificate.
func (s *stsEnv) publishWith(t *testing.T, domain, ip, id, policy string, cert tls.Certificate) *policyServer {
	t.Helper()
	p := &policyServer{status: 200, ctype: "text/plain; charset=utf-8", body: policy}
	p.srv = httptest.NewUnstartedServer(p)
	p.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	p.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	p.srv.StartTLS()
	t.Cleanup(p.srv.Close)
	s.dns.AddTXT("_mta-sts."+domain, "v=STSv1; id="+id+";")
	s.dns.AddA("mta-sts."+domain, ip)
	s.dialer.route(ip, 443, p.srv.Listener.Addr().String())
	return p
}

const enforcePolicy = "version: STSv1\r\nmode: enforce\r\nmx: *.sts.test\r\nmx: backup.example.test\r\nmax_age: 86400\r\n"

func TestMTASTSEnforceDeliversToListedMX(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	ps := e.publish(t, "sts.test", "127.0.0.1", "20240101", enforcePolicy)
	srv := testenv.StartSMTP(t, testenv.WithTLSCertificate(e.ca.issue(t, "mx.sts.test")))
	e.addMX("sts.test", "mx.sts.test", "192.0.2.1", 10, srv)

	for range 3 {
		res := e.attempt(t, "sts.test", "a@sts.test")
		if err := res.Rcpts[0].Err; err != nil {
			t.Fatal(err)
		}
		h := lastHost(t, res)
		if h.TLSPolicy != TLSMTASTSEnforce || !h.TLSVerified || h.TLSPolicyFailure != "" {
			t.Fatalf("host %+v", h)
		}
	}
	// Fetched and read from the database once; the memory cache answers
	// the rest.
	if n := ps.fetches.Load(); n != 1 {
		t.Fatalf("%d fetches", n)
	}
	if n := e.store.gets.Load(); n != 1 {
		t.Fatalf("%d database reads", n)
	}
	stored, err := e.store.DB.GetMTASTSPolicy(t.Context(), "sts.test")
	if err != nil {
		t.Fatal(err)
	}
	if stored.PolicyID != "20240101" || stored.Mode != "enforce" || stored.Policy != enforcePolicy ||
		stored.ExpiresAt.Sub(stored.FetchedAt) != 24*time.Hour {
		t.Fatalf("stored %+v", stored)
	}
}

func TestMTASTSEnforceRefusesUnlistedMX(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	e.publish(t, "sts.test", "127.0.0.1", "1", enforcePolicy)
	srv := testenv.StartSMTP(t, testenv.WithTLSCertificate(e.ca.issue(t, "mx.evil.test")))
	e.addMX("sts.test", "mx.evil.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "sts.test", "a@sts.test")
	err := res.Rcpts[0].Err
	if err == nil || err.Error() != "451 4.7.5 MTA-STS policy of sts.test: mx.evil.test does not match" {
		t.Fatalf("err = %v", err)
	}
	for _, d := range e.dialer.dialed() {
		if strings.HasSuffix(d, ":25") {
			t.Fatalf("connected to %s, which the policy does not list", d)
		}
	}
	if h := lastHost(t, res); h.TLSPolicy != TLSMTASTSEnforce || h.TLSPolicyFailure != "mx.evil.test does not match" {
		t.Fatalf("host %+v", h)
	}
}

func TestMTASTSEnforceRefusesInvalidCertificate(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	e.publish(t, "sts.test", "127.0.0.1", "1", enforcePolicy)
	srv := testenv.StartSMTP(t, testenv.WithTLS()) // self-signed
	e.addMX("sts.test", "mx.sts.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "sts.test", "a@sts.test")
	err := res.Rcpts[0].Err
	if err == nil || err.Code != 451 || err.EnhancedCode != "4.7.5" ||
		!strings.HasPrefix(err.Message, "MTA-STS policy of sts.test: certificate of mx.sts.test not valid") {
		t.Fatalf("err = %v", err)
	}
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("%d messages", n)
	}
}

// Testing mode delivers, and records what enforce mode would refuse.
func TestMTASTSTestingRecordsFailures(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	e.publish(t, "sts.test", "127.0.0.1", "1", strings.Replace(enforcePolicy, "enforce", "testing", 1))
	srv := testenv.StartSMTP(t, testenv.WithTLS())
	e.addMX("sts.test", "mx.other.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "sts.test", "a@sts.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	h := lastHost(t, res)
	if h.TLSPolicy != TLSMTASTSTesting || h.TLSPolicyFailure != "mx.other.test does not match" || !h.TLS || h.TLSVerified {
		t.Fatalf("host %+v", h)
	}

	e.publish(t, "sts2.test", "127.0.0.2", "1", strings.Replace(strings.ReplaceAll(enforcePolicy, "sts.test", "sts2.test"), "enforce", "testing", 1))
	e.addMX("sts2.test", "mx.sts2.test", "192.0.2.1", 10, srv)
	res = e.attempt(t, "sts2.test", "a@sts2.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	if h := lastHost(t, res); !strings.HasPrefix(h.TLSPolicyFailure, "certificate of mx.sts2.test not valid") {
		t.Fatalf("host %+v", h)
	}
	if n := len(srv.Messages()); n != 2 {
		t.Fatalf("%d messages, want 2", n)
	}
}

// Another instance finds the policy in the database without fetching it;
// a new TXT id makes it fetch the new policy; a fetch that fails keeps the
// old one in force.
func TestMTASTSCacheSharedAndRefreshed(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	ps := e.publish(t, "sts.test", "127.0.0.1", "1", enforcePolicy)
	ctx := t.Context()
	if p := e.sender.sts.policy(ctx, "sts.test"); p == nil || p.mode != stsEnforce || p.id != "1" {
		t.Fatalf("policy %+v", p)
	}

	other := e.newMTASTS()
	if p := other.policy(ctx, "sts.test"); p == nil || p.mode != stsEnforce {
		t.Fatalf("other instance: policy %+v", p)
	}
	if n := ps.fetches.Load(); n != 1 {
		t.Fatalf("%d fetches, want the other instance to use the stored policy", n)
	}

	ps.set(200, "text/plain", strings.Replace(enforcePolicy, "enforce", "testing", 1))
	e.dns.RemoveRecords("_mta-sts.sts.test", 16) // 16: TXT
	e.dns.AddTXT("_mta-sts.sts.test", "v=STSv1; id=2")
	if p := e.sender.sts.policy(ctx, "sts.test"); p == nil || p.mode != stsTesting || p.id != "2" {
		t.Fatalf("after the id changed: policy %+v", p)
	}
	if stored, err := e.store.DB.GetMTASTSPolicy(ctx, "sts.test"); err != nil || stored.PolicyID != "2" || stored.Mode != "testing" {
		t.Fatalf("stored %+v, %v", stored, err)
	}

	ps.set(500, "text/plain", "")
	e.dns.RemoveRecords("_mta-sts.sts.test", 16)
	e.dns.AddTXT("_mta-sts.sts.test", "v=STSv1; id=3")
	if p := e.sender.sts.policy(ctx, "sts.test"); p == nil || p.id != "2" {
		t.Fatalf("after a failed fetch: policy %+v, want the cached one", p)
	}
	fetches := ps.fetches.Load()
	// The failure is remembered: no fetch per transaction.
	e.sender.sts.policy(ctx, "sts.test")
	if n := ps.fetches.Load(); n != fetches {
		t.Fatalf("fetched again at once (%d, %d)", fetches, n)
	}

	// Without the TXT record the cached policy applies until it expires
	// (RFC 8461 section 5.1), then the domain has none.
	e.dns.RemoveRecords("_mta-sts.sts.test", 16)
	if p := other.policy(ctx, "sts.test"); p == nil {
		t.Fatal("no policy once the TXT record is gone")
	}
	later := time.Now().Add(25 * time.Hour)
	other.now = func() time.Time { return later }
	if p := other.policy(ctx, "sts.test"); p != nil {
		t.Fatalf("expired policy %+v still applies", p)
	}
}

// A domain without MTA-STS costs a (cacheable) TXT lookup per transaction,
// and the database is asked once, not per transaction.
func TestMTASTSAbsentCostsNoDatabaseQuery(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	srv := testenv.StartSMTP(t)
	e.addMX("plain.test", "mx.plain.test", "192.0.2.1", 10, srv)
	for range 5 {
		res := e.attempt(t, "plain.test", "a@plain.test")
		if err := res.Rcpts[0].Err; err != nil {
			t.Fatal(err)
		}
		if h := lastHost(t, res); h.TLSPolicy != TLSOpportunistic {
			t.Fatalf("policy %q", h.TLSPolicy)
		}
	}
	if n := e.store.gets.Load(); n != 1 {
		t.Fatalf("%d database reads for 5 transactions", n)
	}
}

// Configured policies and static routes take the place of MTA-STS.
func TestMTASTSNotLookedUpForConfiguredDomains(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	ps := e.publish(t, "sts.test", "127.0.0.1", "1", enforcePolicy)
	e.sender.policies = map[string]TLSPolicy{"sts.test": TLSOpportunistic}
	srv := testenv.StartSMTP(t)
	e.addMX("sts.test", "mx.evil.test", "192.0.2.1", 10, srv)
	if err := e.attempt(t, "sts.test", "a@sts.test").Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	if n := ps.fetches.Load(); n != 0 {
		t.Fatalf("%d fetches", n)
	}
}

// Fetches that break RFC 8461 section 3.3's rules give no policy: the
// message goes out under opportunistic TLS, to an MX the policy would not
// list.
func TestMTASTSFetchRules(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name   string
		status int
		ctype  string
		body   string
		allow  bool
	}{
		{"redirect", http.StatusMovedPermanently, "text/plain", enforcePolicy, true},
		{"not found", http.StatusNotFound, "text/plain", enforcePolicy, true},
		{"wrong media type", 200, "text/html", enforcePolicy, true},
		{"too large", 200, "text/plain", enforcePolicy + strings.Repeat("x: y\n", 64<<10/5), true},
		{"malformed", 200, "text/plain", "version: STSv1\nmode: enforce\nmax_age: 86400\n", true},
		{"guarded address", 200, "text/plain", enforcePolicy, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newSTSEnv(t)
			if !tt.allow {
				e.guard = netguard.New()
				e.sender.sts = e.newMTASTS()
			}
			ps := e.publish(t, "sts.test", "127.0.0.1", "1", tt.body)
			ps.set(tt.status, tt.ctype, tt.body)
			srv := testenv.StartSMTP(t)
			e.addMX("sts.test", "mx.evil.test", "192.0.2.1", 10, srv)
			res := e.attempt(t, "sts.test", "a@sts.test")
			if err := res.Rcpts[0].Err; err != nil {
				t.Fatal(err)
			}
			if h := lastHost(t, res); h.TLSPolicy != TLSOpportunistic {
				t.Fatalf("policy %q", h.TLSPolicy)
			}
			if !tt.allow && ps.fetches.Load() != 0 {
				t.Fatal("the policy server at a guarded address was reached")
			}
		})
	}
}

// The HTTPS server must present a certificate valid for mta-sts.<domain>.
func TestMTASTSFetchVerifiesTheServer(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	e.publishWith(t, "sts.test", "127.0.0.1", "1", enforcePolicy, e.ca.issue(t, "mta-sts.elsewhere.test"))
	if _, _, err := e.sender.sts.fetch(t.Context(), "sts.test"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("err = %v, want a certificate error", err)
	}
}

func TestParseSTSPolicy(t *testing.T) {
	t.Parallel()
	p, err := parseSTSPolicy("version: STSv1\nmode: testing\nmx: MX1.Example.COM.\nmx:*.example.net\nmax_age: 604800\nextension: ignored\n")
	if err != nil {
		t.Fatal(err)
	}
	if p.mode != stsTesting || p.maxAge != 7*24*time.Hour || strings.Join(p.mx, ",") != "mx1.example.com,*.example.net" {
		t.Fatalf("policy %+v", p)
	}
	if p, err := parseSTSPolicy("version: STSv1\nmode: none\nmax_age: 0\n"); err != nil || p.mode != stsNone {
		t.Fatalf("mode none: %+v, %v", p, err)
	}
	for _, bad := range []string{
		"",
		"mode: enforce\nmx: a.test\nmax_age: 1\n",                   // no version
		"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",   // wrong version
		"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",    // unknown mode
		"version: STSv1\nmode: enforce\nmax_age: 1\n",               // no mx
		"version: STSv1\nmode: enforce\nmx: a.test\n",               // no max_age
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",  // negative
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1e3\n", // not decimal
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
		"version STSv1\n",
	} {
		if _, err := parseSTSPolicy(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestSTSMatchMX(t *testing.T) {
	t.Parallel()
	p := &stsPolicy{mx: []string{"mail.example.com", "*.example.net"}}
	for host, want := range map[string]bool{
		"mail.example.com":   true,
		"MAIL.example.com.":  true,
		"mx1.example.net":    true,
		"example.net":        false,
		"a.b.example.net":    false,
		"other.example.com":  false,
		"mail.example.com.x": false,
	} {
		if got := p.matchMX(host); got != want {
			t.Errorf("%s: %v, want %v", host, got, want)
		}
	}
}

func TestParseSTSRecord(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		txts []string
		id   string
		ok   bool
	}{
		{[]string{"v=STSv1; id=20160831085700Z;"}, "20160831085700Z", true},
		{[]string{"v=STSv1;id=abc"}, "abc", true},
		{[]string{"v=spf1 -all", "v=STSv1; id=abc"}, "abc", true},
		{[]string{"v=STSv1; id=a", "v=STSv1; id=b"}, "", false}, // two records: none (section 3.1)
		{[]string{"v=STSv1;"}, "", false},
		{[]string{"v=STSv1; id=has-dash"}, "", false},
		{[]string{"v=STSv1; id=" + strings.Repeat("a", 33)}, "", false},
		{nil, "", false},
	} {
		id, ok := parseSTSRecord(tt.txts)
		if id != tt.id || ok != tt.ok {
			t.Errorf("%q: %q %v, want %q %v", tt.txts, id, ok, tt.id, tt.ok)
		}
	}
}

// A database that fails does not stop delivery: the policy is fetched.
func TestMTASTSStoreFailure(t *testing.T) {
	t.Parallel()
	e := newSTSEnv(t)
	e.publish(t, "sts.test", "127.0.0.1", "1", enforcePolicy)
	m := e.newMTASTS()
	m.store = failingStore{}
	if p := m.policy(t.Context(), "sts.test"); p == nil || p.mode != stsEnforce {
		t.Fatalf("policy %+v", p)
	}
}

type failingStore struct{}

func (failingStore) GetMTASTSPolicy(context.Context, string) (db.MTASTSPolicy, error) {
	return db.MTASTSPolicy{}, errors.New("database down")
}

func (failingStore) PutMTASTSPolicy(context.Context, db.MTASTSPolicy) error {
	return errors.New("database down")
}
