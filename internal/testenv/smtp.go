package testenv

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// SMTPServer is a go-smtp server on loopback that records the messages it
// accepts and answers RCPT and DATA by the rules a test gives.
type SMTPServer struct {
	// Addr is "127.0.0.1:port".
	Addr string
	// Host is "127.0.0.1".
	Host string
	// Port is the listening port.
	Port int

	opts smtpOptions
	srv  *smtp.Server
	ln   *trackingListener
	done chan struct{} // closed at cleanup; releases stalled sessions
	wg   sync.WaitGroup

	mu       sync.Mutex
	msgs     []ReceivedMessage
	changed  chan struct{} // closed and replaced when msgs grows
	commands map[string]int
}

// ReceivedMessage is a message the server accepted (250 to DATA).
type ReceivedMessage struct {
	From string
	To   []string
	Data []byte
	// Size is the SIZE parameter of MAIL FROM (RFC 1870), 0 when the client
	// sent none.
	Size int
	// Body is the BODY parameter of MAIL FROM (RFC 6152), "" when the client
	// sent none.
	Body string
	// Helo is the name the client gave in EHLO.
	Helo string
	// TLS reports whether the message came over STARTTLS.
	TLS bool
}

// SMTPOption configures StartSMTP.
type SMTPOption func(*smtpOptions)

type smtpOptions struct {
	mailReply func(from string) *smtp.SMTPError
	rcptReply func(to string) *smtp.SMTPError
	dataReply func(from string, to []string, data []byte) *smtp.SMTPError
	tls       bool
	cert      *tls.Certificate
	brokenTLS bool
	greeting  *smtp.SMTPError
	helo      *smtp.SMTPError
	stall     bool
	maxBytes  int64
	no8bit    bool
	noPipe    bool
	dropData  bool
	hangData  bool
	rcptLimit int
	overLimit *smtp.SMTPError
}

// WithMailReply answers MAIL FROM with f(from); a nil result accepts.
func WithMailReply(f func(from string) *smtp.SMTPError) SMTPOption {
	return func(o *smtpOptions) { o.mailReply = f }
}

// WithoutPipelining leaves PIPELINING (RFC 2920) out of the EHLO reply, as
// an old server would, so that clients wait for each reply. It works on
// plain-text sessions only.
func WithoutPipelining() SMTPOption { return func(o *smtpOptions) { o.noPipe = true } }

// WithRcptReply answers RCPT TO with f(to); a nil result accepts.
func WithRcptReply(f func(to string) *smtp.SMTPError) SMTPOption {
	return func(o *smtpOptions) { o.rcptReply = f }
}

// WithDataReply answers the end of DATA with f(from, to, data); a nil result
// accepts and records the message.
func WithDataReply(f func(from string, to []string, data []byte) *smtp.SMTPError) SMTPOption {
	return func(o *smtpOptions) { o.dataReply = f }
}

// WithTLS offers STARTTLS with a self-signed certificate for 127.0.0.1 and
// localhost, generated in the process.
func WithTLS() SMTPOption { return func(o *smtpOptions) { o.tls = true } }

// WithTLSCertificate offers STARTTLS with cert, such as one a test's own
// certificate authority issued for an MX host name.
func WithTLSCertificate(cert tls.Certificate) SMTPOption {
	return func(o *smtpOptions) { o.tls, o.cert = true, &cert }
}

// WithBrokenTLS offers STARTTLS but fails every handshake.
func WithBrokenTLS() SMTPOption { return func(o *smtpOptions) { o.brokenTLS = true } }

// WithGreeting answers every connection with reply instead of a 220
// greeting, then closes it, like a server that is busy or refuses mail.
func WithGreeting(reply *smtp.SMTPError) SMTPOption {
	return func(o *smtpOptions) { o.greeting = reply }
}

// WithHeloReply answers EHLO and HELO with reply after a normal greeting, as
// a server that refuses the client's name or address would; the connection
// stays open until the client leaves.
func WithHeloReply(reply *smtp.SMTPError) SMTPOption {
	return func(o *smtpOptions) { o.helo = reply }
}

// WithStalledData makes the server stop reading once DATA is accepted, as a
// hung server would; the session is released when the server stops. The
// server's receive buffer is kept small, so a body of several megabytes
// fills the buffers and blocks the client's writes.
func WithStalledData() SMTPOption { return func(o *smtpOptions) { o.stall = true } }

// WithMaxMessageBytes advertises "SIZE n" (RFC 1870) instead of 64 MiB.
func WithMaxMessageBytes(n int64) SMTPOption { return func(o *smtpOptions) { o.maxBytes = n } }

// Without8BitMIME leaves 8BITMIME (RFC 6152) out of the EHLO reply, as an
// old server would; go-smtp always offers it, so the line is cut from what
// the server writes. It works on plain-text sessions only.
func Without8BitMIME() SMTPOption { return func(o *smtpOptions) { o.no8bit = true } }

// WithDropAfterData makes the server read the whole message, then close the
// connection without replying to the end of the data: the client cannot
// know whether the message was taken. Nothing is recorded.
func WithDropAfterData() SMTPOption { return func(o *smtpOptions) { o.dropData = true } }

// WithNoReplyAfterData makes the server read the whole message, end of data
// included, and then never reply, as a server that hangs while it stores
// the message would: the client's wait for the reply runs into its data
// timeout, and whether the message was taken stays unknown. The session is
// released when the server stops. Nothing is recorded.
func WithNoReplyAfterData() SMTPOption { return func(o *smtpOptions) { o.hangData = true } }

// WithRcptLimit answers reply to every RCPT TO of a transaction past the
// first n, as a server enforcing a recipient limit would (RFC 5321 section
// 4.5.3.1.10 names 452 for this; 4.5.3.1.8 requires taking at least 100).
func WithRcptLimit(n int, reply *smtp.SMTPError) SMTPOption {
	return func(o *smtpOptions) { o.rcptLimit, o.overLimit = n, reply }
}

// StartSMTP starts an SMTP server on 127.0.0.1:0 that advertises SIZE and
// stops it in t.Cleanup.
func StartSMTP(t testing.TB, opts ...SMTPOption) *SMTPServer {
	t.Helper()
	s := &SMTPServer{
		done:     make(chan struct{}),
		changed:  make(chan struct{}),
		commands: make(map[string]int),
	}
	for _, o := range opts {
		o(&s.opts)
	}

	srv := smtp.NewServer(smtpBackend{s})
	srv.Domain = "mx.test"
	srv.AllowInsecureAuth = true
	// A limit makes go-smtp advertise it as "SIZE n" (RFC 1870).
	srv.MaxMessageBytes = 64 << 20
	if s.opts.maxBytes > 0 {
		srv.MaxMessageBytes = s.opts.maxBytes
	}
	srv.MaxRecipients = 1000
	srv.ErrorLog = log.New(io.Discard, "", 0)
	srv.Debug = commandCounter{s}
	switch {
	case s.opts.brokenTLS:
		srv.TLSConfig = &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return nil, errors.New("no certificate")
		}}
	case s.opts.cert != nil:
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*s.opts.cert}}
	case s.opts.tls:
		cert, err := selfSignedCert()
		if err != nil {
			t.Fatalf("testenv: certificate: %v", err)
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	s.srv = srv

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: SMTP listen: %v", err)
	}
	s.ln = &trackingListener{Listener: ln, greeting: s.opts.greeting, no8bit: s.opts.no8bit, noPipe: s.opts.noPipe,
		conns: make(map[net.Conn]struct{})}
	if s.opts.stall {
		// A small receive buffer makes a client's body writes block after a
		// few megabytes at most, whatever the system's buffer sizes.
		s.ln.readBuffer = 4096
	}
	addr := ln.Addr().(*net.TCPAddr)
	s.Addr, s.Host, s.Port = addr.String(), addr.IP.String(), addr.Port

	s.wg.Go(func() { srv.Serve(s.ln) })
	t.Cleanup(s.close)
	return s
}

func (s *SMTPServer) close() {
	close(s.done)
	s.ln.Close()
	s.ln.closeConns(true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Shutdown waits for the connection goroutines, which end now that
	// their connections are closed.
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
	s.wg.Wait()
}

// Messages returns the messages accepted so far.
func (s *SMTPServer) Messages() []ReceivedMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]ReceivedMessage(nil), s.msgs...)
}

// WaitMessages waits until at least n messages were accepted and returns
// them; it fails the test after timeout. Call it from the test goroutine.
func (s *SMTPServer) WaitMessages(t testing.TB, n int, timeout time.Duration) []ReceivedMessage {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		msgs, changed := s.msgs, s.changed
		s.mu.Unlock()
		if len(msgs) >= n {
			return append([]ReceivedMessage(nil), msgs...)
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("testenv: %s received %d messages, want %d within %s", s.Addr, len(msgs), n, timeout)
			return nil
		}
	}
}

// Connections returns the number of connections accepted so far.
func (s *SMTPServer) Connections() int {
	s.ln.mu.Lock()
	defer s.ln.mu.Unlock()
	return s.ln.accepted
}

// OpenConnections returns the number of connections open now, and the most
// that were open at once since the server started or ResetMaxOpen. A
// connection counts from its accept until the server closes it.
func (s *SMTPServer) OpenConnections() (now, most int) {
	s.ln.mu.Lock()
	defer s.ln.mu.Unlock()
	return int(s.ln.open.Load()), int(s.ln.maxOpen)
}

// ResetMaxOpen restarts the count of the most connections open at once
// from the number open now.
func (s *SMTPServer) ResetMaxOpen() {
	s.ln.mu.Lock()
	defer s.ln.mu.Unlock()
	s.ln.maxOpen = s.ln.open.Load()
}

// Commands returns how many times clients sent the command verb ("RSET",
// "QUIT", "EHLO", "STARTTLS"...). Lines of message bodies that start with a
// verb are counted too.
func (s *SMTPServer) Commands(verb string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commands[strings.ToUpper(verb)]
}

func (s *SMTPServer) record(m ReceivedMessage) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = append(s.msgs, m)
	close(s.changed)
	s.changed = make(chan struct{})
}

// commandCounter reads go-smtp's debug stream, which carries both
// directions; client commands are the lines that start with a letter, server
// replies start with digits.
type commandCounter struct{ s *SMTPServer }

func (c commandCounter) Write(p []byte) (int, error) {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	for line := range strings.SplitSeq(string(p), "\r\n") {
		verb, _, _ := strings.Cut(line, " ")
		if verb == "" || verb[0] < 'A' || verb[0] > 'z' {
			continue
		}
		c.s.commands[strings.ToUpper(verb)]++
	}
	return len(p), nil
}

// trackingListener counts connections, keeps them for closing at cleanup,
// and answers them with a fixed greeting when one is set.
type trackingListener struct {
	net.Listener
	greeting   *smtp.SMTPError
	readBuffer int
	no8bit     bool
	noPipe     bool

	mu       sync.Mutex
	accepted int
	open     atomic.Int64 // connections accepted and not yet closed
	maxOpen  int64        // the most open at once since the last reset
	conns    map[net.Conn]struct{}
	closed   bool // set at cleanup: connections accepted later are closed
}

// openConn counts itself out of the listener's open connections when the
// server closes it.
type openConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *openConn) Close() error {
	// No lock: the listener closes connections while it holds its own.
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

func (l *trackingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if tc, ok := c.(*net.TCPConn); ok && l.readBuffer > 0 {
			tc.SetReadBuffer(l.readBuffer)
		}
		l.mu.Lock()
		l.accepted++
		l.maxOpen = max(l.maxOpen, l.open.Add(1))
		c = &openConn{Conn: c, l: l}
		if l.closed {
			// Accepted just as the server stopped; closeConns has run.
			l.mu.Unlock()
			c.Close()
			continue
		}
		l.conns[c] = struct{}{}
		l.mu.Unlock()
		if l.greeting == nil {
			if l.no8bit || l.noPipe {
				return cutCapsConn{Conn: c, no8bit: l.no8bit, noPipe: l.noPipe}, nil
			}
			return c, nil
		}
		fmt.Fprintf(c, "%s\r\n", replyLine(l.greeting))
		c.Close()
	}
}

// cutCapsConn cuts the 8BITMIME or PIPELINING lines out of EHLO replies.
// go-smtp writes a whole reply in one Write, so a line is never split
// between two, and neither is ever the last line of the reply.
type cutCapsConn struct {
	net.Conn
	no8bit, noPipe bool
}

func (c cutCapsConn) Write(p []byte) (int, error) {
	out := p
	if c.no8bit {
		out = bytes.ReplaceAll(out, []byte("250-8BITMIME\r\n"), nil)
	}
	if c.noPipe {
		out = bytes.ReplaceAll(out, []byte("250-PIPELINING\r\n"), nil)
	}
	if _, err := c.Conn.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// DropConnections closes the server's side of every open connection, as a
// server that restarts or drops idle clients would.
func (s *SMTPServer) DropConnections() { s.ln.closeConns(false) }

// closeConns closes the open connections; with final set, also those
// accepted later.
func (l *trackingListener) closeConns(final bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = l.closed || final
	for c := range l.conns {
		c.Close()
		delete(l.conns, c)
	}
}

// replyLine formats a one-line reply, with the enhanced code when it has one
// of the classes RFC 3463 defines.
func replyLine(r *smtp.SMTPError) string {
	ec := r.EnhancedCode
	switch ec[0] {
	case 2, 4, 5:
		return fmt.Sprintf("%d %d.%d.%d %s", r.Code, ec[0], ec[1], ec[2], r.Message)
	}
	return fmt.Sprintf("%d %s", r.Code, r.Message)
}

type smtpBackend struct{ s *SMTPServer }

// NewSession runs when the client sends EHLO or HELO; an error is the reply.
func (b smtpBackend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	if reply := b.s.opts.helo; reply != nil {
		return nil, reply
	}
	_, isTLS := c.TLSConnectionState()
	return &smtpSession{s: b.s, conn: c, helo: c.Hostname(), tls: isTLS}, nil
}

type smtpSession struct {
	s    *SMTPServer
	conn *smtp.Conn
	helo string
	tls  bool
	from string
	size int
	body string
	to   []string
}

func (ss *smtpSession) Reset() {
	ss.from, ss.size, ss.body, ss.to = "", 0, "", nil
}

func (ss *smtpSession) Logout() error { return nil }

func (ss *smtpSession) Mail(from string, opts *smtp.MailOptions) error {
	if f := ss.s.opts.mailReply; f != nil {
		if reply := f(from); reply != nil {
			return reply
		}
	}
	ss.from = from
	ss.size, ss.body = 0, ""
	if opts != nil {
		ss.size, ss.body = int(opts.Size), string(opts.Body)
	}
	return nil
}

func (ss *smtpSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if o := ss.s.opts; o.overLimit != nil && len(ss.to) >= o.rcptLimit {
		return o.overLimit
	}
	if f := ss.s.opts.rcptReply; f != nil {
		// A nil *SMTPError must not become a non-nil error.
		if reply := f(to); reply != nil {
			return reply
		}
	}
	ss.to = append(ss.to, to)
	return nil
}

func (ss *smtpSession) Data(r io.Reader) error {
	if ss.s.opts.stall {
		<-ss.s.done
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "shutting down"}
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if ss.s.opts.hangData {
		<-ss.s.done
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "shutting down"}
	}
	if ss.s.opts.dropData {
		ss.conn.Conn().Close()
		return errors.New("connection dropped")
	}
	to := append([]string(nil), ss.to...)
	if f := ss.s.opts.dataReply; f != nil {
		if reply := f(ss.from, to, data); reply != nil {
			return reply
		}
	}
	ss.s.record(ReceivedMessage{From: ss.from, To: to, Data: bytes.Clone(data), Size: ss.size, Body: ss.body, Helo: ss.helo, TLS: ss.tls})
	return nil
}

// selfSignedCert makes a certificate for 127.0.0.1, ::1 and localhost.
func selfSignedCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
