package delivery

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/netguard"
	"github.com/posthaste/posthaste/internal/testenv"
)

// testCA is a certificate authority of a test: its pool stands in for the
// system's roots.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "Posthaste test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue returns a server certificate for names, signed by the CA.
func (ca *testCA) issue(t testing.TB, names ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: names[0]},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     names,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tlsEnv is a senderEnv whose SMTP client trusts a test CA.
func newTLSEnv(t *testing.T) (*senderEnv, *testCA) {
	t.Helper()
	ca := newTestCA(t)
	cfg := testSMTPConfig()
	cfg.RootCAs = ca.pool
	return newSenderEnv(t, cfg, nil), ca
}

func TestAttemptRecordsVerifiedTLS(t *testing.T) {
	t.Parallel()
	e, ca := newTLSEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithTLSCertificate(ca.issue(t, "mx.good.test")))
	e.addMX("good.test", "mx.good.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "good.test", "a@good.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	h := lastHost(t, res)
	if !h.TLS || !h.TLSVerified || h.TLSCipher == "" || h.TLSPolicy != TLSOpportunistic || h.TLSPolicyFailure != "" {
		t.Fatalf("host %+v, want verified TLS under the opportunistic policy", h)
	}
}

// RFC 7435: a certificate that does not verify still encrypts, and
// delivers; the attempt says it did not verify.
func TestAttemptOpportunisticDeliversUnverified(t *testing.T) {
	t.Parallel()
	e, ca := newTLSEnv(t)
	// Valid chain, wrong name.
	srv := testenv.StartSMTP(t, testenv.WithTLSCertificate(ca.issue(t, "other.test")))
	e.addMX("wrongname.test", "mx.wrongname.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "wrongname.test", "a@wrongname.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	h := lastHost(t, res)
	if !h.TLS || h.TLSVerified || h.TLSPolicy != TLSOpportunistic || h.TLSPolicyFailure != "" {
		t.Fatalf("host %+v, want unverified TLS, delivered", h)
	}
	if msgs := srv.Messages(); len(msgs) != 1 || !msgs[0].TLS {
		t.Fatalf("messages %+v, want one over TLS", msgs)
	}
}

func TestConfiguredTLSPolicies(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t)
	for _, tt := range []struct {
		name     string
		policy   TLSPolicy
		srv      func(t *testing.T) *testenv.SMTPServer
		enhanced string // "" delivered
		text     string
		tls      bool
	}{
		{"require without STARTTLS", TLSRequire, func(t *testing.T) *testenv.SMTPServer { return testenv.StartSMTP(t) },
			"4.7.10", "TLS policy require of dest.test: mx.dest.test does not offer STARTTLS", false},
		{"require with a broken handshake", TLSRequire, func(t *testing.T) *testenv.SMTPServer { return testenv.StartSMTP(t, testenv.WithBrokenTLS()) },
			"4.7.5", "TLS policy require of dest.test: TLS handshake with mx.dest.test failed", false},
		{"require with an unverified certificate", TLSRequire, func(t *testing.T) *testenv.SMTPServer { return testenv.StartSMTP(t, testenv.WithTLS()) },
			"", "", true},
		{"require-verified with an unverified certificate", TLSRequireVerified,
			func(t *testing.T) *testenv.SMTPServer { return testenv.StartSMTP(t, testenv.WithTLS()) },
			"4.7.5", "TLS policy require-verified of dest.test: certificate of mx.dest.test not valid", false},
		{"require-verified without STARTTLS", TLSRequireVerified, func(t *testing.T) *testenv.SMTPServer { return testenv.StartSMTP(t) },
			"4.7.10", "does not offer STARTTLS", false},
		{"require-verified with a valid certificate", TLSRequireVerified, func(t *testing.T) *testenv.SMTPServer {
			return testenv.StartSMTP(t, testenv.WithTLSCertificate(ca.issue(t, "mx.dest.test")))
		}, "", "", true},
		{"none", TLSNone, func(t *testing.T) *testenv.SMTPServer { return testenv.StartSMTP(t, testenv.WithTLS()) },
			"", "", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := testSMTPConfig()
			cfg.RootCAs = ca.pool
			e := newSenderEnv(t, cfg, nil)
			e.sender.policies = map[string]TLSPolicy{"dest.test": tt.policy}
			srv := tt.srv(t)
			e.addMX("dest.test", "mx.dest.test", "192.0.2.1", 10, srv)

			res := e.attempt(t, "Dest.TEST", "a@dest.test")
			h := lastHost(t, res)
			if h.TLSPolicy != tt.policy {
				t.Fatalf("policy %q, want %q", h.TLSPolicy, tt.policy)
			}
			err := res.Rcpts[0].Err
			if tt.enhanced == "" {
				if err != nil {
					t.Fatal(err)
				}
				if msgs := srv.Messages(); len(msgs) != 1 || msgs[0].TLS != tt.tls || h.TLS != tt.tls {
					t.Fatalf("messages %+v, host %+v; want one, TLS %v", msgs, h, tt.tls)
				}
				return
			}
			if err == nil || err.Code != 451 || err.EnhancedCode != tt.enhanced || !strings.Contains(err.Message, tt.text) || !err.Temporary() {
				t.Fatalf("err = %v, want 451 %s %q", err, tt.enhanced, tt.text)
			}
			if h.TLSPolicyFailure == "" {
				t.Fatal("no policy failure recorded")
			}
			if n := len(srv.Messages()); n != 0 {
				t.Fatalf("%d messages delivered against the policy", n)
			}
			if n := srv.Connections(); n != 1 {
				t.Fatalf("%d connections, want 1 (no plain-text fallback)", n)
			}
		})
	}
}

// A pooled connection opened under one domain's opportunistic policy does
// not carry mail for a domain whose policy it does not meet.
func TestPooledConnectionMustMeetPolicy(t *testing.T) {
	t.Parallel()
	e, _ := newTLSEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithTLS()) // does not verify
	e.addMX("loose.test", "mx.shared.test", "192.0.2.1", 10, srv)
	e.dns.AddMX("strict.test", "mx.shared.test", 10)
	e.sender.policies = map[string]TLSPolicy{"strict.test": TLSRequireVerified}

	if err := e.attempt(t, "loose.test", "a@loose.test").Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	res := e.attempt(t, "strict.test", "a@strict.test")
	if err := res.Rcpts[0].Err; err == nil || err.EnhancedCode != "4.7.5" {
		t.Fatalf("err = %v, want 4.7.5", err)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages, want only loose.test's", n)
	}
}

func TestParseTLSPolicies(t *testing.T) {
	t.Parallel()
	got, err := parseTLSPolicies(map[string]string{"Example.COM.": "Require-Verified", "b.test": "none"})
	if err != nil || got["example.com"] != TLSRequireVerified || got["b.test"] != TLSNone {
		t.Fatalf("got %v, %v", got, err)
	}
	for _, bad := range []map[string]string{{"a.test": "mta-sts-enforce"}, {"a.test": ""}, {"": "require"}, {"*": "require"}} {
		if _, err := parseTLSPolicies(bad); err == nil || !strings.HasPrefix(err.Error(), "TLSPolicies: ") {
			t.Errorf("%v: err = %v", bad, err)
		}
	}
}

// An MX address in a guarded range is never connected to, and the
// recipient bounces with a reply that says why.
func TestGuardRefusesInternalMXAddresses(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ ip, reason string }{
		{"127.0.0.9", "a loopback"},
		{"::ffff:127.0.0.9", "a loopback"},
		{"10.0.0.1", "a private"},
		{"100.64.1.1", "a CGNAT"},
		{"169.254.169.254", "a cloud metadata"},
		{"169.254.1.1", "a link-local"},
		{"::1", "a loopback"},
		{"0.0.0.0", "an unspecified"},
		{"fd00::1", "a private"},
		{"fe80::1", "a link-local"},
		{"224.0.0.1", "a multicast"},
	} {
		t.Run(tt.ip, func(t *testing.T) {
			t.Parallel()
			e := newSenderEnv(t, testSMTPConfig(), nil)
			srv := testenv.StartSMTP(t)
			e.addMX("internal.test", "mx.internal.test", tt.ip, 10, srv)

			res := e.attempt(t, "internal.test", "a@internal.test")
			err := res.Rcpts[0].Err
			ip := netip.MustParseAddr(tt.ip).Unmap().String()
			want := "mx.internal.test resolves to " + ip + ", " + tt.reason + " address; not connecting"
			if err == nil || err.Code != 550 || err.EnhancedCode != "5.4.4" || err.Message != want || err.Temporary() {
				t.Fatalf("err = %v, want a permanent 550 5.4.4 %q", err, want)
			}
			if d := e.dialer.dialed(); len(d) != 0 {
				t.Fatalf("dialed %v", d)
			}
			if h := lastHost(t, res); h.MXHost != "mx.internal.test" || h.IP != ip {
				t.Fatalf("host %+v not recorded", h)
			}
		})
	}
}

// The guard acts before any TCP connection: a server listening on the
// refused loopback address sees none, until --allow-destination opens the
// range.
func TestGuardLoopbackWithRealDialer(t *testing.T) {
	t.Parallel()
	srv := testenv.StartSMTP(t)
	cfg := testSMTPConfig()
	cfg.Port = srv.Port
	e := newSenderEnv(t, cfg, nil)
	e.sender.connector.dialer = &net.Dialer{}
	e.dns.AddMX("loop.test", "mx.loop.test", 10)
	e.dns.AddA("mx.loop.test", "127.0.0.1")

	res := e.attempt(t, "loop.test", "a@loop.test")
	if err := res.Rcpts[0].Err; err == nil || err.EnhancedCode != "5.4.4" {
		t.Fatalf("err = %v, want 5.4.4", err)
	}
	if n := srv.Connections(); n != 0 {
		t.Fatalf("%d connections to a refused address", n)
	}

	e.sender.router.guard = netguard.New(netip.MustParsePrefix("127.0.0.0/8"))
	res = e.attempt(t, "loop.test", "a@loop.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatalf("with 127.0.0.0/8 allowed: %v", err)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages", n)
	}
}

// A refused address next to a usable one is skipped; a usable one that
// fails temporarily defers rather than bounces.
func TestGuardSkipsRefusedAddressAmongOthers(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t)
	e.addMX("mixed.test", "mx1.mixed.test", "10.0.0.1", 10, srv)
	e.addMX("mixed.test", "mx2.mixed.test", "192.0.2.2", 20, srv)
	res := e.attempt(t, "mixed.test", "a@mixed.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	if len(res.Hosts) != 2 || res.Hosts[0].Err == nil || res.Hosts[0].Err.EnhancedCode != "5.4.4" {
		t.Fatalf("hosts %+v", res.Hosts)
	}

	e.addMX("mixdown.test", "mx1.mixdown.test", "192.0.2.3", 10, nil) // refuses connections
	e.addMX("mixdown.test", "mx2.mixdown.test", "10.0.0.2", 20, nil)
	res = e.attempt(t, "mixdown.test", "a@mixdown.test")
	if err := res.Rcpts[0].Err; err == nil || !err.Temporary() {
		t.Fatalf("err = %v, want temporary", err)
	}
}

// Static routes are the operator's configuration, trusted whatever their
// address (sandbox mode routes every domain to loopback).
func TestGuardTrustsRoutes(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), map[string]string{"routed.test": "127.0.0.1:2525"})
	srv := testenv.StartSMTP(t)
	e.dialer.route("127.0.0.1", 2525, srv.Addr)
	if err := e.attempt(t, "routed.test", "a@routed.test").Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
}

func TestIPVersions(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		version string
		want    []string
		aaaa    bool // AAAA asked
		a       bool
	}{
		{IPPrefer4, []string{"192.0.2.25", "2001:db8::25"}, true, true},
		{IPPrefer6, []string{"2001:db8::25", "192.0.2.25"}, true, true},
		{IPOnly4, []string{"192.0.2.25"}, false, true},
		{IPOnly6, []string{"2001:db8::25"}, true, false},
	} {
		t.Run(tt.version, func(t *testing.T) {
			t.Parallel()
			r, dnsSrv := newTestRouter(t, nil, 5)
			r.families = familiesOf(tt.version)
			r.guard = netguard.New(netip.MustParsePrefix("2001:db8::/32"))
			dnsSrv.AddMX("dual.test", "mx.dual.test", 10)
			dnsSrv.AddA("mx.dual.test", "2001:db8::25")
			dnsSrv.AddA("mx.dual.test", "192.0.2.25")
			ts, err := r.targets(t.Context(), "dual.test")
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, tg := range ts {
				if tg.Refused != nil {
					t.Fatalf("refused %+v", tg)
				}
				got = append(got, tg.IP.String())
			}
			if strings.Join(got, ",") != strings.Join(tt.want, ",") {
				t.Fatalf("addresses %v, want %v", got, tt.want)
			}
			if n := dnsSrv.Queries("mx.dual.test", 28); (n > 0) != tt.aaaa { // 28: AAAA
				t.Fatalf("%d AAAA queries", n)
			}
			if n := dnsSrv.Queries("mx.dual.test", 1); (n > 0) != tt.a { // 1: A
				t.Fatalf("%d A queries", n)
			}
		})
	}
}

func TestConfigValidatesTLSSettings(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		field string
		set   func(*Config)
	}{
		{"IPVersion", func(c *Config) { c.IPVersion = "5" }},
		{"TLSPolicies", func(c *Config) { c.TLSPolicies = map[string]string{"a.test": "strict"} }},
		{"MTASTS.FetchTimeout", func(c *Config) { c.MTASTS.FetchTimeout = -1 }},
		{"AllowDestinations", func(c *Config) { c.AllowDestinations = []netip.Prefix{{}} }},
	} {
		c := Config{}
		tt.set(&c)
		if err := c.Validate(); err == nil || !strings.HasPrefix(err.Error(), tt.field+":") {
			t.Errorf("%s: err = %v", tt.field, err)
		}
	}
}

// An IPv4-mapped IPv6 address (an AAAA record of ::ffff:127.0.0.9) is
// judged by its IPv4 address.
func TestGuardJudgesMappedAddressesAsIPv4(t *testing.T) {
	t.Parallel()
	r := newRouter(nil, nil, 25, 5)
	se := r.check("mx.mapped.test", netip.MustParseAddr("::ffff:127.0.0.9"))
	if se == nil || !strings.Contains(se.Message, "a loopback address") {
		t.Fatalf("reply %v, want a loopback refusal", se)
	}
}

// What an attempt did with TLS, and a refused MX address, reach the
// attempt rows that GetMessage returns.
func TestDispatchRecordsTLSAndGuardOnAttempts(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	ca := newTestCA(t)
	srv := testenv.StartSMTP(t, testenv.WithTLSCertificate(ca.issue(t, "mx.secure.test")))
	e.mx("secure.test", srv)
	e.dns.AddMX("internal.test", "mx.internal.test", 10)
	e.dns.AddA("mx.internal.test", "10.0.0.5")
	id := e.insert(t, time.Time{}, "a@secure.test", "b@internal.test")
	cfg := e.config()
	cfg.SMTP.RootCAs = ca.pool
	cfg.TLSPolicies = map[string]string{"secure.test": "require-verified"}
	cfg.MTASTS.Disabled = true
	e.start(t, cfg)

	m := e.waitMessage(t, id, "final outcomes", final)
	if r := recipient(t, m, "a@secure.test"); r.Status != db.StatusDelivered {
		t.Fatalf("a: %+v", r)
	}
	bounced := recipient(t, m, "b@internal.test")
	if bounced.Status != db.StatusBounced || bounced.LastCode != 550 || bounced.LastEnhancedCode != "5.4.4" ||
		bounced.LastText != "mx.internal.test resolves to 10.0.0.5, a private address; not connecting" {
		t.Fatalf("b: %+v", bounced)
	}
	if len(m.Attempts) != 2 {
		t.Fatalf("attempts %+v", m.Attempts)
	}
	for _, a := range m.Attempts {
		switch a.RecipientID {
		case recipient(t, m, "a@secure.test").ID:
			if !a.TLS || !a.TLSVerified || a.TLSCipher == "" || a.TLSPolicy != "require-verified" || a.TLSPolicyFailure != "" {
				t.Fatalf("secure attempt %+v", a)
			}
		default:
			if a.MXHost != "mx.internal.test" || a.IP != "10.0.0.5" || a.Source != db.AttemptSourceLocal || a.TLS || a.Outcome != db.StatusBounced ||
				!strings.Contains(a.Text, "a private address; not connecting") {
				t.Fatalf("refused attempt %+v", a)
			}
		}
	}
}
