package testenv

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// DNSServer is an authoritative DNS server on loopback that answers from
// records the test adds. Names that were not added answer NXDOMAIN; names
// that were added answer NOERROR with whatever records of the asked type
// they have, possibly none. Records have a TTL of 60 seconds; negative
// answers carry an SOA with the same TTL and MINIMUM, as RFC 2308 section 3
// asks of authoritative servers, so resolvers may cache them as well.
type DNSServer struct {
	// Addr is "127.0.0.1:port"; UDP and TCP listen on the same port.
	Addr string

	udp, tcp *dns.Server
	wg       sync.WaitGroup

	mu      sync.Mutex
	names   map[string]bool
	records map[string][]dns.RR
	rcodes  map[string]int
	drop    map[string]bool
	queries map[string]int
}

// StartDNS starts a DNS server on 127.0.0.1 (UDP and TCP) and stops it in
// t.Cleanup.
func StartDNS(t testing.TB) *DNSServer {
	t.Helper()
	s := &DNSServer{
		names:   make(map[string]bool),
		records: make(map[string][]dns.RR),
		rcodes:  make(map[string]int),
		drop:    make(map[string]bool),
		queries: make(map[string]int),
	}
	pc, ln, err := listenUDPAndTCP()
	if err != nil {
		t.Fatalf("testenv: DNS listen: %v", err)
	}
	s.Addr = pc.LocalAddr().String()
	s.udp = &dns.Server{PacketConn: pc, Handler: s}
	s.tcp = &dns.Server{Listener: ln, Handler: s}
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		errc := make(chan error, 1)
		s.wg.Go(func() { errc <- srv.ActivateAndServe() })
		select {
		case <-started:
		case err := <-errc:
			t.Fatalf("testenv: DNS serve: %v", err)
		}
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.udp.ShutdownContext(ctx)
		s.tcp.ShutdownContext(ctx)
		s.wg.Wait()
	})
	return s
}

// listenUDPAndTCP finds a port free for both UDP and TCP on 127.0.0.1.
func listenUDPAndTCP() (net.PacketConn, net.Listener, error) {
	var lastErr error
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return nil, nil, err
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		lastErr = err
	}
	return nil, nil, lastErr
}

func canonical(name string) string { return dns.CanonicalName(name) }

func (s *DNSServer) add(name string, rr dns.RR) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name = canonical(name)
	s.names[name] = true
	if rr != nil {
		s.records[name] = append(s.records[name], rr)
	}
}

// AddMX adds an MX record for domain pointing at host.
func (s *DNSServer) AddMX(domain, host string, pref uint16) {
	s.add(domain, &dns.MX{
		Hdr:        dns.RR_Header{Name: canonical(domain), Rrtype: dns.TypeMX, Class: dns.ClassINET, Ttl: 60},
		Preference: pref,
		Mx:         canonical(host),
	})
}

// AddNullMX adds the RFC 7505 null MX: one MX record, preference 0,
// exchange ".".
func (s *DNSServer) AddNullMX(domain string) {
	s.add(domain, &dns.MX{
		Hdr: dns.RR_Header{Name: canonical(domain), Rrtype: dns.TypeMX, Class: dns.ClassINET, Ttl: 60},
		Mx:  ".",
	})
}

// AddA adds an address record for host: A for an IPv4 address, AAAA for an
// IPv6 one. It panics on a malformed address.
func (s *DNSServer) AddA(host string, ip string) {
	addr := net.ParseIP(ip)
	if addr == nil {
		panic("testenv: AddA: bad IP " + ip)
	}
	hdr := dns.RR_Header{Name: canonical(host), Class: dns.ClassINET, Ttl: 60}
	if v4 := addr.To4(); v4 != nil {
		hdr.Rrtype = dns.TypeA
		s.add(host, &dns.A{Hdr: hdr, A: v4})
		return
	}
	hdr.Rrtype = dns.TypeAAAA
	s.add(host, &dns.AAAA{Hdr: hdr, AAAA: addr})
}

// AddTXT adds a TXT record for name holding the given strings, which a
// client joins (RFC 7208 section 3.3). A string longer than 255 octets is
// split as DNS hosts publish long values (RFC 1035 section 3.3.14).
func (s *DNSServer) AddTXT(name string, txt ...string) {
	var parts []string
	for _, value := range txt {
		for len(value) > 255 {
			parts = append(parts, value[:255])
			value = value[255:]
		}
		parts = append(parts, value)
	}
	s.add(name, &dns.TXT{
		Hdr: dns.RR_Header{Name: canonical(name), Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60},
		Txt: parts,
	})
}

// RemoveRecords drops every record of type qtype for name; the name keeps
// existing.
func (s *DNSServer) RemoveRecords(name string, qtype uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name = canonical(name)
	kept := s.records[name][:0]
	for _, rr := range s.records[name] {
		if rr.Header().Rrtype != qtype {
			kept = append(kept, rr)
		}
	}
	s.records[name] = kept
}

// Resolver returns a resolver that asks this server only.
func (s *DNSServer) Resolver() *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, s.Addr)
		},
	}
}

// AddName makes name exist without records: its queries answer NOERROR with
// an empty answer.
func (s *DNSServer) AddName(name string) { s.add(name, nil) }

// SetRcode makes every query for domain answer with rcode, such as
// dns.RcodeServerFailure or dns.RcodeNameError.
func (s *DNSServer) SetRcode(domain string, rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcodes[canonical(domain)] = rcode
}

// SetNoAnswer makes the server ignore queries for domain, so that clients
// time out.
func (s *DNSServer) SetNoAnswer(domain string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.drop[canonical(domain)] = true
}

// Queries returns how many queries for name of type qtype (dns.TypeMX, ...)
// were received.
func (s *DNSServer) Queries(name string, qtype uint16) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[canonical(name)+"/"+dns.TypeToString[qtype]]
}

// ServeDNS implements dns.Handler.
func (s *DNSServer) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	if len(r.Question) != 1 {
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	q := r.Question[0]
	name := strings.ToLower(q.Name)

	s.mu.Lock()
	s.queries[name+"/"+dns.TypeToString[q.Qtype]]++
	drop := s.drop[name]
	rcode, hasRcode := s.rcodes[name]
	exists := s.names[name]
	var answer []dns.RR
	for _, rr := range s.records[name] {
		if rr.Header().Rrtype == q.Qtype {
			answer = append(answer, dns.Copy(rr))
		}
	}
	s.mu.Unlock()

	if drop {
		return
	}
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	m.RecursionAvailable = true
	switch {
	case hasRcode:
		m.Rcode = rcode
	case !exists:
		m.Rcode = dns.RcodeNameError
		m.Ns = []dns.RR{negativeSOA(name)}
	case len(answer) == 0:
		m.Ns = []dns.RR{negativeSOA(name)}
	default:
		m.Answer = answer
	}
	if opt := r.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), false)
	}
	w.WriteMsg(m)
}

// negativeSOA is the SOA that goes with a negative answer for name: that of
// its top-level domain ("test." for "mx.a.test."), the only zone apex the
// server knows of.
func negativeSOA(name string) *dns.SOA {
	labels := dns.SplitDomainName(name)
	zone := "."
	if len(labels) > 0 {
		zone = labels[len(labels)-1] + "."
	}
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 60},
		Ns:      "ns." + zone,
		Mbox:    "hostmaster." + zone,
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  60,
	}
}
