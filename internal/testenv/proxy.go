package testenv

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Proxy forwards TCP connections from a loopback port to a server. Stopping
// it plays the server going away: open connections break at once and new
// ones are refused, which is what a client sees when PostgreSQL goes down.
type Proxy struct {
	lis             net.Listener
	network, target string

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	stopped bool

	wg sync.WaitGroup
}

// NewProxy starts a proxy to target on network ("tcp" or "unix"). It is
// stopped when the test ends.
func NewProxy(t testing.TB, network, target string) *Proxy {
	t.Helper()
	return NewProxyOn(t, "127.0.0.1:0", network, target)
}

// NewProxyOn is NewProxy listening on addr, so a test can point a client at
// an address first and bring the server up there later.
func NewProxyOn(t testing.TB, addr, network, target string) *Proxy {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("testenv: proxy listen: %v", err)
	}
	p := &Proxy{lis: lis, network: network, target: target, conns: make(map[net.Conn]struct{})}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.Stop)
	return p
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.lis.Addr().String() }

// Stop closes the listening port and every connection through the proxy,
// and waits for its goroutines. It may be called more than once.
func (p *Proxy) Stop() {
	p.mu.Lock()
	if !p.stopped {
		p.stopped = true
		_ = p.lis.Close()
		for c := range p.conns {
			_ = c.Close()
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.pipe(c)
	}
}

func (p *Proxy) pipe(client net.Conn) {
	defer p.wg.Done()
	server, err := net.DialTimeout(p.network, p.target, 10*time.Second)
	if err != nil {
		_ = client.Close()
		return
	}
	if !p.track(client, server) {
		return
	}
	defer p.untrack(client, server)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(server, client)
		_ = server.Close()
		_ = client.Close()
	}()
	_, _ = io.Copy(client, server)
	_ = client.Close()
	_ = server.Close()
	<-done
}

// track registers a proxied pair, or closes it when the proxy has stopped.
func (p *Proxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		for _, c := range conns {
			_ = c.Close()
		}
		return false
	}
	for _, c := range conns {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Proxy) untrack(conns ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range conns {
		delete(p.conns, c)
	}
}

// ProxiedDatabase returns a new migrated database (see Database): its URL,
// and a second URL that reaches it only through the returned Proxy, so a
// test can take the database away from one client and still look at it
// through the first URL.
func ProxiedDatabase(t testing.TB) (direct, proxied string, p *Proxy) {
	t.Helper()
	direct = Database(t)
	cfg, err := pgconn.ParseConfig(direct)
	if err != nil {
		t.Fatalf("testenv: parse database url: %v", err)
	}
	network, target := "tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
	if strings.HasPrefix(cfg.Host, "/") {
		network, target = "unix", filepath.Join(cfg.Host, fmt.Sprintf(".s.PGSQL.%d", cfg.Port))
	}
	p = NewProxy(t, network, target)
	proxied, err = withHostPort(direct, p.Addr())
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return direct, proxied, p
}

// withHostPort returns the connection string conn pointed at addr
// (host:port) instead of its server.
func withHostPort(conn, addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		u, err := url.Parse(conn)
		if err != nil {
			return "", fmt.Errorf("parse database url: %w", err)
		}
		u.Host = addr
		q := u.Query()
		q.Del("host")
		q.Del("hostaddr")
		q.Del("port")
		u.RawQuery = q.Encode()
		return u.String(), nil
	}
	// In a keyword/value string the last setting of a keyword wins.
	return conn + " host=" + host + " hostaddr=" + host + " port=" + port, nil
}
