package delivery

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/posthaste/posthaste/internal/testenv"
)

// newTestRouter returns a router asking a fresh loopback DNS server.
func newTestRouter(t *testing.T, routes map[string]string, maxHosts int) (*router, *testenv.DNSServer) {
	t.Helper()
	srv := testenv.StartDNS(t)
	res := newDNSResolver(srv.Addr, "", 300*time.Millisecond, nil)
	rt, err := parseRoutes(routes)
	if err != nil {
		t.Fatal(err)
	}
	return newRouter(res, rt, 25, maxHosts), srv
}

func hosts(ts []target) []string {
	var out []string
	for _, t := range ts {
		out = append(out, t.Host)
	}
	return out
}

func TestTargetsSortedByPreferenceEqualOnesShuffled(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 10)
	dnsSrv.AddMX("shuffle.test", "backup.shuffle.test", 30)
	dnsSrv.AddMX("shuffle.test", "b.shuffle.test", 10)
	dnsSrv.AddMX("shuffle.test", "a.shuffle.test", 10)
	dnsSrv.AddMX("shuffle.test", "first.shuffle.test", 5)
	dnsSrv.AddA("first.shuffle.test", "192.0.2.1")
	dnsSrv.AddA("a.shuffle.test", "192.0.2.2")
	dnsSrv.AddA("b.shuffle.test", "192.0.2.3")
	dnsSrv.AddA("backup.shuffle.test", "192.0.2.4")

	seen := map[string]bool{}
	for range 100 {
		ts, err := r.targets(t.Context(), "shuffle.test")
		if err != nil {
			t.Fatal(err)
		}
		got := hosts(ts)
		if len(got) != 4 || got[0] != "first.shuffle.test" || got[3] != "backup.shuffle.test" {
			t.Fatalf("order %v: want first, then the two of preference 10, then backup", got)
		}
		seen[strings.Join(got[1:3], ",")] = true
		if ts[0].Port != 25 || ts[0].IP != netip.MustParseAddr("192.0.2.1") {
			t.Fatalf("first target %+v", ts[0])
		}
	}
	// 100 fair coin flips all landing the same way has probability 2^-99.
	if !seen["a.shuffle.test,b.shuffle.test"] || !seen["b.shuffle.test,a.shuffle.test"] {
		t.Fatalf("equal preferences were not shuffled: saw %v", seen)
	}
}

func TestTargetsPinnedShuffle(t *testing.T) {
	t.Parallel()
	r, _ := newTestRouter(t, nil, 10)
	r.shuffle = func(n int, swap func(i, j int)) {
		// Reverse each group of equal preference.
		for i := 0; i < n/2; i++ {
			swap(i, n-1-i)
		}
	}
	mxs := []mxRecord{{"c", 20}, {"a", 10}, {"b", 10}, {"d", 20}, {"e", 0}}
	r.order(mxs)
	want := []mxRecord{{"e", 0}, {"b", 10}, {"a", 10}, {"d", 20}, {"c", 20}}
	if !slices.Equal(mxs, want) {
		t.Fatalf("order = %v, want %v", mxs, want)
	}
}

func TestTargetsLimitedToMaxHosts(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 3)
	dnsSrv.AddMX("many.test", "mx1.many.test", 10)
	dnsSrv.AddMX("many.test", "mx2.many.test", 20)
	dnsSrv.AddA("mx1.many.test", "192.0.2.1")
	dnsSrv.AddA("mx1.many.test", "192.0.2.2")
	dnsSrv.AddA("mx2.many.test", "192.0.2.3")
	dnsSrv.AddA("mx2.many.test", "192.0.2.4")
	ts, err := r.targets(t.Context(), "many.test")
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, tg := range ts {
		ips = append(ips, tg.IP.String())
	}
	if want := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"}; !slices.Equal(ips, want) {
		t.Fatalf("IPs = %v, want %v", ips, want)
	}
}

func TestTargetsIPv4BeforeIPv6(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 5)
	dnsSrv.AddMX("dual.test", "mx.dual.test", 10)
	dnsSrv.AddA("mx.dual.test", "2001:db8::25")
	dnsSrv.AddA("mx.dual.test", "192.0.2.25")
	ts, err := r.targets(t.Context(), "dual.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(ts) != 2 || ts[0].IP.String() != "192.0.2.25" || ts[1].IP.String() != "2001:db8::25" {
		t.Fatalf("targets %+v", ts)
	}
	if got := ts[1].addr(); got != "[2001:db8::25]:25" {
		t.Fatalf("IPv6 address %q", got)
	}
}

func TestTargetsImplicitMX(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 5)
	// RFC 5321 section 5.1: no MX records, so the domain's own address.
	dnsSrv.AddA("implicit.test", "192.0.2.7")
	ts, err := r.targets(t.Context(), "Implicit.TEST.")
	if err != nil {
		t.Fatal(err)
	}
	if len(ts) != 1 || ts[0].Host != "implicit.test" || ts[0].IP.String() != "192.0.2.7" || ts[0].Pref != 0 {
		t.Fatalf("targets %+v", ts)
	}
}

func TestTargetsFailures(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 5)
	dnsSrv.AddNullMX("nullmx.test")
	dnsSrv.AddA("nullmx.test", "192.0.2.9") // must not be used
	dnsSrv.AddMX("nullpref.test", ".", 10)
	dnsSrv.AddA("nullpref.test", "192.0.2.10")
	dnsSrv.SetRcode("servfail.test", dns.RcodeServerFailure)
	dnsSrv.SetNoAnswer("silent.test")
	dnsSrv.AddMX("noaddr.test", "gone.noaddr.test", 10)
	dnsSrv.AddMX("noaddr.test", "empty.noaddr.test", 20)
	dnsSrv.AddName("empty.noaddr.test")
	dnsSrv.AddName("noaddrimplicit.test")
	dnsSrv.AddMX("hostfail.test", "broken.hostfail.test", 10)
	dnsSrv.SetRcode("broken.hostfail.test", dns.RcodeServerFailure)

	tests := []struct {
		domain    string
		code      int
		enhanced  string
		temporary bool
	}{
		{"nullmx.test", 556, "5.1.10", false},
		{"nullpref.test", 556, "5.1.10", false},
		{"missing.test", 550, "5.1.2", false},
		{"servfail.test", 451, "4.4.3", true},
		{"silent.test", 451, "4.4.3", true},
		{"noaddr.test", 550, "5.4.4", false},
		{"noaddrimplicit.test", 550, "5.4.4", false},
		{"hostfail.test", 451, "4.4.3", true},
	}
	for _, tt := range tests {
		t.Run(tt.domain, func(t *testing.T) {
			t.Parallel()
			ts, err := r.targets(t.Context(), tt.domain)
			if err == nil {
				t.Fatalf("targets = %+v, want an error", ts)
			}
			if err.Code != tt.code || err.EnhancedCode != tt.enhanced || err.Temporary() != tt.temporary {
				t.Fatalf("error %v (temporary %v), want %d %s (temporary %v)",
					err, err.Temporary(), tt.code, tt.enhanced, tt.temporary)
			}
		})
	}
}

func TestNullMXAsksNoAddresses(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 5)
	dnsSrv.AddNullMX("nullmx.test")
	if _, err := r.targets(t.Context(), "nullmx.test"); err == nil || err.EnhancedCode != "5.1.10" {
		t.Fatalf("err = %v", err)
	}
	if n := dnsSrv.Queries("nullmx.test", dns.TypeA) + dnsSrv.Queries("nullmx.test", dns.TypeAAAA); n != 0 {
		t.Fatalf("%d A queries after a null MX", n)
	}
}

func TestTargetsSkipHostsWithoutAddress(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, nil, 5)
	dnsSrv.AddMX("partial.test", ".", 0) // next to real MX, not a null MX
	dnsSrv.AddMX("partial.test", "gone.partial.test", 10)
	dnsSrv.AddMX("partial.test", "mx.partial.test", 20)
	dnsSrv.AddA("mx.partial.test", "192.0.2.30")
	ts, err := r.targets(t.Context(), "partial.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hosts(ts); !slices.Equal(got, []string{"mx.partial.test"}) {
		t.Fatalf("hosts %v", got)
	}
}

func TestStaticRoutes(t *testing.T) {
	t.Parallel()
	r, dnsSrv := newTestRouter(t, map[string]string{
		"Routed.test":    "192.0.2.50:2525",
		"named.test":     "relay.test",
		"badroute.test":  "nowhere.test:26",
		"*":              "[2001:db8::1]:587",
		"nullroute.test": "192.0.2.51",
	}, 5)
	dnsSrv.AddA("relay.test", "192.0.2.60")
	dnsSrv.AddNullMX("nullroute.test") // the route wins over DNS
	dnsSrv.AddMX("routed.test", "mx.routed.test", 10)
	dnsSrv.AddA("mx.routed.test", "192.0.2.99")

	tests := []struct {
		domain string
		want   string
	}{
		{"routed.test", "192.0.2.50:2525"},
		{"named.test", "192.0.2.60:25"},
		{"other.test", "[2001:db8::1]:587"},
		{"nullroute.test", "192.0.2.51:25"},
	}
	for _, tt := range tests {
		ts, err := r.targets(t.Context(), tt.domain)
		if err != nil {
			t.Fatalf("%s: %v", tt.domain, err)
		}
		if len(ts) != 1 || ts[0].addr() != tt.want {
			t.Fatalf("%s: targets %+v, want %s", tt.domain, ts, tt.want)
		}
	}
	if n := dnsSrv.Queries("routed.test", dns.TypeMX); n != 0 {
		t.Fatalf("routed domain's MX was looked up %d times", n)
	}
	_, err := r.targets(t.Context(), "badroute.test")
	if err == nil || !err.Temporary() || err.EnhancedCode != "4.4.3" {
		t.Fatalf("unresolvable route host: err = %v, want a temporary 4.4.3", err)
	}
}

func TestParseRoutes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      map[string]string
		want    routeTable
		wantErr string
	}{
		{"host and port", map[string]string{"A.test.": "mx.test:2525"}, routeTable{"a.test": {Host: "mx.test", Port: 2525}}, ""},
		{"host only", map[string]string{"*": "mx.test"}, routeTable{"*": {Host: "mx.test"}}, ""},
		{"ipv6 with port", map[string]string{"*": "[::1]:25"}, routeTable{"*": {Host: "::1", Port: 25}}, ""},
		{"ipv6 bare", map[string]string{"*": "[::1]"}, routeTable{"*": {Host: "::1"}}, ""},
		{"empty domain", map[string]string{"": "mx.test"}, nil, "Routes: empty domain"},
		{"empty destination", map[string]string{"a.test": ""}, nil, "Routes: a.test: empty destination"},
		{"bad port", map[string]string{"a.test": "mx.test:0"}, nil, "Routes: a.test: bad port"},
		{"port not a number", map[string]string{"a.test": "mx.test:smtp"}, nil, "Routes: a.test: bad port"},
		{"empty host", map[string]string{"a.test": ":25"}, nil, "Routes: a.test: empty host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseRoutes(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want prefix %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
			for k, v := range tt.want {
				if got[k] != v {
					t.Fatalf("got %v, want %v", got, tt.want)
				}
			}
		})
	}
}

func TestResolverFallsBackToNextServer(t *testing.T) {
	t.Parallel()
	good := testenv.StartDNS(t)
	good.AddMX("fallback.test", "mx.fallback.test", 10)
	bad := testenv.StartDNS(t)
	bad.SetRcode("fallback.test", dns.RcodeServerFailure)
	res := &dnsResolver{
		servers: []string{bad.Addr, good.Addr},
		udp:     &dns.Client{Net: "udp", Timeout: time.Second},
		tcp:     &dns.Client{Net: "tcp", Timeout: time.Second},
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	mxs, err := res.lookupMX(ctx, "fallback.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(mxs) != 1 || mxs[0].Host != "mx.fallback.test" || mxs[0].Pref != 10 {
		t.Fatalf("mxs %+v", mxs)
	}
}

func TestNewDNSResolverServerForms(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"192.0.2.53":      "192.0.2.53:53",
		"192.0.2.53:5353": "192.0.2.53:5353",
		"2001:db8::53":    "[2001:db8::53]:53",
		"[2001:db8::53]":  "[2001:db8::53]:53",
	} {
		r := newDNSResolver(in, "", time.Second, nil)
		if !slices.Equal(r.servers, []string{want}) {
			t.Errorf("%s: servers %v, want %s", in, r.servers, want)
		}
	}
}

// TestResolverWithoutResolvConf checks that a resolver for the system's
// servers can be made on a host without resolv.conf: static routes still
// work, lookups fail as temporary errors that name the file, and the file is
// read once it appears.
func TestResolverWithoutResolvConf(t *testing.T) {
	t.Parallel()
	conf := filepath.Join(t.TempDir(), "resolv.conf")
	res := newDNSResolver("", conf, time.Second, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	rt, err := parseRoutes(map[string]string{"*": "192.0.2.25:2525"})
	if err != nil {
		t.Fatal(err)
	}
	ts, serr := newRouter(res, rt, 25, 5).targets(ctx, "any.test")
	if serr != nil || len(ts) != 1 || ts[0].addr() != "192.0.2.25:2525" {
		t.Fatalf("static route: targets %+v, err %v", ts, serr)
	}

	mx := newRouter(res, nil, 25, 5)
	check := func(want string) {
		t.Helper()
		ts, serr := mx.targets(ctx, "mx.test")
		if serr == nil {
			t.Fatalf("targets %+v without a DNS server", ts)
		}
		if !serr.Temporary() || serr.Code != 451 || serr.EnhancedCode != "4.4.3" ||
			!strings.Contains(serr.Error(), conf) || !strings.Contains(serr.Error(), want) {
			t.Fatalf("err = %v, want a temporary 451 4.4.3 naming %s and saying %q", serr, conf, want)
		}
	}
	check("no such file")
	if err := os.WriteFile(conf, []byte("search test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	check("lists no nameserver")

	if err := os.WriteFile(conf, []byte("nameserver 192.0.2.53\nnameserver 2001:db8::53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	servers, err := res.nameservers()
	if want := []string{"192.0.2.53:53", "[2001:db8::53]:53"}; err != nil || !slices.Equal(servers, want) {
		t.Fatalf("servers %v, %v once the file exists; want %v", servers, err, want)
	}
}
