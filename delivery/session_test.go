package delivery

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/textproto"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/internal/testenv"
)

func TestAttemptDelivers(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t)
	e.addMX("ok.test", "mx.ok.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "ok.test", "a@ok.test", "b@ok.test")
	for i, r := range res.Rcpts {
		if r.Err != nil {
			t.Fatalf("recipient %d: %v", i, r.Err)
		}
		if r.Reply.Code != 250 || r.Reply.EnhancedCode != "2.0.0" {
			t.Fatalf("recipient %d: reply %+v", i, r.Reply)
		}
	}
	if len(res.Hosts) != 1 {
		t.Fatalf("hosts %+v, want the one", res.Hosts)
	}
	h := res.Hosts[0]
	if h.MXHost != "mx.ok.test" || h.IP != "192.0.2.1" || h.TLS || h.Err != nil {
		t.Fatalf("host %+v", h)
	}
	if h.Started.IsZero() || h.Elapsed <= 0 {
		t.Fatalf("started %s, elapsed %s: the host's timing was not kept", h.Started, h.Elapsed)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 {
		t.Fatalf("server got %d messages, want 1 transaction", len(msgs))
	}
	m := msgs[0]
	want := testMessage("hello")
	if !bytes.Equal(m.Data, want) {
		t.Fatalf("data %q, want %q", m.Data, want)
	}
	if m.From != "bounce@sender.test" || !slices.Equal(m.To, []string{"a@ok.test", "b@ok.test"}) {
		t.Fatalf("envelope %s -> %v", m.From, m.To)
	}
	if m.Helo != "sender.test" {
		t.Fatalf("EHLO %q, want the configured hostname", m.Helo)
	}
	// The server advertises SIZE, so MAIL FROM declares it (RFC 1870).
	if m.Size != len(want) {
		t.Fatalf("SIZE=%d, want %d", m.Size, len(want))
	}
}

func TestAttemptUsesSTARTTLS(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithTLS())
	e.addMX("tls.test", "mx.tls.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "tls.test", "a@tls.test")
	if res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	if h := lastHost(t, res); !h.TLS || h.TLSVersion != "TLS 1.3" {
		t.Fatalf("host %+v, want TLS 1.3", h)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || !msgs[0].TLS || msgs[0].Helo != "sender.test" {
		t.Fatalf("messages %+v", msgs)
	}
	// RFC 3207 section 4.2: EHLO again after the handshake.
	if n := srv.Commands("EHLO"); n != 2 {
		t.Fatalf("%d EHLO, want 2", n)
	}
}

func TestAttemptFallsBackToPlainTextWhenHandshakeFails(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithBrokenTLS())
	e.addMX("badtls.test", "mx.badtls.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "badtls.test", "a@badtls.test")
	if res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	if h := lastHost(t, res); h.TLS || len(res.Hosts) != 1 {
		t.Fatalf("hosts %+v, want one in plain text", res.Hosts)
	}
	if n := srv.Connections(); n != 2 {
		t.Fatalf("%d connections, want 2 (TLS, then plain)", n)
	}
	if msgs := srv.Messages(); len(msgs) != 1 || msgs[0].TLS {
		t.Fatalf("messages %+v", msgs)
	}
}

func TestAttemptVerifyTLSRejectsSelfSigned(t *testing.T) {
	t.Parallel()
	cfg := testSMTPConfig()
	cfg.VerifyTLS = true
	e := newSenderEnv(t, cfg, nil)
	srv := testenv.StartSMTP(t, testenv.WithTLS())
	e.addMX("verify.test", "mx.verify.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "verify.test", "a@verify.test")
	err := res.Rcpts[0].Err
	if err == nil || !err.Temporary() || err.EnhancedCode != "4.7.5" {
		t.Fatalf("err = %v, want a temporary 4.7.5", err)
	}
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("%d messages sent over an unverified connection", n)
	}
	if n := srv.Connections(); n != 1 {
		t.Fatalf("%d connections, want 1 (no plain-text fallback)", n)
	}
}

func TestAttemptPerRecipientReplies(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(to string) *smtp.SMTPError {
		switch {
		case strings.HasPrefix(to, "unknown@"):
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		case strings.HasPrefix(to, "busy@"):
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "try later"}
		}
		return nil
	}))
	e.addMX("mixed.test", "mx.mixed.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "mixed.test", "unknown@mixed.test", "ok@mixed.test", "busy@mixed.test")
	if err := res.Rcpts[0].Err; err == nil || err.Code != 550 || err.EnhancedCode != "5.1.1" ||
		err.Message != "no such user" || err.Temporary() {
		t.Fatalf("unknown: %v", err)
	}
	if res.Rcpts[1].Err != nil || res.Rcpts[1].Reply.Code != 250 {
		t.Fatalf("ok: %+v", res.Rcpts[1])
	}
	if err := res.Rcpts[2].Err; err == nil || err.Code != 451 || err.EnhancedCode != "4.2.0" || !err.Temporary() {
		t.Fatalf("busy: %v", err)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"ok@mixed.test"}) {
		t.Fatalf("messages %+v", msgs)
	}
}

// Without PIPELINING the client waits for the RCPT replies and knows that
// DATA would be refused.
func TestAttemptEveryRecipientRefusedSkipsData(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithoutPipelining(), testenv.WithRcptReply(func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}))
	e.addMX("nobody.test", "mx.nobody.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "nobody.test", "a@nobody.test", "b@nobody.test")
	for i, r := range res.Rcpts {
		if r.Err == nil || r.Err.Code != 550 {
			t.Fatalf("recipient %d: %+v", i, r)
		}
	}
	if n := srv.Commands("DATA"); n != 0 {
		t.Fatalf("DATA sent %d times with no recipient accepted", n)
	}
	if n := srv.Commands("RSET"); n != 1 {
		t.Fatalf("%d RSET, want 1", n)
	}
	// The connection stays usable after RSET.
	if e.pool.idleCount() != 1 {
		t.Fatalf("idle connections %d, want 1", e.pool.idleCount())
	}
}

func TestAttemptDataReplyAppliesToAllRecipients(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		reply     *smtp.SMTPError
		temporary bool
	}{
		{"554", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "content rejected"}, false},
		{"451", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "queue full"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newSenderEnv(t, testSMTPConfig(), nil)
			srv := testenv.StartSMTP(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
				return tt.reply
			}))
			e.addMX("data.test", "mx.data.test", "192.0.2.1", 10, srv)
			res := e.attempt(t, "data.test", "a@data.test", "b@data.test")
			for i, r := range res.Rcpts {
				if r.Err == nil || r.Err.Code != tt.reply.Code || r.Err.Temporary() != tt.temporary ||
					r.Err.Message != tt.reply.Message {
					t.Fatalf("recipient %d: %+v", i, r)
				}
			}
			if e.pool.idleCount() != 1 {
				t.Fatal("connection not kept after a reply to DATA")
			}
		})
	}
}

func TestAttemptTriesNextMX(t *testing.T) {
	t.Parallel()
	busy := &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "too busy"}
	tests := []struct {
		name    string
		first   []testenv.SMTPOption // nil: refuse connections
		wantIPs []string
		// What is kept of the first host: its reply, or (replied false) a
		// failure to get one.
		code     int
		enhanced string
		replied  bool
	}{
		{"connection refused", nil, []string{"192.0.2.1:25", "192.0.2.2:25"}, 451, "4.4.1", false},
		{"4xx greeting", []testenv.SMTPOption{testenv.WithGreeting(busy)}, []string{"192.0.2.1:25", "192.0.2.2:25"},
			421, "4.3.2", true},
		{"5xx greeting", []testenv.SMTPOption{testenv.WithGreeting(&smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 3, 2}, Message: "no"})},
			[]string{"192.0.2.1:25", "192.0.2.2:25"}, 554, "5.3.2", true},
		{"5xx to EHLO", []testenv.SMTPOption{testenv.WithHeloReply(&smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "no"})},
			[]string{"192.0.2.1:25", "192.0.2.2:25"}, 550, "5.7.1", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newSenderEnv(t, testSMTPConfig(), nil)
			second := testenv.StartSMTP(t)
			var first *testenv.SMTPServer
			if tt.first != nil {
				first = testenv.StartSMTP(t, tt.first...)
			}
			e.addMX("next.test", "mx1.next.test", "192.0.2.1", 10, first)
			e.addMX("next.test", "mx2.next.test", "192.0.2.2", 20, second)

			res := e.attempt(t, "next.test", "a@next.test")
			if res.Rcpts[0].Err != nil {
				t.Fatal(res.Rcpts[0].Err)
			}
			if len(res.Hosts) != 2 {
				t.Fatalf("hosts %+v, want both", res.Hosts)
			}
			h1, h2 := res.Hosts[0], res.Hosts[1]
			if h1.MXHost != "mx1.next.test" || h1.IP != "192.0.2.1" || h1.Err == nil || h1.Err.Code != tt.code ||
				h1.Err.EnhancedCode != tt.enhanced || h1.Replied != tt.replied || h1.Started.IsZero() {
				t.Fatalf("first host %+v (err %v), want %d %s, replied %t", h1, h1.Err, tt.code, tt.enhanced, tt.replied)
			}
			if h2.MXHost != "mx2.next.test" || h2.IP != "192.0.2.2" || h2.Err != nil || h2.Started.Before(h1.Started.Add(h1.Elapsed)) {
				t.Fatalf("second host %+v after the first %+v, want it to take the transaction", h2, h1)
			}
			if got := e.dialer.dialed(); !slices.Equal(got, tt.wantIPs) {
				t.Fatalf("dialed %v, want %v", got, tt.wantIPs)
			}
			if first != nil && first.Connections() != 1 {
				t.Fatalf("first MX saw %d connections", first.Connections())
			}
			if len(second.Messages()) != 1 {
				t.Fatal("second MX got no message")
			}
		})
	}
}

func TestAttemptReportsLastError(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	busy := testenv.StartSMTP(t, testenv.WithGreeting(&smtp.SMTPError{
		Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "come back later"}))
	e.addMX("down.test", "mx1.down.test", "192.0.2.1", 10, nil) // refuses
	e.addMX("down.test", "mx2.down.test", "192.0.2.2", 20, busy)

	res := e.attempt(t, "down.test", "a@down.test")
	err := res.Rcpts[0].Err
	if err == nil || err.Code != 421 || err.EnhancedCode != "4.7.0" || !err.Temporary() {
		t.Fatalf("err = %v, want the last host's 421 4.7.0", err)
	}
	if len(res.Hosts) != 2 || lastHost(t, res).MXHost != "mx2.down.test" {
		t.Fatalf("hosts %+v, want both, the second last", res.Hosts)
	}

	// With every host refusing, the error is the connection failure.
	e.addMX("refused.test", "mx.refused.test", "192.0.2.3", 10, nil)
	res = e.attempt(t, "refused.test", "a@refused.test")
	if err := res.Rcpts[0].Err; err == nil || err.EnhancedCode != "4.4.1" || !err.Temporary() {
		t.Fatalf("err = %v, want a temporary 4.4.1", err)
	}
}

// TestAttemptDefersWhenEveryHostRefusesToTalk checks that a 5yz reply before
// MAIL FROM never bounces: it says the host will not talk to us, not that
// the recipients do not exist.
func TestAttemptDefersWhenEveryHostRefusesToTalk(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		opt      testenv.SMTPOption
		code     int
		enhanced string
		message  string
		quit     int // QUIT commands each host should get
	}{
		// A host that refused at the greeting has hung up.
		{"554 greeting", testenv.WithGreeting(&smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "no mail from you"}),
			554, "5.7.1", "no mail from you", 0},
		{"554 greeting without enhanced code", testenv.WithGreeting(&smtp.SMTPError{Code: 554, Message: "go away"}),
			554, "", "go away", 0},
		// A host that refused EHLO still waits for QUIT (RFC 5321 section
		// 4.1.1.10).
		{"550 to EHLO", testenv.WithHeloReply(&smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "bad name"}),
			550, "5.7.1", "bad name", 1},
		// go-smtp's client falls back to HELO after a 502 to EHLO.
		{"502 to EHLO and HELO", testenv.WithHeloReply(&smtp.SMTPError{Code: 502, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "not here"}),
			502, "5.5.1", "not here", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newSenderEnv(t, testSMTPConfig(), nil)
			first := testenv.StartSMTP(t, tt.opt)
			second := testenv.StartSMTP(t, tt.opt)
			e.addMX("refuse.test", "mx1.refuse.test", "192.0.2.1", 10, first)
			e.addMX("refuse.test", "mx2.refuse.test", "192.0.2.2", 20, second)

			res := e.attempt(t, "refuse.test", "a@refuse.test", "b@refuse.test")
			for i, r := range res.Rcpts {
				err := r.Err
				if err == nil || err.Code != tt.code || err.EnhancedCode != tt.enhanced || err.Message != tt.message {
					t.Fatalf("recipient %d: err = %v, want the last host's %d %s", i, err, tt.code, tt.enhanced)
				}
				if !err.Temporary() || !err.Greeting {
					t.Fatalf("recipient %d: %v is permanent, want it to defer", i, err)
				}
			}
			if first.Connections() != 1 || second.Connections() != 1 {
				t.Fatalf("connections %d and %d, want each host tried once", first.Connections(), second.Connections())
			}
			if len(res.Hosts) != 2 || lastHost(t, res).MXHost != "mx2.refuse.test" {
				t.Fatalf("hosts %+v, want both, the second last", res.Hosts)
			}
			if first.Commands("MAIL")+second.Commands("MAIL") != 0 {
				t.Fatal("MAIL sent to a host that refused the session")
			}
			if first.Commands("QUIT") != tt.quit || second.Commands("QUIT") != tt.quit {
				t.Fatalf("QUIT %d and %d times, want %d", first.Commands("QUIT"), second.Commands("QUIT"), tt.quit)
			}
		})
	}
}

func TestAttemptNullMXMakesNoConnection(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	e.dns.AddNullMX("nullmx.test")
	e.dns.AddA("nullmx.test", "192.0.2.1")
	res := e.attempt(t, "nullmx.test", "a@nullmx.test")
	if err := res.Rcpts[0].Err; err == nil || err.Code != 556 || err.EnhancedCode != "5.1.10" || err.Temporary() {
		t.Fatalf("err = %v", err)
	}
	if len(res.Hosts) != 0 || len(e.dialer.dialed()) != 0 {
		t.Fatalf("connection attempted: hosts %+v, dialed %v", res.Hosts, e.dialer.dialed())
	}
}

func TestAttemptDataWriteDeadline(t *testing.T) {
	t.Parallel()
	cfg := testSMTPConfig()
	cfg.DataTimeout = 300 * time.Millisecond
	e := newSenderEnv(t, cfg, nil)
	srv := testenv.StartSMTP(t, testenv.WithStalledData())
	e.addMX("stall.test", "mx.stall.test", "192.0.2.1", 10, srv)

	// Larger than what the socket buffers of both ends can hold, so that
	// the write blocks once the server stops reading.
	data := bigMessage()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	res := e.sender.attempt(ctx, envelope{Domain: "stall.test", From: "b@sender.test", To: []string{"a@stall.test"}, Data: data})
	err := res.Rcpts[0].Err
	if err == nil || !err.Temporary() || err.EnhancedCode != "4.4.2" {
		t.Fatalf("err = %v, want a temporary 4.4.2 timeout", err)
	}
	// The write deadline, not a context (the test's or the host's), ended it.
	if !errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the write deadline", err)
	}
	if e.pool.idleCount() != 0 {
		t.Fatal("a connection that timed out was pooled")
	}
}

func TestAttemptContextEndInterruptsSession(t *testing.T) {
	t.Parallel()
	cfg := testSMTPConfig()
	cfg.DataTimeout = time.Minute
	cfg.CommandTimeout = time.Minute
	e := newSenderEnv(t, cfg, nil)
	srv := testenv.StartSMTP(t, testenv.WithStalledData())
	e.addMX("stall.test", "mx.stall.test", "192.0.2.1", 10, srv)

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	res := e.sender.attempt(ctx, envelope{Domain: "stall.test", From: "b@sender.test", To: []string{"a@stall.test"}, Data: testMessage("x")})
	if err := res.Rcpts[0].Err; err == nil || !err.Temporary() || err.EnhancedCode != "4.4.2" ||
		!errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want a temporary 4.4.2 caused by the context", err)
	}
}

func TestAttemptMailFromRefused(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := scriptedServer(t, func(cmd string) string {
		if strings.HasPrefix(cmd, "MAIL") {
			return "550 5.7.1 sender refused"
		}
		return ""
	}, "250-mx.test", "250 8BITMIME")
	e.addMX("refuse.test", "mx.refuse.test", "192.0.2.1", 10, nil)
	e.dialer.route("192.0.2.1", 25, srv.addr)

	res := e.attempt(t, "refuse.test", "a@refuse.test", "b@refuse.test")
	for i, r := range res.Rcpts {
		// A 5yz reply to MAIL FROM fails the whole transaction for good.
		if r.Err == nil || r.Err.Code != 550 || r.Err.EnhancedCode != "5.7.1" || r.Err.Temporary() {
			t.Fatalf("recipient %d: %+v", i, r)
		}
	}
	for _, c := range srv.commands() {
		if strings.HasPrefix(c, "RCPT") || c == "DATA" {
			t.Fatalf("%q sent after MAIL FROM was refused", c)
		}
	}
}

// TestAttemptAnyPositiveReplyToDataDelivers checks that a 2yz reply other
// than 250 to the end of DATA counts as delivered.
func TestAttemptAnyPositiveReplyToDataDelivers(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := scriptedServer(t, func(cmd string) string {
		if cmd == "." {
			return "251 2.6.0 queued elsewhere"
		}
		return ""
	}, "250-mx.test", "250 8BITMIME")
	e.addMX("odd.test", "mx.odd.test", "192.0.2.1", 10, nil)
	e.dialer.route("192.0.2.1", 25, srv.addr)

	res := e.attempt(t, "odd.test", "a@odd.test", "b@odd.test")
	for i, r := range res.Rcpts {
		if r.Err != nil || r.Reply.Code != 251 || r.Reply.EnhancedCode != "2.6.0" || r.Reply.Text != "queued elsewhere" {
			t.Fatalf("recipient %d: %+v", i, r)
		}
	}
	if e.pool.idleCount() != 1 {
		t.Fatal("connection not kept after a positive reply")
	}
}

func TestAttemptNoSizeWhenNotAdvertised(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := scriptedServer(t, nil, "250-mx.test", "250 8BITMIME")
	e.addMX("nosize.test", "mx.nosize.test", "192.0.2.1", 10, nil)
	e.dialer.route("192.0.2.1", 25, srv.addr)

	res := e.attempt(t, "nosize.test", "a@nosize.test")
	if res.Rcpts[0].Err != nil {
		t.Fatal(res.Rcpts[0].Err)
	}
	var mail string
	for _, c := range srv.commands() {
		if strings.HasPrefix(c, "MAIL ") {
			mail = c
		}
	}
	if mail == "" || strings.Contains(mail, "SIZE=") {
		t.Fatalf("MAIL command %q, want one without SIZE", mail)
	}
	if cmds := srv.commands(); cmds[0] != "EHLO sender.test" {
		t.Fatalf("first command %q", cmds[0])
	}
}

// bigMessage is a 12 MB message: more than the socket buffers can hold when
// the server stops reading (testenv.WithStalledData keeps its side small;
// Linux caps the sender's at 4 MB by default).
func bigMessage() []byte {
	line := []byte("0123456789012345678901234567890123456789012345678901234567890123456789\r\n")
	return append(testMessage("big"), bytes.Repeat(line, 12<<20/len(line))...)
}

// script is a minimal SMTP server that answers from a fixed script, for the
// cases go-smtp's server cannot act out (an EHLO without SIZE).
type script struct {
	addr string
	mu   sync.Mutex
	cmds []string
}

func (s *script) commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.cmds...)
}

// scriptedServer answers EHLO with ehlo, each command with override(cmd)
// when that is not "", and otherwise with the usual success replies. The end
// of the message data is answered with override(".") when that is not "".
func scriptedServer(t *testing.T, override func(cmd string) string, ehlo ...string) *script {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &script{addr: ln.Addr().String()}
	var wg sync.WaitGroup
	var conns sync.Map
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			wg.Go(func() {
				defer c.Close()
				tp := textproto.NewConn(c)
				reply := func(lines ...string) {
					for _, l := range lines {
						tp.PrintfLine("%s", l)
					}
				}
				reply("220 mx.test ESMTP")
				for {
					line, err := tp.ReadLine()
					if err != nil {
						return
					}
					s.mu.Lock()
					s.cmds = append(s.cmds, line)
					s.mu.Unlock()
					if override != nil {
						if r := override(line); r != "" {
							reply(r)
							continue
						}
					}
					verb, _, _ := strings.Cut(strings.ToUpper(line), " ")
					switch verb {
					case "EHLO":
						reply(ehlo...)
					case "DATA":
						reply("354 go ahead")
						if _, err := tp.ReadDotBytes(); err != nil {
							return
						}
						end := "250 2.0.0 queued"
						if override != nil {
							if r := override("."); r != "" {
								end = r
							}
						}
						reply(end)
					case "QUIT":
						reply("221 bye")
						return
					default:
						reply("250 2.0.0 ok")
					}
				}
			})
		}
	})
	return s
}
