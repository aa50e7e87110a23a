package netguard_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/posthaste/posthaste/internal/netguard"
)

func TestCheckAddr(t *testing.T) {
	t.Parallel()
	loopback := netguard.New(netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128"))
	tests := []struct {
		addr   string
		guard  *netguard.Guard
		reason string // "" means allowed
	}{
		{"93.184.215.14", nil, ""},
		{"2606:2800:21f:cb07:6820:80da:af6b:8b2c", nil, ""},
		{"127.0.0.1", nil, "loopback"},
		{"127.9.9.9", nil, "loopback"},
		{"::1", nil, "loopback"},
		{"0.0.0.0", nil, "unspecified"},
		{"::", nil, "unspecified"},
		{"10.1.2.3", nil, "private"},
		{"172.16.0.1", nil, "private"},
		{"172.31.255.255", nil, "private"},
		{"172.32.0.1", nil, ""},
		{"192.168.1.1", nil, "private"},
		{"100.64.0.1", nil, "CGNAT"},
		{"fd12:3456::1", nil, "private"},
		{"169.254.1.1", nil, "link-local"},
		{"fe80::1", nil, "link-local"},
		{"fe80::1%eth0", nil, "link-local"},
		{"169.254.169.254", nil, "cloud metadata"},
		{"fd00:ec2::254", nil, "cloud metadata"},
		{"224.0.0.1", nil, "multicast"},
		{"ff02::1", nil, "multicast"},
		{"255.255.255.255", nil, "reserved"},
		// IPv4 in IPv6 clothing is judged as IPv4.
		{"::ffff:127.0.0.1", nil, "loopback"},
		{"::ffff:10.0.0.1", nil, "private"},
		{"::ffff:169.254.169.254", nil, "cloud metadata"},
		{"64:ff9b::7f00:1", nil, "loopback"},
		{"64:ff9b::5db8:d70e", nil, ""},
		{"::127.0.0.1", nil, "reserved"},
		// The allow-list opens what it names, and nothing else.
		{"127.0.0.1", loopback, ""},
		{"::ffff:127.0.0.1", loopback, ""},
		{"::1", loopback, ""},
		{"10.0.0.1", loopback, "private"},
		// Allowing everything still keeps the metadata service closed,
		// unless it is named on its own.
		{"10.0.0.1", netguard.AllowAll(), ""},
		{"169.254.169.254", netguard.AllowAll(), "cloud metadata"},
		{"169.254.169.254", netguard.New(netip.MustParsePrefix("169.254.169.254/32")), ""},
	}
	for _, tt := range tests {
		name := tt.addr
		if tt.guard != nil {
			name += " allowed-list"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			g := tt.guard
			if g == nil {
				g = netguard.New()
			}
			err := g.CheckAddr(netip.MustParseAddr(tt.addr))
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("CheckAddr(%s) = %v, want allowed", tt.addr, err)
				}
				return
			}
			var re *netguard.RefusedError
			if !errors.As(err, &re) || re.Reason != tt.reason || !errors.Is(err, netguard.ErrRefused) {
				t.Fatalf("CheckAddr(%s) = %v, want refused as %s", tt.addr, err, tt.reason)
			}
		})
	}
}

// fakeResolver answers every name with the same addresses.
type fakeResolver []netip.Addr

func (f fakeResolver) LookupNetIP(context.Context, string, string) ([]netip.Addr, error) {
	if len(f) == 0 {
		return nil, &net.DNSError{Err: "no such host", IsNotFound: true}
	}
	return f, nil
}

func TestCheckHost(t *testing.T) {
	t.Parallel()
	g := netguard.New()
	public, private := netip.MustParseAddr("93.184.215.14"), netip.MustParseAddr("10.0.0.7")
	if err := g.CheckHost(t.Context(), fakeResolver{public}, "hooks.example.test"); err != nil {
		t.Errorf("public name: %v", err)
	}
	// One refused address among several is enough: a connection may use it.
	err := g.CheckHost(t.Context(), fakeResolver{public, private}, "hooks.example.test")
	if !errors.Is(err, netguard.ErrRefused) || !strings.Contains(err.Error(), "hooks.example.test resolves to 10.0.0.7") {
		t.Errorf("name resolving to a private address: %v", err)
	}
	if err := g.CheckHost(t.Context(), fakeResolver{}, "nowhere.invalid"); err != nil {
		t.Errorf("a name that does not resolve is left to the dial-time check, got %v", err)
	}
	// localhost names are loopback whatever the resolver says (RFC 6761).
	for _, h := range []string{"localhost", "LOCALHOST.", "app.localhost"} {
		if err := g.CheckHost(t.Context(), fakeResolver{public}, h); !errors.Is(err, netguard.ErrRefused) {
			t.Errorf("%s: %v, want refused", h, err)
		}
	}
	if err := g.CheckHost(t.Context(), fakeResolver{public}, "127.0.0.1"); !errors.Is(err, netguard.ErrRefused) {
		t.Errorf("literal loopback: %v", err)
	}
}

// The dialer refuses at connect time, whatever the name resolved to.
func TestDialerRefusesAtConnect(t *testing.T) {
	t.Parallel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, err = netguard.New().Dialer(0).DialContext(t.Context(), "tcp", lis.Addr().String())
	if !errors.Is(err, netguard.ErrRefused) {
		t.Fatalf("dial loopback with the default guard: %v, want refused", err)
	}
	c, err := netguard.New(netip.MustParsePrefix("127.0.0.0/8")).Dialer(0).DialContext(t.Context(), "tcp", lis.Addr().String())
	if err != nil {
		t.Fatalf("dial loopback when allowed: %v", err)
	}
	c.Close()
}

func TestParsePrefixes(t *testing.T) {
	t.Parallel()
	got, err := netguard.ParsePrefixes([]string{"10.0.0.0/8", "192.168.1.5", "::1"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.168.1.5/32", "::1/128"}
	for i, p := range got {
		if p.String() != want[i] {
			t.Errorf("prefix %d = %s, want %s", i, p, want[i])
		}
	}
	if _, err := netguard.ParsePrefixes([]string{"nope"}); err == nil {
		t.Error("ParsePrefixes accepted a bad entry")
	}
}
