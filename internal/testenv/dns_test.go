package testenv

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func query(t *testing.T, s *DNSServer, network, name string, qtype uint16) (*dns.Msg, error) {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: 300 * time.Millisecond}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	in, _, err := c.ExchangeContext(context.Background(), m, s.Addr)
	return in, err
}

func TestDNSServerAnswers(t *testing.T) {
	t.Parallel()
	s := StartDNS(t)
	s.AddMX("example.test", "mx2.example.test", 20)
	s.AddMX("Example.TEST", "mx1.example.test.", 10)
	s.AddA("mx1.example.test", "192.0.2.1")
	s.AddA("mx1.example.test", "2001:db8::1")
	s.AddNullMX("nullmx.test")
	s.AddName("empty.test")
	s.SetRcode("servfail.test", dns.RcodeServerFailure)

	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			in, err := query(t, s, network, "example.test", dns.TypeMX)
			if err != nil {
				t.Fatal(err)
			}
			if in.Rcode != dns.RcodeSuccess || len(in.Answer) != 2 {
				t.Fatalf("MX answer %v", in)
			}
			prefs := map[string]uint16{}
			for _, rr := range in.Answer {
				mx := rr.(*dns.MX)
				prefs[mx.Mx] = mx.Preference
			}
			if prefs["mx1.example.test."] != 10 || prefs["mx2.example.test."] != 20 {
				t.Fatalf("MX records %v", prefs)
			}

			in, err = query(t, s, network, "MX1.example.test", dns.TypeA)
			if err != nil {
				t.Fatal(err)
			}
			if len(in.Answer) != 1 || !in.Answer[0].(*dns.A).A.Equal(net.ParseIP("192.0.2.1")) {
				t.Fatalf("A answer %v", in.Answer)
			}
			in, err = query(t, s, network, "mx1.example.test", dns.TypeAAAA)
			if err != nil {
				t.Fatal(err)
			}
			if len(in.Answer) != 1 || !in.Answer[0].(*dns.AAAA).AAAA.Equal(net.ParseIP("2001:db8::1")) {
				t.Fatalf("AAAA answer %v", in.Answer)
			}

			in, err = query(t, s, network, "nullmx.test", dns.TypeMX)
			if err != nil {
				t.Fatal(err)
			}
			if len(in.Answer) != 1 || in.Answer[0].(*dns.MX).Mx != "." || in.Answer[0].(*dns.MX).Preference != 0 {
				t.Fatalf("null MX answer %v", in.Answer)
			}

			// A name that exists answers NOERROR with no records for
			// other types; a name never added answers NXDOMAIN.
			for name, want := range map[string]int{
				"example.test":  dns.RcodeSuccess,
				"empty.test":    dns.RcodeSuccess,
				"missing.test":  dns.RcodeNameError,
				"servfail.test": dns.RcodeServerFailure,
			} {
				in, err := query(t, s, network, name, dns.TypeA)
				if err != nil {
					t.Fatal(err)
				}
				if in.Rcode != want || len(in.Answer) != 0 {
					t.Fatalf("%s: rcode %s answer %v, want %s", name, dns.RcodeToString[in.Rcode], in.Answer, dns.RcodeToString[want])
				}
				// Negative answers carry the SOA that lets resolvers
				// cache them (RFC 2308 section 3); failures do not.
				soa, ok := func() (*dns.SOA, bool) {
					if len(in.Ns) != 1 {
						return nil, false
					}
					soa, ok := in.Ns[0].(*dns.SOA)
					return soa, ok
				}()
				if want == dns.RcodeServerFailure {
					if len(in.Ns) != 0 {
						t.Fatalf("%s: authority %v on a failure", name, in.Ns)
					}
				} else if !ok || soa.Hdr.Name != "test." || soa.Minttl != 60 {
					t.Fatalf("%s: authority %v, want the SOA of test.", name, in.Ns)
				}
			}
		})
	}
	if n := s.Queries("example.test", dns.TypeMX); n != 2 {
		t.Fatalf("Queries = %d, want 2", n)
	}
}

func TestDNSServerNoAnswer(t *testing.T) {
	t.Parallel()
	s := StartDNS(t)
	s.AddMX("slow.test", "mx.slow.test", 10)
	s.SetNoAnswer("slow.test")
	_, err := query(t, s, "udp", "slow.test", dns.TypeMX)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("err = %v, want a timeout", err)
	}
}

func TestDNSServerStopsAtCleanup(t *testing.T) {
	var addr string
	t.Run("server", func(t *testing.T) {
		addr = StartDNS(t).Addr
	})
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("DNS server still listening after cleanup")
	}
}
