package bounce

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"
)

// received is one Handler call.
type received struct {
	token  Token
	report Report
}

// recorder is a Handler that records its calls and fails while err is set.
type recorder struct {
	mu    sync.Mutex
	calls []received
	err   error
}

func (r *recorder) HandleReport(_ context.Context, token Token, report Report) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return r.err
	}
	r.calls = append(r.calls, received{token, report})
	return nil
}

func (r *recorder) got() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.calls...)
}

// listenerEnv is a started listener on loopback with its codec and handler.
type listenerEnv struct {
	l    *Listener
	verp *VERP
	rec  *recorder
}

func startListener(t *testing.T, mod func(*Config)) *listenerEnv {
	t.Helper()
	v := newTestVERP(t)
	rec := &recorder{}
	cfg := Config{Addr: "127.0.0.1:0", VERP: v, Handler: rec, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	l := New(cfg)
	if err := l.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Stop)
	return &listenerEnv{l: l, verp: v, rec: rec}
}

func dial(t *testing.T, addr string) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Hello("mta.example.test"); err != nil {
		t.Fatal(err)
	}
	return c
}

// send runs one transaction from the null sender and returns the first
// error, as the sending MTA would see it.
func send(c *smtp.Client, to []string, msg []byte) error {
	if err := c.Mail("", nil); err != nil {
		return err
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return err
		}
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write(msg); err != nil {
		return err
	}
	return w.Close()
}

func assertSMTPError(t *testing.T, err error, code int, enhanced smtp.EnhancedCode) {
	t.Helper()
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		t.Fatalf("err = %v, want an SMTP reply %d", err, code)
	}
	if se.Code != code || se.EnhancedCode != enhanced {
		t.Fatalf("reply %d %v %q, want %d %v", se.Code, se.EnhancedCode, se.Message, code, enhanced)
	}
}

func TestListenerAcceptsReport(t *testing.T) {
	t.Parallel()
	env := startListener(t, nil)
	c := dial(t, env.l.Addr())
	to := env.verp.Address(testMsgID, RecipientAt(4))
	if err := send(c, []string{to}, readFixture(t, "postfix_dsn.eml")); err != nil {
		t.Fatalf("send: %v", err)
	}
	// The reply to DATA comes after the handler returned, so the call is
	// recorded by now.
	calls := env.rec.got()
	if len(calls) != 1 {
		t.Fatalf("%d handler calls, want 1", len(calls))
	}
	got := calls[0]
	if got.token != (Token{Message: testMsgID, Recipient: RecipientAt(4)}) {
		t.Fatalf("token %+v", got.token)
	}
	if got.report.Kind != KindDSN || len(got.report.Recipients) != 1 || got.report.Recipients[0].Status != "5.1.1" {
		t.Fatalf("report %+v", got.report)
	}
}

func TestListenerAcceptsLowerCasedAndSeveralTokens(t *testing.T) {
	t.Parallel()
	env := startListener(t, nil)
	c := dial(t, env.l.Addr())
	other := uuid.MustParse("0190f1a2-0000-7000-8000-000000000001")
	to := []string{
		strings.ToUpper(env.verp.Address(testMsgID, RecipientRef{})),
		env.verp.Address(other, RecipientAt(0)),
	}
	if err := send(c, to, readFixture(t, "outlook_ooo.eml")); err != nil {
		t.Fatalf("send: %v", err)
	}
	calls := env.rec.got()
	if len(calls) != 2 || calls[0].token.Message != testMsgID || calls[1].token.Message != other {
		t.Fatalf("calls %+v", calls)
	}
	for _, call := range calls {
		if call.report.Kind != KindAutoReply {
			t.Fatalf("kind %s, want auto_reply", call.report.Kind)
		}
	}
}

func TestListenerRefusesRecipients(t *testing.T) {
	t.Parallel()
	env := startListener(t, nil)
	good := env.verp.Address(testMsgID, RecipientAt(1))
	local, _, _ := strings.Cut(good, "@")
	forger := newTestVERP(t, []byte("a secret the forger made up here"))
	tests := []struct {
		name     string
		to       string
		code     int
		enhanced smtp.EnhancedCode
	}{
		{"other domain", "someone@example.test", 550, smtp.EnhancedCode{5, 7, 1}},
		{"valid token at other domain", local + "@example.test", 550, smtp.EnhancedCode{5, 7, 1}},
		{"postmaster of other domain", "postmaster@example.test", 550, smtp.EnhancedCode{5, 7, 1}},
		{"forged token", forger.Address(testMsgID, RecipientAt(1)), 550, smtp.EnhancedCode{5, 1, 1}},
		{"guessed token", "b+" + strings.Repeat("a", 50) + "@bounces.example.test", 550, smtp.EnhancedCode{5, 1, 1}},
		{"no token", "info@bounces.example.test", 550, smtp.EnhancedCode{5, 1, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := dial(t, env.l.Addr())
			if err := c.Mail("", nil); err != nil {
				t.Fatal(err)
			}
			assertSMTPError(t, c.Rcpt(tt.to, nil), tt.code, tt.enhanced)
			// Nothing was accepted, so DATA has no recipient.
			if _, err := c.Data(); err == nil {
				t.Fatal("DATA accepted without a recipient")
			}
		})
	}
	if n := len(env.rec.got()); n != 0 {
		t.Fatalf("%d handler calls, want none", n)
	}
}

func TestListenerHandlerErrorDefers(t *testing.T) {
	t.Parallel()
	env := startListener(t, nil)
	env.rec.err = errors.New("database unavailable")
	c := dial(t, env.l.Addr())
	err := send(c, []string{env.verp.Address(testMsgID, RecipientRef{})}, readFixture(t, "gmail_dsn.eml"))
	assertSMTPError(t, err, 451, smtp.EnhancedCode{4, 3, 0})

	// The sending MTA retries and the handler now succeeds.
	env.rec.mu.Lock()
	env.rec.err = nil
	env.rec.mu.Unlock()
	if err := send(c, []string{env.verp.Address(testMsgID, RecipientRef{})}, readFixture(t, "gmail_dsn.eml")); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if n := len(env.rec.got()); n != 1 {
		t.Fatalf("%d handler calls, want 1", n)
	}
}

func TestListenerMessageTooBig(t *testing.T) {
	t.Parallel()
	env := startListener(t, func(c *Config) { c.MaxMessageBytes = 4 << 10 })
	c := dial(t, env.l.Addr())
	if size, ok := c.MaxMessageSize(); !ok || size != 4<<10 {
		t.Fatalf("SIZE = %d %v, want 4096", size, ok)
	}
	msg := append(readFixture(t, "qmail.eml"), []byte(strings.Repeat("padding line\r\n", 1000))...)
	err := send(c, []string{env.verp.Address(testMsgID, RecipientRef{})}, msg)
	assertSMTPError(t, err, 552, smtp.EnhancedCode{5, 3, 4})
	if n := len(env.rec.got()); n != 0 {
		t.Fatalf("%d handler calls, want none", n)
	}
}

func TestListenerMaxRecipients(t *testing.T) {
	t.Parallel()
	env := startListener(t, func(c *Config) { c.MaxRecipients = 1 })
	c := dial(t, env.l.Addr())
	if err := c.Mail("", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt(env.verp.Address(testMsgID, RecipientRef{}), nil); err != nil {
		t.Fatal(err)
	}
	assertSMTPError(t, c.Rcpt(env.verp.Address(testMsgID, RecipientAt(1)), nil), 452, smtp.EnhancedCode{4, 5, 3})
}

func TestListenerMaxConnections(t *testing.T) {
	t.Parallel()
	env := startListener(t, func(c *Config) { c.MaxConnections = 1 })
	first := dial(t, env.l.Addr()) // greeted: holds the one slot
	_ = first

	conn, err := net.Dial("tcp", env.l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !strings.HasPrefix(line, "421 4.7.0 ") {
		t.Fatalf("second connection got %q, want 421 4.7.0", line)
	}

	// Once the first connection ends, a new one is served. The slot is
	// freed when the server sees the close, so poll with a deadline.
	if err := first.Quit(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := smtp.Dial(env.l.Addr())
		if err == nil {
			_ = c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection served after the first closed: %v", err)
		}
	}
}

func TestListenerIdleTimeout(t *testing.T) {
	t.Parallel()
	env := startListener(t, func(c *Config) { c.ReadTimeout = 200 * time.Millisecond })
	conn, err := net.Dial("tcp", env.l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	greeting, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(greeting, "220 bounces.example.test ") {
		t.Fatalf("greeting %q, %v", greeting, err)
	}
	// Say nothing: the server gives up on its own.
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "421 4.4.2") {
		t.Fatalf("got %q, %v; want 421 4.4.2 idle timeout", line, err)
	}
}

func TestListenerStartTLS(t *testing.T) {
	t.Parallel()
	cert, pool := testCertificate(t, "bounces.example.test")
	env := startListener(t, func(c *Config) { c.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}} })
	conn, err := net.Dial("tcp", env.l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	// NewClientStartTLS says EHLO, checks that STARTTLS is offered and
	// runs it.
	c, err := smtp.NewClientStartTLS(conn, &tls.Config{RootCAs: pool, ServerName: "bounces.example.test"})
	if err != nil {
		_ = conn.Close()
		t.Fatalf("STARTTLS: %v", err)
	}
	defer c.Close()
	if _, ok := c.TLSConnectionState(); !ok {
		t.Fatal("no TLS after STARTTLS")
	}
	if err := send(c, []string{env.verp.Address(testMsgID, RecipientRef{})}, readFixture(t, "yahoo_arf.eml")); err != nil {
		t.Fatalf("send over TLS: %v", err)
	}
	if calls := env.rec.got(); len(calls) != 1 || calls[0].report.Kind != KindComplaint {
		t.Fatalf("calls %+v", calls)
	}
}

func TestListenerWithoutTLSOffersNoSTARTTLS(t *testing.T) {
	t.Parallel()
	env := startListener(t, nil)
	c := dial(t, env.l.Addr())
	if ok, _ := c.Extension("STARTTLS"); ok {
		t.Fatal("STARTTLS offered without a certificate")
	}
	if ok, _ := c.Extension("AUTH"); ok {
		t.Fatal("AUTH offered: the listener has no users")
	}
}

func TestListenerStopCancelsHandler(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{})
	canceled := make(chan struct{})
	h := HandlerFunc(func(ctx context.Context, _ Token, _ Report) error {
		close(entered)
		<-ctx.Done()
		close(canceled)
		return ctx.Err()
	})
	v := newTestVERP(t)
	l := New(Config{Addr: "127.0.0.1:0", VERP: v, Handler: h})
	if err := l.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	c := dial(t, l.Addr())
	sendErr := make(chan error, 1)
	go func() {
		sendErr <- send(c, []string{v.Address(testMsgID, RecipientRef{})}, readFixture(t, "exim_text.eml"))
	}()
	<-entered
	l.Stop()
	<-canceled
	if err := <-sendErr; err == nil {
		t.Fatal("the sender was told the report was taken")
	}
	l.Stop() // idempotent
	if err := l.Start(t.Context()); err == nil {
		t.Fatal("Start after Stop succeeded")
	}
}

func TestListenerLifecycle(t *testing.T) {
	t.Parallel()
	t.Run("stop before start", func(t *testing.T) {
		l := New(Config{Addr: "127.0.0.1:0", VERP: newTestVERP(t), Handler: &recorder{}})
		l.Stop()
		l.Stop()
		if l.Addr() != "" {
			t.Fatal("address before start")
		}
	})
	t.Run("start twice", func(t *testing.T) {
		env := startListener(t, nil)
		if err := env.l.Start(t.Context()); err == nil {
			t.Fatal("second Start succeeded")
		}
	})
	t.Run("defaults", func(t *testing.T) {
		cfg := Config{VERP: newTestVERP(t)}.WithDefaults()
		if cfg.Addr != ":2525" || cfg.Domain != "bounces.example.test" || cfg.MaxMessageBytes != 1<<20 ||
			cfg.MaxConnections != 100 || cfg.MaxRecipients != 10 || cfg.ReadTimeout != time.Minute ||
			cfg.WriteTimeout != time.Minute || cfg.HandlerTimeout != 30*time.Second || cfg.Logger == nil {
			t.Fatalf("defaults %+v", cfg)
		}
	})
}

func TestListenerConfigValidation(t *testing.T) {
	t.Parallel()
	v := newTestVERP(t)
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"bad addr", Config{Addr: "nope", VERP: v, Handler: &recorder{}}, "Addr:"},
		{"no verp", Config{Addr: "127.0.0.1:0", Handler: &recorder{}}, "VERP:"},
		{"no handler", Config{Addr: "127.0.0.1:0", VERP: v}, "Handler:"},
		{"negative size", Config{Addr: "127.0.0.1:0", VERP: v, Handler: &recorder{}, MaxMessageBytes: -1}, "MaxMessageBytes:"},
		{"negative connections", Config{Addr: "127.0.0.1:0", VERP: v, Handler: &recorder{}, MaxConnections: -1}, "MaxConnections:"},
		{"tls without certificate", Config{Addr: "127.0.0.1:0", VERP: v, Handler: &recorder{}, TLSConfig: &tls.Config{}}, "TLSConfig:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := New(tt.cfg)
			err := l.Start(t.Context())
			l.Stop()
			if err == nil || !strings.Contains(err.Error(), "config: "+tt.want) {
				t.Fatalf("err = %v, want one about %s", err, tt.want)
			}
		})
	}
}

// testCertificate makes a self-signed certificate for host and a pool that
// trusts it.
func testCertificate(t *testing.T, host string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: host},
		DNSNames:              []string{host},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
