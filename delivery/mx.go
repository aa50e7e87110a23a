package delivery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/posthaste/posthaste/internal/netguard"
)

// resolver answers the DNS questions delivery asks. It is an interface so the
// dispatcher gets it injected; the one implementation is dnsResolver.
type resolver interface {
	// lookupMX returns the MX records of domain. A domain that exists but
	// has no MX records yields an empty slice and no error.
	lookupMX(ctx context.Context, domain string) ([]mxRecord, error)
	// lookupAddrs returns the addresses of host, of the record types in
	// families (dns.TypeA, dns.TypeAAAA) in that order. A host that exists
	// without addresses yields an empty slice and no error.
	lookupAddrs(ctx context.Context, host string, families []uint16) ([]netip.Addr, error)
	// lookupTXT returns the TXT records of name, each one's strings
	// joined. A name that exists without TXT records yields an empty slice
	// and no error.
	lookupTXT(ctx context.Context, name string) ([]string, error)
}

// Address families to look up, in order, for each Config.IPVersion.
var (
	families4First = []uint16{dns.TypeA, dns.TypeAAAA}
	families6First = []uint16{dns.TypeAAAA, dns.TypeA}
	families4      = []uint16{dns.TypeA}
	families6      = []uint16{dns.TypeAAAA}
)

// familiesOf returns the record types to look up for an IPVersion.
func familiesOf(ipVersion string) []uint16 {
	switch ipVersion {
	case IPPrefer6:
		return families6First
	case IPOnly4:
		return families4
	case IPOnly6:
		return families6
	}
	return families4First
}

// mxRecord is one MX record: exchange host (without the trailing dot) and
// preference.
type mxRecord struct {
	Host string
	Pref uint16
}

// dnsError is a failed lookup: an error rcode or no answer at all.
type dnsError struct {
	Name  string
	Type  string
	Rcode int   // dns.RcodeSuccess when Err is set
	Err   error // transport error (timeout, refused), nil for an rcode
}

func (e *dnsError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("lookup %s %s: %v", e.Type, e.Name, e.Err)
	}
	return fmt.Sprintf("lookup %s %s: %s", e.Type, e.Name, dns.RcodeToString[e.Rcode])
}

func (e *dnsError) Unwrap() error { return e.Err }

// notFound reports NXDOMAIN: the name does not exist, an answer that will not
// change on retry.
func (e *dnsError) notFound() bool { return e.Err == nil && e.Rcode == dns.RcodeNameError }

func isNotFound(err error) bool {
	de, ok := errors.AsType[*dnsError](err)
	return ok && de.notFound()
}

// systemResolvConf is the file that lists the system's DNS servers.
const systemResolvConf = "/etc/resolv.conf"

// dnsResolver queries DNS servers with github.com/miekg/dns instead of the
// system resolver, so that null MX, NXDOMAIN and SERVFAIL stay distinguishable
// (net.Resolver folds them together) and the server is configurable.
type dnsResolver struct {
	// resolvConf is the file the servers are read from, "" when they were
	// given.
	resolvConf string
	udp        *dns.Client
	tcp        *dns.Client
	cache      *dnsCache // nil: every question goes to the servers

	mu      sync.Mutex
	servers []string // nil until resolvConf could be read
}

// newDNSResolver returns a resolver that asks server ("host" or "host:port"),
// or when server is "" the nameservers listed in resolvConf (a resolv.conf
// file). timeout bounds each exchange. Answers are kept in cache, which may be
// nil.
//
// A resolvConf that cannot be read, or lists no nameserver, is read again at
// each lookup until it can be; meanwhile lookups fail with a temporary error
// that names the file. Mail that needs no lookup, such as mail to a static
// route's IP address, is not held up by it.
func newDNSResolver(server, resolvConf string, timeout time.Duration, cache *dnsCache) *dnsResolver {
	r := &dnsResolver{
		udp:   &dns.Client{Net: "udp", Timeout: timeout, UDPSize: dns.DefaultMsgSize},
		tcp:   &dns.Client{Net: "tcp", Timeout: timeout},
		cache: cache,
	}
	if server == "" {
		r.resolvConf = resolvConf
		r.nameservers() // an error is reported by the lookups
		return r
	}
	if _, _, err := net.SplitHostPort(server); err != nil {
		server = net.JoinHostPort(strings.Trim(server, "[]"), "53")
	}
	r.servers = []string{server}
	return r
}

// nameservers returns the servers to ask, reading resolvConf if it was not
// read yet.
func (r *dnsResolver) nameservers() ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.servers != nil {
		return r.servers, nil
	}
	servers, err := readResolvConf(r.resolvConf)
	if err != nil {
		return nil, err
	}
	r.servers = servers
	return servers, nil
}

// readResolvConf returns the nameservers listed in a resolv.conf file, as
// "host:port".
func readResolvConf(path string) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("no DNS server (DNSServer is empty): read %s: %w", path, err)
	}
	var servers []string
	for _, s := range cc.Servers {
		servers = append(servers, net.JoinHostPort(s, cc.Port))
	}
	if len(servers) == 0 {
		return nil, fmt.Errorf("no DNS server (DNSServer is empty): %s lists no nameserver", path)
	}
	return servers, nil
}

// ednsSize is the EDNS0 buffer size the DNS flag day 2020 settled on: large
// enough for MX answers, small enough to avoid IP fragmentation.
const ednsSize = 1232

// exchange answers from the cache, or asks each server in turn until one
// gives an answer that is not SERVFAIL or REFUSED; a truncated UDP answer is
// repeated over TCP (RFC 7766 section 5). The message returned may be shared
// and must not be modified.
func (r *dnsResolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	key := newDNSKey(name, qtype)
	if in := r.cache.get(key); in != nil {
		return answerOf(in, name, qtype)
	}
	in, err := r.ask(ctx, name, qtype)
	if err != nil {
		return nil, err
	}
	r.cache.put(key, in)
	return answerOf(in, name, qtype)
}

// answerOf returns in, or the error its rcode stands for.
func answerOf(in *dns.Msg, name string, qtype uint16) (*dns.Msg, error) {
	if in.Rcode != dns.RcodeSuccess {
		return nil, &dnsError{Name: name, Type: dns.TypeToString[qtype], Rcode: in.Rcode}
	}
	return in, nil
}

// ask puts the question to the servers. It returns the first answer that is
// NOERROR or NXDOMAIN, or the last failure.
func (r *dnsResolver) ask(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.RecursionDesired = true
	m.SetEdns0(ednsSize, false)
	typ := dns.TypeToString[qtype]
	servers, err := r.nameservers()
	if err != nil {
		return nil, &dnsError{Name: name, Type: typ, Err: err}
	}
	var lastErr error
	for _, server := range servers {
		in, _, err := r.udp.ExchangeContext(ctx, m, server)
		if err == nil && in.Truncated {
			in, _, err = r.tcp.ExchangeContext(ctx, m, server)
		}
		if err != nil {
			lastErr = &dnsError{Name: name, Type: typ, Err: err}
			if ctx.Err() != nil {
				break
			}
			continue
		}
		switch in.Rcode {
		case dns.RcodeSuccess, dns.RcodeNameError:
			return in, nil
		default:
			lastErr = &dnsError{Name: name, Type: typ, Rcode: in.Rcode}
		}
	}
	return nil, lastErr
}

func (r *dnsResolver) lookupMX(ctx context.Context, domain string) ([]mxRecord, error) {
	in, err := r.exchange(ctx, domain, dns.TypeMX)
	if err != nil {
		return nil, err
	}
	return mxRecordsOf(in.Answer), nil
}

// mxRecordsOf returns the MX records of an answer section. A recursive
// server puts the CNAME chain before the MX records, so the owner names
// are not checked against the domain asked about.
func mxRecordsOf(answer []dns.RR) []mxRecord {
	var out []mxRecord
	for _, rr := range answer {
		if mx, ok := rr.(*dns.MX); ok {
			out = append(out, mxRecord{Host: strings.TrimSuffix(mx.Mx, "."), Pref: mx.Preference})
		}
	}
	return out
}

// addrsOf appends the A and AAAA records of an answer section to out.
func addrsOf(out []netip.Addr, answer []dns.RR) []netip.Addr {
	for _, rr := range answer {
		switch a := rr.(type) {
		case *dns.A:
			if ip, ok := netip.AddrFromSlice(a.A.To4()); ok {
				out = append(out, ip)
			}
		case *dns.AAAA:
			// An IPv4-mapped AAAA answer is an IPv4 address; unmapped,
			// it is judged, dialed and recorded as one.
			if ip, ok := netip.AddrFromSlice(a.AAAA.To16()); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out
}

func (r *dnsResolver) lookupTXT(ctx context.Context, name string) ([]string, error) {
	in, err := r.exchange(ctx, name, dns.TypeTXT)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rr := range in.Answer {
		// RFC 7208 section 3.3 and RFC 8461 section 3.1: a record's
		// strings are joined without anything between them.
		if txt, ok := rr.(*dns.TXT); ok {
			out = append(out, strings.Join(txt.Txt, ""))
		}
	}
	return out, nil
}

func (r *dnsResolver) lookupAddrs(ctx context.Context, host string, families []uint16) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, qtype := range families {
		in, err := r.exchange(ctx, host, qtype)
		if err != nil {
			if isNotFound(err) || len(out) == 0 {
				return out, err
			}
			// The other family already answered; a failing AAAA lookup
			// must not stop delivery over IPv4.
			return out, nil
		}
		out = addrsOf(out, in.Answer)
	}
	return out, nil
}

// target is one address to try for a domain.
type target struct {
	Host string // MX host name, or the route's host
	Pref int    // MX preference; 0 for implicit MX and routes
	IP   netip.Addr
	Port int
	// Refused is set for an address the destination guard refuses: it is
	// recorded as tried, and never connected to.
	Refused *SMTPError
}

func (t target) addr() string { return netip.AddrPortFrom(t.IP, uint16(t.Port)).String() }

// router turns a recipient domain into the addresses to try, in order.
type router struct {
	res      resolver
	routes   routeTable
	port     int
	maxHosts int
	// guard decides which addresses of MX hosts may be connected to;
	// routes are not checked.
	guard *netguard.Guard
	// families are the address record types looked up, in order.
	families []uint16
	// shuffle reorders equal-preference hosts; injected so tests can pin it.
	shuffle func(n int, swap func(i, j int))
}

// newRouter returns a router that refuses every guarded range (see
// Config.AllowDestinations) and prefers IPv4; the dispatcher sets guard and
// families from its Config.
func newRouter(res resolver, routes routeTable, port, maxHosts int) *router {
	return &router{res: res, routes: routes, port: port, maxHosts: maxHosts,
		guard: netguard.New(), families: families4First, shuffle: rand.Shuffle}
}

// targets returns up to maxHosts addresses for domain. The error is an
// *SMTPError that decides the outcome of every recipient when no address is
// left to try.
func (r *router) targets(ctx context.Context, domain string) ([]target, *SMTPError) {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if rt, ok := r.routes.lookup(domain); ok {
		return r.routeTargets(ctx, rt)
	}

	mxs, err := r.res.lookupMX(ctx, domain)
	if err != nil {
		if isNotFound(err) {
			// RFC 3463 X.1.2: bad destination system address.
			return nil, &SMTPError{Code: codePermFailure, EnhancedCode: "5.1.2",
				Message: fmt.Sprintf("domain %s does not exist", domain), Err: err}
		}
		return nil, &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.3",
			Message: fmt.Sprintf("MX lookup for %s failed", domain), Err: err}
	}
	// RFC 7505 section 3: an MX record with an empty exchange (".") says
	// the domain accepts no mail; section 4.1 asks for 5.1.10 without any
	// connection attempt. The RFC's form is a single record of preference
	// 0; other preferences are read the same way rather than falling back
	// to the implicit MX the domain refused. Next to real MX records the
	// "." is only skipped.
	if len(mxs) > 0 && !slices.ContainsFunc(mxs, func(m mxRecord) bool { return m.Host != "" }) {
		return nil, &SMTPError{Code: codeNullMX, EnhancedCode: "5.1.10",
			Message: fmt.Sprintf("domain %s does not accept mail (null MX)", domain)}
	}
	mxs = slices.DeleteFunc(mxs, func(m mxRecord) bool { return m.Host == "" })
	if len(mxs) == 0 {
		// RFC 5321 section 5.1: no MX records means the domain itself is
		// the implicit MX, with preference 0.
		mxs = []mxRecord{{Host: domain, Pref: 0}}
	}
	r.order(mxs)

	var out []target
	var tempErr error
	usable, refused := 0, 0
	for _, mx := range mxs {
		if usable >= r.maxHosts {
			break
		}
		if !isHostName(mx.Host) {
			// A name a resolver can only print with escapes (spaces,
			// control characters) cannot be a mail host, and must not
			// reach EHLO's TLS server name, the logs or the attempt rows:
			// it is skipped like a host without an address.
			continue
		}
		ips, err := r.res.lookupAddrs(ctx, mx.Host, r.families)
		if err != nil && !isNotFound(err) {
			tempErr = err
		}
		for _, ip := range ips {
			if usable >= r.maxHosts {
				break
			}
			t := target{Host: mx.Host, Pref: int(mx.Pref), IP: ip, Port: r.port}
			if t.Refused = r.check(mx.Host, ip); t.Refused != nil {
				// Refused addresses do not count against maxHosts, so that
				// a private address published next to public ones cannot
				// push those out; they are capped all the same.
				if refused >= r.maxHosts {
					continue
				}
				refused++
			} else {
				usable++
			}
			out = append(out, t)
		}
		if ctx.Err() != nil {
			break
		}
	}
	if usable > 0 || (refused > 0 && tempErr == nil) {
		// Only refused addresses: the attempt records each of them, and
		// the recipients bounce with the guard's reply. A failed lookup
		// of another host defers instead (below): it may have an address
		// that can be used.
		return out, nil
	}
	if tempErr != nil {
		return nil, &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.3",
			Message: fmt.Sprintf("address lookup for the MX hosts of %s failed", domain), Err: tempErr}
	}
	// RFC 3463 X.4.4: unable to route, every host lacks an address.
	return nil, &SMTPError{Code: codePermFailure, EnhancedCode: "5.4.4",
		Message: fmt.Sprintf("no address for the mail hosts of %s", domain)}
}

// check returns the reply for an address of host that the guard refuses,
// nil when it may be connected to. The reply is permanent: the domain's
// DNS points its mail at an address this dispatcher will not reach, and
// retrying would not change that until the DNS does (RFC 3463 X.4.4:
// unable to route).
func (r *router) check(host string, ip netip.Addr) *SMTPError {
	err := r.guard.CheckAddr(ip)
	if err == nil {
		return nil
	}
	reason := "refused"
	if re, ok := errors.AsType[*netguard.RefusedError](err); ok {
		reason = re.Reason
	}
	return &SMTPError{Code: codePermFailure, EnhancedCode: "5.4.4",
		Message: fmt.Sprintf("%s resolves to %s, %s %s address; not connecting", host, ip, article(reason), reason)}
}

// article is "a" or "an" for word.
func article(word string) string {
	if word != "" && strings.ContainsRune("aeiou", rune(word[0])) {
		return "an"
	}
	return "a"
}

// isHostName reports whether h is made of letters, digits, hyphens and
// underscores in dot-separated labels of 1 to 63 octets (RFC 1123 section
// 2.1, with the underscores some MX hosts carry), at most 253 in all.
func isHostName(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// order sorts by preference and shuffles hosts of equal preference: RFC 5321
// section 5.1 asks senders to spread load randomly across them.
func (r *router) order(mxs []mxRecord) {
	slices.SortStableFunc(mxs, func(a, b mxRecord) int { return cmp.Compare(a.Pref, b.Pref) })
	for i := 0; i < len(mxs); {
		j := i + 1
		for j < len(mxs) && mxs[j].Pref == mxs[i].Pref {
			j++
		}
		group := mxs[i:j]
		r.shuffle(len(group), func(a, b int) { group[a], group[b] = group[b], group[a] })
		i = j
	}
}

// routeTargets resolves a static route. Failures are temporary: the route is
// the operator's configuration, not something the recipient can fix.
func (r *router) routeTargets(ctx context.Context, rt route) ([]target, *SMTPError) {
	port := rt.Port
	if port == 0 {
		port = r.port
	}
	if ip, err := netip.ParseAddr(rt.Host); err == nil {
		return []target{{Host: rt.Host, IP: ip.Unmap(), Port: port}}, nil
	}
	ips, err := r.res.lookupAddrs(ctx, rt.Host, r.families)
	if err == nil && len(ips) == 0 {
		err = errors.New("no addresses")
	}
	if err != nil {
		return nil, &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.3",
			Message: fmt.Sprintf("route host %s cannot be resolved", rt.Host), Err: err}
	}
	var out []target
	for _, ip := range ips {
		if len(out) >= r.maxHosts {
			break
		}
		out = append(out, target{Host: rt.Host, IP: ip, Port: port})
	}
	return out, nil
}
