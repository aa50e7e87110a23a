package delivery

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/testenv"
)

// TestMain fails the run on leaked goroutines (after stopping an embedded
// PostgreSQL, when the tests started one).
func TestMain(m *testing.M) {
	testenv.Main(m)
}

// mapDialer connects "ip:port" addresses to the loopback servers standing in
// for them, so that several MX hosts can share the configured port. Any
// address without a server is refused; nothing leaves the machine.
type mapDialer struct {
	mu    sync.Mutex
	addrs map[string]string
	dials []string
	// turns counts, over every connection dialed, the times the client
	// went from writing to reading: the round trips it waited for.
	turns atomic.Int64
}

func newMapDialer() *mapDialer {
	return &mapDialer{addrs: make(map[string]string)}
}

// route sends connections for ip:port to the server at real.
func (d *mapDialer) route(ip string, port int, real string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.addrs[net.JoinHostPort(ip, fmt.Sprint(port))] = real
}

func (d *mapDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.dials = append(d.dials, addr)
	real, ok := d.addrs[addr]
	d.mu.Unlock()
	if !ok {
		// Refused as by a closed port, but without dialing one: a loopback
		// port that was closed can be taken by another test's server.
		return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, real)
	if err != nil {
		return nil, err
	}
	return &turnConn{Conn: c, turns: &d.turns}, nil
}

// roundTrips returns the round trips made so far on the connections dialed.
func (d *mapDialer) roundTrips() int64 { return d.turns.Load() }

// turnConn counts a round trip each time a read follows a write: a client
// that pipelines writes several commands, then reads several replies, and
// waits once.
type turnConn struct {
	net.Conn
	turns   *atomic.Int64
	mu      sync.Mutex
	written bool
}

func (c *turnConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.written = true
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// CloseWrite shuts the write side, as *net.TCPConn does.
func (c *turnConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

func (c *turnConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if c.written {
		c.written = false
		c.turns.Add(1)
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

func (d *mapDialer) dialed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.dials...)
}

// testSMTPConfig is an SMTPConfig with timeouts short enough for tests.
func testSMTPConfig() SMTPConfig {
	return SMTPConfig{
		Hostname:       "sender.test",
		Port:           25,
		ConnectTimeout: 2 * time.Second,
		CommandTimeout: 5 * time.Second,
		DataTimeout:    5 * time.Second,
		IdleTimeout:    5 * time.Second,
		MaxReuse:       100,
		MaxHosts:       5,
	}.WithDefaults()
}

// senderEnv is a sender wired to a loopback DNS server and a mapDialer.
type senderEnv struct {
	dns    *testenv.DNSServer
	dialer *mapDialer
	cfg    *SMTPConfig
	pool   *pool
	sender *sender
}

func newSenderEnv(t *testing.T, cfg SMTPConfig, routes map[string]string) *senderEnv {
	t.Helper()
	dns := testenv.StartDNS(t)
	res := newDNSResolver(dns.Addr, "", time.Second, nil)
	rt, err := parseRoutes(routes)
	if err != nil {
		t.Fatal(err)
	}
	dialer := newMapDialer()
	p := newPool(cfg.IdleTimeout, cfg.MaxReuse)
	t.Cleanup(func() { p.close(time.Now().Add(10 * time.Second)) })
	return &senderEnv{
		dns:    dns,
		dialer: dialer,
		cfg:    &cfg,
		pool:   p,
		sender: &sender{
			router:     newRouter(res, rt, cfg.Port, cfg.MaxHosts),
			connector:  &connector{dialer: dialer, cfg: &cfg},
			pool:       p,
			dnsTimeout: 2 * time.Second,
		},
	}
}

// addMX publishes host as an MX of domain at ip and connects ip to srv.
func (e *senderEnv) addMX(domain, host, ip string, pref uint16, srv *testenv.SMTPServer) {
	e.dns.AddMX(domain, host, pref)
	e.dns.AddA(host, ip)
	if srv != nil {
		e.dialer.route(ip, e.cfg.Port, srv.Addr)
	}
}

func (e *senderEnv) attempt(t *testing.T, domain string, to ...string) attemptResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	return e.sender.attempt(ctx, envelope{Domain: domain, From: "bounce@sender.test", To: to, Data: testMessage("hello")})
}

// lastHost returns the last host an attempt tried, failing the test when it
// tried none.
func lastHost(t testing.TB, res attemptResult) hostTry {
	t.Helper()
	if len(res.Hosts) == 0 {
		t.Fatal("no host tried")
	}
	return res.Hosts[len(res.Hosts)-1]
}

// testMessage is a small RFC 5322 message with CRLF line ends.
func testMessage(body string) []byte {
	return []byte(strings.Join([]string{
		"From: sender@sender.test",
		"To: someone@example.test",
		"Subject: test",
		"Message-ID: <" + body + "@sender.test>",
		"",
		body,
		"",
	}, "\r\n"))
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
