package delivery

import (
	"context"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/posthaste/posthaste/internal/testenv"
)

// fakeClock is a clock that only moves when told.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newTestDNSCache(size int) (*dnsCache, *fakeClock) {
	clock := &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	c := newDNSCache(size)
	c.now = clock.now
	return c, clock
}

func mxAnswer(ttls ...uint32) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion("a.test.", dns.TypeMX)
	for i, ttl := range ttls {
		m.Answer = append(m.Answer, &dns.MX{
			Hdr:        dns.RR_Header{Name: "a.test.", Rrtype: dns.TypeMX, Class: dns.ClassINET, Ttl: ttl},
			Preference: uint16(10 * i), Mx: "mx.a.test.",
		})
	}
	return m
}

func negativeAnswer(rcode int, soaTTL, minTTL uint32) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion("a.test.", dns.TypeAAAA)
	m.Rcode = rcode
	if soaTTL > 0 {
		m.Ns = []dns.RR{&dns.SOA{
			Hdr: dns.RR_Header{Name: "test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: soaTTL},
			Ns:  "ns.test.", Mbox: "hostmaster.test.", Minttl: minTTL,
		}}
	}
	return m
}

func TestDNSCacheTTL(t *testing.T) {
	t.Parallel()
	truncated := mxAnswer(60)
	truncated.Truncated = true
	servfail := new(dns.Msg)
	servfail.Rcode = dns.RcodeServerFailure
	tests := []struct {
		name string
		msg  *dns.Msg
		want time.Duration
	}{
		{"smallest answer TTL", mxAnswer(300, 30, 120), 30 * time.Second},
		{"zero TTL", mxAnswer(0), 0},
		{"NXDOMAIN with SOA: the smaller of TTL and MINIMUM", negativeAnswer(dns.RcodeNameError, 60, 30), 30 * time.Second},
		{"no records with SOA", negativeAnswer(dns.RcodeSuccess, 45, 900), 45 * time.Second},
		{"NXDOMAIN without SOA", negativeAnswer(dns.RcodeNameError, 0, 0), 0},
		{"no records without SOA", negativeAnswer(dns.RcodeSuccess, 0, 0), 0},
		{"SERVFAIL", servfail, 0},
		{"truncated", truncated, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := cacheTTL(tt.msg); got != tt.want {
				t.Fatalf("cacheTTL = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestDNSCacheKeepsAnswersForTheirTTL(t *testing.T) {
	t.Parallel()
	c, clock := newTestDNSCache(10)
	key := newDNSKey("A.test", dns.TypeMX)
	msg := mxAnswer(30)
	c.put(key, msg)
	if got := c.get(newDNSKey("a.test.", dns.TypeMX)); got != msg {
		t.Fatalf("get = %v, want the answer (names compare without case or final dot)", got)
	}
	if c.get(newDNSKey("a.test", dns.TypeA)) != nil {
		t.Fatal("answer returned for another type")
	}
	clock.advance(29 * time.Second)
	if c.get(key) != msg {
		t.Fatal("answer gone before its TTL")
	}
	clock.advance(time.Second)
	if c.get(key) != nil {
		t.Fatal("answer kept past its TTL")
	}
	if c.len() != 0 {
		t.Fatalf("%d entries after expiry, want 0", c.len())
	}

	// A long TTL is capped.
	c.put(key, mxAnswer(86400))
	clock.advance(dnsCacheMaxTTL)
	if c.get(key) != nil {
		t.Fatalf("answer kept longer than %s", dnsCacheMaxTTL)
	}

	// What may not be cached is not.
	c.put(key, negativeAnswer(dns.RcodeNameError, 0, 0))
	if c.len() != 0 {
		t.Fatal("negative answer without SOA kept")
	}
}

func TestDNSCacheEvictsLeastRecentlyUsed(t *testing.T) {
	t.Parallel()
	c, _ := newTestDNSCache(2)
	a, b, d := newDNSKey("a.test", dns.TypeMX), newDNSKey("b.test", dns.TypeMX), newDNSKey("d.test", dns.TypeMX)
	c.put(a, mxAnswer(60))
	c.put(b, mxAnswer(60))
	c.get(a) // b is now the least recently used
	c.put(d, mxAnswer(60))
	if c.len() != 2 {
		t.Fatalf("%d entries, want the bound of 2", c.len())
	}
	if c.get(b) != nil || c.get(a) == nil || c.get(d) == nil {
		t.Fatal("evicted the wrong entry")
	}
	// Replacing an entry does not grow the cache.
	c.put(a, mxAnswer(120))
	if c.len() != 2 || c.get(d) == nil {
		t.Fatalf("%d entries after a replace", c.len())
	}
}

func TestDNSCacheDisabled(t *testing.T) {
	t.Parallel()
	c := newDNSCache(-1)
	if c != nil {
		t.Fatal("a negative size made a cache")
	}
	key := newDNSKey("a.test", dns.TypeMX)
	c.put(key, mxAnswer(60))
	if c.get(key) != nil || c.len() != 0 {
		t.Fatal("a nil cache kept an answer")
	}
}

func TestResolverCachesAnswers(t *testing.T) {
	t.Parallel()
	srv := testenv.StartDNS(t)
	srv.AddMX("cached.test", "mx.cached.test", 10)
	srv.AddA("mx.cached.test", "192.0.2.1")
	srv.SetRcode("servfail.test", dns.RcodeServerFailure)
	cache, clock := newTestDNSCache(100)
	res := newDNSResolver(srv.Addr, "", time.Second, cache)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	lookup := func() {
		t.Helper()
		if mxs, err := res.lookupMX(ctx, "cached.test"); err != nil || len(mxs) != 1 || mxs[0].Host != "mx.cached.test" {
			t.Fatalf("MX: %v, %v", mxs, err)
		}
		// The AAAA answer is empty; the SOA makes it cacheable too.
		if ips, err := res.lookupAddrs(ctx, "mx.cached.test", families4First); err != nil || len(ips) != 1 || ips[0].String() != "192.0.2.1" {
			t.Fatalf("addresses: %v, %v", ips, err)
		}
		if _, err := res.lookupMX(ctx, "missing.test"); !isNotFound(err) {
			t.Fatalf("missing.test: %v, want NXDOMAIN", err)
		}
		if _, err := res.lookupMX(ctx, "servfail.test"); err == nil || isNotFound(err) {
			t.Fatalf("servfail.test: %v, want SERVFAIL", err)
		}
	}
	queries := func() [5]int {
		return [5]int{
			srv.Queries("cached.test", dns.TypeMX), srv.Queries("mx.cached.test", dns.TypeA),
			srv.Queries("mx.cached.test", dns.TypeAAAA), srv.Queries("missing.test", dns.TypeMX),
			srv.Queries("servfail.test", dns.TypeMX),
		}
	}

	lookup()
	lookup()
	if got, want := queries(), [5]int{1, 1, 1, 1, 2}; got != want {
		t.Fatalf("queries %v, want %v: answers asked again, or SERVFAIL cached", got, want)
	}
	clock.advance(time.Minute) // the test server's TTLs
	lookup()
	if got, want := queries(), [5]int{2, 2, 2, 2, 3}; got != want {
		t.Fatalf("queries %v after the TTL, want %v", got, want)
	}
}
