package delivery

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/delivery/message"
)

// Dialer opens network connections. *net.Dialer implements it; another
// implementation can bind a source address or route through a proxy.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// smtpConn is one SMTP connection, past the greeting, EHLO and (when the
// server offered it) STARTTLS, ready for transactions.
type smtpConn struct {
	target     target
	raw        net.Conn // the TCP connection; deadlines set here reach through TLS
	conn       net.Conn // what the client talks to: raw, or TLS over raw
	client     *smtp.Client
	tls        bool
	tlsVersion string // "TLS 1.3"; "" without TLS
	tlsCipher  string // "TLS_AES_128_GCM_SHA256"; "" without TLS
	// verifyErr is why the server's certificate did not verify, nil when
	// it did (or without TLS).
	verifyErr error
	// noTLS says why a session without TLS has none when the server
	// offered STARTTLS: it refused the command, or the handshake failed
	// and the session was opened again in plain text.
	noTLS string
	// triedTLS reports that STARTTLS was used if offered.
	triedTLS bool
	uses     int  // transactions started on this connection
	broken   bool // unusable for another transaction
	// reused marks a connection taken from the pool: when the server
	// pipelines, its RSET goes out with the next transaction's commands.
	reused bool
	cfg    *SMTPConfig
	obs    Observer // nil: nothing is told

	// The reader and writer of pipelined transactions, on pipeOn.
	pipeOn net.Conn
	pipeR  *textproto.Reader
	pipeW  *bufio.Writer

	idle *time.Timer // set while the connection waits in the pool
}

// connector opens SMTP connections. The dialer is injected.
type connector struct {
	dialer Dialer
	cfg    *SMTPConfig
	obs    Observer // nil: nothing is told
	// provider names the provider of an MX host for the observer, from the
	// traffic-shaping table, so that metrics and limits agree on it; nil
	// names every host "other".
	provider func(mxHost string) string
}

// providerOf names the provider of host, "other" when it has none.
func (c *connector) providerOf(host string) string {
	if c.provider == nil {
		return "other"
	}
	return c.provider(host)
}

// errTLSHandshake marks a failed TLS handshake, after which a connection in
// plain text may still be possible.
type errTLSHandshake struct{ err error }

func (e *errTLSHandshake) Error() string { return "TLS handshake: " + e.err.Error() }
func (e *errTLSHandshake) Unwrap() error { return e.err }

// dial connects to t under the TLS policy req. By default TLS is
// opportunistic, as RFC 3207 section 4 and RFC 7435 describe for
// server-to-server mail: STARTTLS is used when offered, and when the
// handshake fails the connection is retried in plain text (a server that
// fails TLS would otherwise defer our mail forever). A policy that requires
// TLS or a verified certificate gets no fallback: it would let anyone who
// can break the handshake disable it. A session that does not meet such a
// policy is ended and the host refused with the policy's reply; under an
// MTA-STS policy in testing mode it is used, and the failure recorded.
func (c *connector) dial(ctx context.Context, t target, req tlsRequirement) (*smtpConn, error) {
	sc, err := c.open(ctx, t, req.startTLS())
	if err != nil {
		he, ok := errors.AsType[*errTLSHandshake](err)
		switch {
		case !ok || ctx.Err() != nil:
			return nil, err
		case !req.plainFallback():
			return nil, req.refuse("4.7.5", fmt.Sprintf("TLS handshake with %s failed: %v", t.Host, he.err))
		}
		if sc, err = c.open(ctx, t, false); err != nil {
			return nil, err
		}
		sc.noTLS = "TLS handshake failed: " + he.err.Error()
	}
	sc.triedTLS = req.startTLS()
	if enhanced, reason := req.check(sc); reason != "" && req.policy != TLSMTASTSTesting {
		sc.quit()
		return nil, req.refuse(enhanced, reason)
	}
	return sc, nil
}

func (c *connector) open(ctx context.Context, t target, useTLS bool) (sc *smtpConn, err error) {
	obs := c.observer()
	dctx, cancel := context.WithTimeout(ctx, c.cfg.ConnectTimeout)
	step := time.Now()
	raw, err := c.dialer.DialContext(dctx, "tcp", t.addr())
	cancel()
	if err != nil {
		return nil, fmt.Errorf("connect to %s [%s]: %w", t.Host, t.addr(), err)
	}
	obs.SessionStep("connect", time.Since(step))
	raw = &countedConn{Conn: raw, closed: obs.ConnectionOpened(c.providerOf(t.Host))}
	// go-smtp's client takes no context: closing the connection is how a
	// cancelled context interrupts a blocked read or write.
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer func() {
		if !stop() && err == nil {
			err = fmt.Errorf("connect to %s [%s]: %w", t.Host, t.addr(), context.Cause(ctx))
		}
		if err != nil {
			raw.Close()
			sc = nil
		}
	}()

	sc = &smtpConn{target: t, raw: raw, conn: raw, cfg: c.cfg, obs: obs}
	sc.client = c.newClient(raw)
	// Hello reads the greeting, then sends EHLO; any reply but 220 to the
	// greeting is an error here, and the caller moves on to the next host.
	step = time.Now()
	if err := sc.client.Hello(c.cfg.Hostname); err != nil {
		sc.abandon(err)
		return nil, fmt.Errorf("greeting from %s [%s]: %w", t.Host, t.addr(), err)
	}
	obs.SessionStep("ehlo", time.Since(step))
	if !useTLS {
		return sc, nil
	}
	if ok, _ := sc.client.Extension("STARTTLS"); !ok {
		return sc, nil
	}
	step = time.Now()
	tlsConn, err := c.startTLS(ctx, sc)
	if err != nil {
		if _, ok := errors.AsType[*textproto.Error](err); ok && !brokenConnection(err) {
			// The server refused STARTTLS; the session goes on in plain
			// text (RFC 3207 section 4), unless the policy requires TLS.
			sc.noTLS = "refused STARTTLS: " + err.Error()
			return sc, nil
		}
		return nil, fmt.Errorf("STARTTLS with %s [%s]: %w", t.Host, t.addr(), err)
	}
	// The SMTP session restarts after STARTTLS (RFC 3207 section 4.2) but
	// the server sends no new greeting; go-smtp's client reads one before
	// its EHLO, so it is given a stand-in.
	sc.conn = &greetedConn{Conn: tlsConn, r: io.MultiReader(strings.NewReader("220 TLS session\r\n"), tlsConn)}
	sc.client = c.newClient(sc.conn)
	if err := sc.client.Hello(c.cfg.Hostname); err != nil {
		sc.abandon(err)
		return nil, fmt.Errorf("EHLO over TLS with %s [%s]: %w", t.Host, t.addr(), err)
	}
	obs.SessionStep("starttls", time.Since(step))
	state := tlsConn.ConnectionState()
	sc.tls = true
	sc.tlsVersion = tls.VersionName(state.Version)
	sc.tlsCipher = tls.CipherSuiteName(state.CipherSuite)
	return sc, nil
}

func (c *connector) newClient(conn net.Conn) *smtp.Client {
	cl := smtp.NewClient(conn)
	cl.CommandTimeout = c.cfg.CommandTimeout
	cl.SubmissionTimeout = c.cfg.DataTimeout
	return cl
}

// startTLS sends STARTTLS and runs the handshake. go-smtp v0.25's client can
// only start TLS right after its own EHLO as "localhost", so the command is
// written here, on the connection the client has finished reading from.
func (c *connector) startTLS(ctx context.Context, sc *smtpConn) (*tls.Conn, error) {
	if _, err := sc.command("STARTTLS", 220, c.cfg.CommandTimeout); err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		ServerName: sc.target.Host,
		// Most MX hosts present certificates that do not verify (RFC 7435
		// section 1.2), and a failed check would only push the mail back to
		// plain text: encryption without verification is still better. The
		// check is made all the same, below, so that the attempt records
		// its result, and the policy decides what a failure means (see
		// dial).
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			sc.verifyErr = verifyPeer(cs, sc.target.Host, c.cfg.RootCAs)
			return nil
		},
		MinVersion: tls.VersionTLS12,
	}
	tlsConn := tls.Client(sc.raw, cfg)
	hctx, cancel := context.WithTimeout(ctx, c.cfg.CommandTimeout)
	defer cancel()
	if err := tlsConn.HandshakeContext(hctx); err != nil {
		return nil, &errTLSHandshake{err: err}
	}
	return tlsConn, nil
}

// command writes one command line directly and reads its reply within
// timeout, bypassing the client; it is only used between replies, when the
// client has nothing buffered.
func (sc *smtpConn) command(line string, expect int, timeout time.Duration) (string, error) {
	sc.conn.SetDeadline(time.Now().Add(timeout))
	defer sc.conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(sc.conn, line+"\r\n"); err != nil {
		return "", err
	}
	_, msg, err := textproto.NewReader(bufio.NewReaderSize(sc.conn, 512)).ReadResponse(expect)
	return msg, err
}

// reset sends RSET. go-smtp's Client.Reset also forgets the EHLO and repeats
// it before the next MAIL; RSET alone keeps the session (RFC 5321 section
// 4.1.1.5), so reuse costs one round trip rather than two.
func (sc *smtpConn) reset(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { sc.raw.Close() })
	defer stop()
	if _, err := sc.command("RSET", 250, sc.cfg.CommandTimeout); err != nil {
		sc.broken = true
		return err
	}
	return nil
}

// quitTimeout bounds the wait for the reply to QUIT: a server that has gone
// quiet should not hold up shutdown.
const quitTimeout = 10 * time.Second

// quit ends the session politely (RFC 5321 section 4.1.1.10) and closes the
// connection.
func (sc *smtpConn) quit() {
	if !sc.broken {
		sc.client.CommandTimeout = min(sc.cfg.CommandTimeout, quitTimeout)
		if err := sc.client.Quit(); err == nil {
			return
		}
	}
	sc.raw.Close()
}

// abandon sends QUIT on a session the server refused with err, a reply to
// EHLO or HELO, before the caller closes the connection: RFC 5321 section
// 4.1.1.10 asks the client not to close the channel without it. go-smtp's
// client will not send it once its EHLO failed, so it is written directly.
// No QUIT follows a 421, which closes the channel (section 3.8); after a
// refused greeting go-smtp has closed the connection already, and the QUIT
// fails at once.
func (sc *smtpConn) abandon(err error) {
	if !isReply(err) || brokenConnection(err) {
		return
	}
	sc.command("QUIT", 221, min(sc.cfg.CommandTimeout, quitTimeout))
}

// greetedConn replays a greeting before the bytes of the wrapped connection.
type greetedConn struct {
	net.Conn
	r io.Reader
}

func (g *greetedConn) Read(p []byte) (int, error) { return g.r.Read(p) }

// reply is a server reply that accepted the message.
type reply struct {
	Code         int
	EnhancedCode string
	Text         string
}

// rcptResult is what one transaction did for one recipient.
type rcptResult struct {
	Err   *SMTPError // nil: the server took responsibility for the message
	Reply reply      // the reply to the end of DATA, when Err is nil
}

// errStale reports that a pooled connection did not take its pipelined
// RSET: the server dropped it while it was idle. Nothing of the
// transaction reached the server's queue, and the caller tries another
// connection.
var errStale = errors.New("pooled connection did not answer RSET")

// pipelining reports whether the server takes commands in groups (RFC 2920).
func (sc *smtpConn) pipelining() bool {
	ok, _ := sc.client.Extension("PIPELINING")
	return ok
}

// transaction runs MAIL, RCPT for each recipient, DATA. A 5yz reply to RCPT
// fails only that recipient; a reply to DATA applies to every recipient the
// server accepted (RFC 5321 section 3.3). Errors that are not replies leave
// the connection broken and every undecided recipient with that error.
//
// With a server that offers PIPELINING the commands up to DATA go out in one
// write (see pipelinedTransaction); otherwise each waits for its reply. A
// pipelined transaction on a reused connection that finds it dropped
// returns errStale and no results.
func (sc *smtpConn) transaction(ctx context.Context, from string, rcpts []string, data []byte) ([]rcptResult, error) {
	if sc.pipelining() {
		start := time.Now()
		res, err := sc.pipelinedTransaction(ctx, from, rcpts, data)
		if err == nil && sc.obs != nil {
			sc.obs.SessionStep("pipeline", time.Since(start))
		}
		return res, err
	}
	return sc.lockstepTransaction(ctx, from, rcpts, data), nil
}

// lockstepTransaction is a transaction with a server that does not pipeline:
// every command waits for the reply to the one before (RFC 5321 section
// 4.1). The connection was reset already if it was reused.
func (sc *smtpConn) lockstepTransaction(ctx context.Context, from string, rcpts []string, data []byte) []rcptResult {
	sc.uses++
	stop := context.AfterFunc(ctx, func() { sc.raw.Close() })
	defer func() {
		if !stop() {
			sc.broken = true
		}
	}()

	results := make([]rcptResult, len(rcpts))
	decided := make([]bool, len(rcpts))
	failRest := func(err error) []rcptResult {
		se := asSMTPError(err)
		if ctx.Err() != nil && !isReply(err) && !errors.Is(err, ctx.Err()) {
			// The connection was closed under the client because the
			// context ended; say so rather than "use of closed connection".
			se = asSMTPError(fmt.Errorf("%w: %w", context.Cause(ctx), err))
		}
		for i := range results {
			if !decided[i] {
				results[i].Err = se
				decided[i] = true
			}
		}
		if brokenConnection(err) {
			sc.broken = true
		}
		return results
	}

	data, body8, serr := sc.prepare(data)
	if serr != nil {
		// Refused before MAIL: no transaction was started, and the
		// connection stays usable.
		return failAll(len(rcpts), serr)
	}
	if err := sc.mail(from, len(data), body8); err != nil {
		return failRest(err)
	}
	accepted := 0
	for i, rcpt := range rcpts {
		err := sc.client.Rcpt(rcpt, nil)
		if err == nil {
			accepted++
			continue
		}
		if brokenConnection(err) {
			return failRest(err)
		}
		results[i].Err = asSMTPError(err)
		decided[i] = true
	}
	if accepted == 0 {
		// No recipient left: end the transaction instead of sending DATA
		// that the server would refuse (RFC 5321 section 3.3).
		if err := sc.reset(ctx); err != nil {
			sc.broken = true
		}
		return results
	}

	w, err := sc.client.Data()
	if err != nil {
		return failRest(err)
	}
	// go-smtp sets no deadline while the body is written: without one, a
	// server that stops reading would block this write for good.
	sc.raw.SetWriteDeadline(time.Now().Add(sc.cfg.DataTimeout))
	if _, err := w.Write(data); err != nil {
		sc.broken = true
		return failRest(err)
	}
	// The end of the data is the point of no return: once it is sent the
	// server may take the message. An attempt past its deadline stops short
	// of it: the lease that the deadline protects may be gone, and another
	// dispatcher may be sending the same message.
	if ctx.Err() != nil {
		sc.broken = true
		return failRest(context.Cause(ctx))
	}
	resp, err := w.CloseWithResponse()
	accept, ok := acceptance(resp, err)
	if !ok {
		if !isReply(err) && !writeFailed(err) {
			// The final "." was written (a failed write would have kept
			// it, the last bytes, back): the server may have taken the
			// message, and only its reply was lost (RFC 1047).
			sc.broken = true
			cause := err
			if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
				cause = fmt.Errorf("%w: %w", context.Cause(ctx), err)
			}
			return failRest(ambiguousError(cause))
		}
		return failRest(err)
	}
	for i := range results {
		if !decided[i] {
			results[i].Reply = accept
			decided[i] = true
		}
	}
	return results
}

// prepare returns the bytes to send to this server and whether MAIL should
// declare BODY=8BITMIME, or the local refusal that fails every recipient
// before MAIL.
//
// This is the one place where the stored message is changed for a server, so
// a DKIM signer (RFC 6376) must run on its output, not before it: the
// conversion to 7 bits rewrites the body the signature covers.
func (sc *smtpConn) prepare(data []byte) ([]byte, bool, *SMTPError) {
	body8 := false
	if message.Has8Bit(data) {
		if ok, _ := sc.client.Extension("8BITMIME"); ok {
			// RFC 6152 section 3: declared only for content that has
			// 8-bit octets.
			body8 = true
		} else {
			// RFC 6152 section 3 leaves a client whose server lacks
			// 8BITMIME two choices: convert to 7 bits, or return the
			// message as undeliverable.
			converted, err := message.To7Bit(data)
			if err != nil {
				return nil, false, &SMTPError{Code: codeTransactionNo, EnhancedCode: "5.6.3", // RFC 3463: conversion required but not supported
					Message: fmt.Sprintf("message has 8-bit content that cannot be converted to 7 bits for %s, which does not offer 8BITMIME", sc.target.Host),
					Err:     err}
			}
			data = converted
		}
	}
	// RFC 1870 section 6.1: a message larger than the fixed maximum the
	// server declared would be refused after it was sent; it is not sent.
	// "SIZE" without a number, or SIZE 0, declares no fixed maximum.
	if limit, ok := sc.client.MaxMessageSize(); ok && limit > 0 && len(data) > limit {
		return nil, false, &SMTPError{Code: codeTooBig, EnhancedCode: "5.3.4", // RFC 3463: message too big for system
			Message: fmt.Sprintf("message size %d exceeds the limit %d advertised by %s", len(data), limit, sc.target.Host)}
	}
	return data, body8, nil
}

// mail sends MAIL FROM. go-smtp's Client.Mail declares BODY=8BITMIME to
// every server that offers it, whatever the content, so the command is
// written here: BODY=8BITMIME only with body8 (RFC 6152 section 3), SIZE
// only when the server offered the extension (RFC 1870 section 6).
//
// go-smtp's client is not told that a transaction began. RCPT and DATA need
// nothing from its Mail; the list of recipients it keeps for LMTP, which
// Mail would have cleared, grows until the connection closes, bounded by
// SMTPConfig.MaxReuse transactions.
func (sc *smtpConn) mail(from string, size int, body8 bool) error {
	line, err := sc.mailLine(from, size, body8)
	if err != nil {
		return err
	}
	_, err = sc.command(line, 250, sc.cfg.CommandTimeout)
	return err
}

// mailLine is the MAIL FROM command for mail, without its line end.
func (sc *smtpConn) mailLine(from string, size int, body8 bool) (string, error) {
	if strings.ContainsAny(from, "\r\n") {
		return "", fmt.Errorf("envelope sender %q holds a line break", from)
	}
	var b strings.Builder
	b.WriteString("MAIL FROM:<")
	b.WriteString(from)
	b.WriteByte('>')
	if body8 {
		b.WriteString(" BODY=8BITMIME")
	}
	if ok, _ := sc.client.Extension("SIZE"); ok {
		fmt.Fprintf(&b, " SIZE=%d", size)
	}
	return b.String(), nil
}

// acceptance returns the reply to the end of DATA when the server took the
// message. go-smtp reports anything but 250 as an error, yet any 2yz is a
// positive completion (RFC 5321 section 4.2.1): counting it as a failure
// would retry, and deliver the message twice.
func acceptance(resp *smtp.DataResponse, err error) (reply, bool) {
	if err == nil {
		code, text := splitEnhancedCode(resp.StatusText)
		return reply{Code: 250, EnhancedCode: code, Text: text}, true
	}
	if se, ok := errors.AsType[*smtp.SMTPError](err); ok && se.Code/100 == 2 {
		return reply{Code: se.Code, EnhancedCode: formatEnhancedCode(se.Code, se.EnhancedCode), Text: se.Message}, true
	}
	return reply{}, false
}

// writeFailed reports whether err is a failed write to the connection. The
// end of the data is the last thing written, so when writing failed the
// server cannot have received it.
func writeFailed(err error) bool {
	oe, ok := errors.AsType[*net.OpError](err)
	return ok && oe.Op == "write"
}

// isReply reports whether err is a reply from the server, as opposed to a
// failure to get one.
func isReply(err error) bool {
	if _, ok := errors.AsType[*smtp.SMTPError](err); ok {
		return true
	}
	_, ok := errors.AsType[*textproto.Error](err)
	return ok
}
