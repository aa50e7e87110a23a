// Package netguard decides which network addresses Posthaste may connect
// to on a caller's behalf. Whenever a destination comes from a user (a
// webhook URL today), connecting to it must not reach the machine itself,
// the private network it sits in, or a cloud metadata service: that would
// let a caller use Posthaste to probe or call internal services (SSRF).
//
// The check runs twice. Up front, CheckHost refuses a URL whose host is, or
// resolves to, a refused address, so the caller hears about it at once. At
// connect time, Dialer's Control checks the address actually being
// connected to, after every resolution, so a name that resolves elsewhere
// by then (DNS rebinding) is refused too. An allow-list of prefixes opens
// chosen ranges (tests on loopback, a private network in development).
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"
)

// ErrRefused is wrapped by every error for an address the guard refuses.
var ErrRefused = errors.New("address refused by the outbound address guard")

// RefusedError names the refused address and why it is refused.
type RefusedError struct {
	// Host is the name that was resolved, empty when an address was given.
	Host string
	Addr netip.Addr
	// Reason is the kind of address, e.g. "loopback" or "private".
	Reason string
}

func (e *RefusedError) Error() string {
	if e.Host != "" && e.Host != e.Addr.String() {
		return fmt.Sprintf("%s resolves to %s, a %s address, which is not allowed", e.Host, e.Addr, e.Reason)
	}
	return fmt.Sprintf("%s is a %s address, which is not allowed", e.Addr, e.Reason)
}

// Unwrap makes errors.Is(err, ErrRefused) hold.
func (e *RefusedError) Unwrap() error { return ErrRefused }

// blocked are the ranges refused unless allowed. The order decides the
// reason given for addresses in overlapping ranges.
var blocked = []struct {
	prefix netip.Prefix
	reason string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "unspecified"}, // "this network" (RFC 1122 3.2.1.3); 0.0.0.0 reaches localhost on Linux
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},     // RFC 1918
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},  // RFC 1918
	{netip.MustParsePrefix("192.168.0.0/16"), "private"}, // RFC 1918
	{netip.MustParsePrefix("100.64.0.0/10"), "CGNAT"},    // shared address space of carrier-grade NAT, RFC 6598
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("192.0.0.0/24"), "reserved"},   // IETF protocol assignments, RFC 6890
	{netip.MustParsePrefix("198.18.0.0/15"), "reserved"},  // benchmarking, RFC 2544
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},   // and 255.255.255.255 below
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},    // class E and the broadcast address
	{netip.MustParsePrefix("::/128"), "unspecified"},      //
	{netip.MustParsePrefix("::1/128"), "loopback"},        //
	{netip.MustParsePrefix("fe80::/10"), "link-local"},    //
	{netip.MustParsePrefix("fec0::/10"), "private"},       // site-local, deprecated by RFC 3879 but still routed somewhere
	{netip.MustParsePrefix("fc00::/7"), "private"},        // unique local, RFC 4193
	{netip.MustParsePrefix("ff00::/8"), "multicast"},      //
	{netip.MustParsePrefix("100::/64"), "reserved"},       // discard-only, RFC 6666
	{netip.MustParsePrefix("2001:db8::/32"), "reserved"},  // documentation, RFC 3849
	{netip.MustParsePrefix("::/96"), "reserved"},          // IPv4-compatible, deprecated by RFC 4291
	{netip.MustParsePrefix("2001::/32"), "reserved"},      // Teredo tunnels carry an IPv4 address of their own
	{netip.MustParsePrefix("64:ff9b:1::/48"), "reserved"}, // local-use NAT64, RFC 8215
}

// metadata are the cloud instance metadata services (AWS, GCP, Azure,
// OpenStack and others use 169.254.169.254; AWS also fd00:ec2::254). They
// hand out credentials, so a broad allow-list entry does not open them: only
// an entry that names the address alone (a /32 or /128) does.
var metadata = []netip.Addr{
	netip.MustParseAddr("169.254.169.254"),
	netip.MustParseAddr("fd00:ec2::254"),
}

// nat64 is the well-known NAT64 prefix (RFC 6052): its addresses reach the
// IPv4 address in their last 32 bits, which is checked instead.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// Guard checks addresses against the refused ranges and an allow-list. The
// zero value refuses every range; a Guard is safe for concurrent use and
// never changes after New.
type Guard struct {
	allow []netip.Prefix
}

// New returns a guard that lets addresses within allow through. The
// allow-list is checked before the refused ranges, so 127.0.0.0/8 opens
// loopback, and 0.0.0.0/0 with ::/0 opens everything except the metadata
// services (see CheckAddr).
func New(allow ...netip.Prefix) *Guard {
	g := &Guard{}
	for _, p := range allow {
		g.allow = append(g.allow, p.Masked())
	}
	return g
}

// AllowAll returns the guard of a development setup where every address
// may be reached, private and loopback ones included (but still not the
// metadata services).
func AllowAll() *Guard {
	return New(netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"))
}

// ParsePrefixes parses a list of CIDR prefixes, or single addresses taken
// as /32 or /128, for New.
func ParsePrefixes(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, fmt.Errorf("%q is neither a CIDR prefix nor an IP address", s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, p)
	}
	return out, nil
}

// CheckAddr returns a *RefusedError when addr may not be connected to, nil
// when it may. IPv4 addresses in IPv6 forms (mapped ::ffff:a.b.c.d, NAT64
// 64:ff9b::a.b.c.d) are judged by their IPv4 address, so they cannot
// smuggle a refused one through. The zone of a scoped address is ignored.
func (g *Guard) CheckAddr(addr netip.Addr) error {
	orig := addr
	addr = canonical(addr.WithZone(""))
	if !addr.IsValid() {
		return &RefusedError{Addr: orig, Reason: "invalid"}
	}
	for _, m := range metadata {
		if addr == m && !g.namesExactly(addr) {
			return &RefusedError{Addr: orig, Reason: "cloud metadata"}
		}
	}
	if g.allowed(addr) {
		return nil
	}
	for _, b := range blocked {
		if b.prefix.Contains(addr) {
			return &RefusedError{Addr: orig, Reason: b.reason}
		}
	}
	if addr == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return &RefusedError{Addr: orig, Reason: "broadcast"}
	}
	return nil
}

// canonical unwraps the IPv6 forms that carry an IPv4 address.
func canonical(addr netip.Addr) netip.Addr {
	if addr.Is4In6() {
		return addr.Unmap()
	}
	if addr.Is6() && nat64.Contains(addr) {
		b := addr.As16()
		return netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	}
	return addr
}

func (g *Guard) allowed(addr netip.Addr) bool {
	if g == nil {
		return false
	}
	for _, p := range g.allow {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

func (g *Guard) namesExactly(addr netip.Addr) bool {
	if g == nil {
		return false
	}
	for _, p := range g.allow {
		if p.Bits() == addr.BitLen() && p.Addr() == addr {
			return true
		}
	}
	return false
}

// Resolver is the part of *net.Resolver that CheckHost uses.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// CheckHost checks a host name or literal address. A literal is checked as
// it is; a name is resolved with r (net.DefaultResolver when nil) and
// refused when any of its addresses is refused, since a connection may use
// any of them. A name that does not resolve is not refused: the dial-time
// check still covers it, and an endpoint may be set up before its DNS is.
// The error is a *RefusedError, or nil.
func (g *Guard) CheckHost(ctx context.Context, r Resolver, host string) error {
	if a, err := netip.ParseAddr(host); err == nil {
		return g.CheckAddr(a)
	}
	// RFC 6761 section 6.3: localhost names are loopback whatever a
	// resolver says, and resolvers may not be asked about them at all.
	if h := strings.ToLower(strings.TrimSuffix(host, ".")); h == "localhost" || strings.HasSuffix(h, ".localhost") {
		if err := g.CheckAddr(netip.MustParseAddr("127.0.0.1")); err != nil {
			var re *RefusedError
			if errors.As(err, &re) {
				re.Host = host
			}
			return err
		}
	}
	if r == nil {
		r = net.DefaultResolver
	}
	addrs, err := r.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil
	}
	for _, a := range addrs {
		if err := g.CheckAddr(a); err != nil {
			var re *RefusedError
			if errors.As(err, &re) {
				re.Host = host
			}
			return err
		}
	}
	return nil
}

// Control is a net.Dialer Control function: it runs after the address is
// resolved and before the socket connects, for every address tried, and
// refuses the connection when the guard refuses the address.
func (g *Guard) Control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("netguard: %s address %q: %w", network, address, err)
	}
	return g.CheckAddr(ap.Addr())
}

// Dialer returns a dialer that connects only where the guard allows, with
// the given connect timeout (none when zero).
func (g *Guard) Dialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{Timeout: timeout, Control: g.Control}
}
