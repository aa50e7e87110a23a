package delivery

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/testenv"
)

func TestPoolReusesConnection(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithTLS())
	e.addMX("reuse.test", "mx.reuse.test", "192.0.2.1", 10, srv)

	for i := range 3 {
		res := e.attempt(t, "reuse.test", "a@reuse.test")
		if res.Rcpts[0].Err != nil {
			t.Fatalf("attempt %d: %v", i, res.Rcpts[0].Err)
		}
		if !lastHost(t, res).TLS {
			t.Fatalf("attempt %d: reused connection lost its TLS state", i)
		}
	}
	if n := srv.Connections(); n != 1 {
		t.Fatalf("%d connections, want 1", n)
	}
	if n := len(srv.Messages()); n != 3 {
		t.Fatalf("%d messages, want 3", n)
	}
	// RSET before each reuse, and no EHLO beyond the two of the TLS
	// handshake.
	if n := srv.Commands("RSET"); n != 2 {
		t.Fatalf("%d RSET, want 2", n)
	}
	if n := srv.Commands("EHLO"); n != 2 {
		t.Fatalf("%d EHLO, want 2", n)
	}
}

func TestPoolDialsAfreshWhenRSETFails(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t)
	e.addMX("drop.test", "mx.drop.test", "192.0.2.1", 10, srv)

	if res := e.attempt(t, "drop.test", "a@drop.test"); res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	srv.DropConnections()
	if res := e.attempt(t, "drop.test", "a@drop.test"); res.Rcpts[0].Err != nil {
		t.Fatalf("after the server dropped the idle connection: %v", res.Rcpts[0].Err)
	}
	if n := srv.Connections(); n != 2 {
		t.Fatalf("%d connections, want 2", n)
	}
	if n := len(srv.Messages()); n != 2 {
		t.Fatalf("%d messages, want 2", n)
	}
}

func TestPoolIdleTimeoutSendsQUIT(t *testing.T) {
	t.Parallel()
	cfg := testSMTPConfig()
	cfg.IdleTimeout = 50 * time.Millisecond
	e := newSenderEnv(t, cfg, nil)
	srv := testenv.StartSMTP(t)
	e.addMX("idle.test", "mx.idle.test", "192.0.2.1", 10, srv)

	if res := e.attempt(t, "idle.test", "a@idle.test"); res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	waitFor(t, 5*time.Second, "QUIT after the idle timeout", func() bool { return srv.Commands("QUIT") == 1 })
	if n := e.pool.idleCount(); n != 0 {
		t.Fatalf("%d idle connections after the timeout", n)
	}
	if res := e.attempt(t, "idle.test", "a@idle.test"); res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	if n := srv.Connections(); n != 2 {
		t.Fatalf("%d connections, want a fresh one after the idle timeout", n)
	}
}

func TestPoolMaxReuse(t *testing.T) {
	t.Parallel()
	cfg := testSMTPConfig()
	cfg.MaxReuse = 2
	e := newSenderEnv(t, cfg, nil)
	srv := testenv.StartSMTP(t)
	e.addMX("worn.test", "mx.worn.test", "192.0.2.1", 10, srv)

	for i := range 3 {
		if res := e.attempt(t, "worn.test", "a@worn.test"); res.Rcpts[0].Err != nil {
			t.Fatalf("attempt %d: %v", i, res.Rcpts[0].Err)
		}
	}
	if n := srv.Connections(); n != 2 {
		t.Fatalf("%d connections, want 2 for 3 transactions at 2 per connection", n)
	}
	waitFor(t, 5*time.Second, "QUIT on the worn-out connection", func() bool { return srv.Commands("QUIT") == 1 })
}

func TestPoolCloseSendsQUIT(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t)
	e.addMX("close.test", "mx.close.test", "192.0.2.1", 10, srv)
	if res := e.attempt(t, "close.test", "a@close.test"); res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	e.pool.close(time.Now().Add(time.Minute))
	if n := srv.Commands("QUIT"); n != 1 {
		t.Fatalf("%d QUIT after close, want 1", n)
	}
	// A connection given back after close is closed at once.
	if res := e.attempt(t, "close.test", "a@close.test"); res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	e.pool.close(time.Now().Add(time.Minute))
	if n := e.pool.idleCount(); n != 0 {
		t.Fatalf("%d idle connections after close", n)
	}
	if n := srv.Commands("QUIT"); n != 2 {
		t.Fatalf("%d QUIT, want 2", n)
	}
}

// TestPoolCloseCutsOffUnansweredQUIT checks that close does not wait past
// its deadline for a server that never answers QUIT.
func TestPoolCloseCutsOffUnansweredQUIT(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv := scriptedServer(t, func(cmd string) string {
		if strings.EqualFold(cmd, "QUIT") {
			<-release
		}
		return ""
	}, "250-mx.test", "250 8BITMIME")
	t.Cleanup(func() { close(release) }) // runs before the server's cleanup
	cfg := testSMTPConfig()
	cfg.CommandTimeout = time.Minute // QUIT would wait quitTimeout
	e := newSenderEnv(t, cfg, nil)
	e.addMX("silent.test", "mx.silent.test", "192.0.2.1", 10, nil)
	e.dialer.route("192.0.2.1", 25, srv.addr)
	if res := e.attempt(t, "silent.test", "a@silent.test"); res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	if e.pool.idleCount() != 1 {
		t.Fatal("connection not pooled")
	}

	closed := make(chan struct{})
	go func() {
		e.pool.close(time.Now().Add(500 * time.Millisecond))
		close(closed)
	}()
	waitFor(t, 5*time.Second, "QUIT", func() bool { return slices.Contains(srv.commands(), "QUIT") })
	select {
	case <-closed:
	case <-time.After(quitTimeout / 2):
		t.Fatal("close still waiting for the reply to QUIT past its deadline")
	}
}

func TestPoolPrefersIdleConnectionAmongEqualMX(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	a := testenv.StartSMTP(t)
	b := testenv.StartSMTP(t)
	e.addMX("pair.test", "a.pair.test", "192.0.2.1", 10, a)
	e.addMX("pair.test", "b.pair.test", "192.0.2.2", 10, b)

	for i := range 10 {
		if res := e.attempt(t, "pair.test", "x@pair.test"); res.Rcpts[0].Err != nil {
			t.Fatalf("attempt %d: %v", i, res.Rcpts[0].Err)
		}
	}
	if n := a.Connections() + b.Connections(); n != 1 {
		t.Fatalf("%d connections across two equal MX hosts, want 1", n)
	}
}
