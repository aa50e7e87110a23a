package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/goleak"

	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const testMessage = "From: sender@posthaste.test\r\n" +
	"To: someone@example.test\r\n" +
	"Subject: sandbox test\r\n" +
	"\r\n" +
	"Hello.\r\n"

func startSandbox(t *testing.T, cfg Config) *Server {
	t.Helper()
	s := New(cfg)
	if err := s.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

func dial(t *testing.T, addr string) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Hello("client.posthaste.test"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	return c
}

// wantSMTPError fails the test unless err is an SMTP reply with the code and
// enhanced code given.
func wantSMTPError(t *testing.T, what string, err error, code int, enhanced smtp.EnhancedCode) *smtp.SMTPError {
	t.Helper()
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		t.Fatalf("%s: got %v, want SMTP reply %d %v", what, err, code, enhanced)
	}
	if se.Code != code || se.EnhancedCode != enhanced {
		t.Fatalf("%s: got %d %v %q, want %d %v", what, se.Code, se.EnhancedCode, se.Message, code, enhanced)
	}
	return se
}

// send runs one transaction and returns the text of the 250 reply to DATA.
// RCPT refusals fail the test.
func send(t *testing.T, c *smtp.Client, from string, to ...string) (string, error) {
	t.Helper()
	if err := c.Mail(from, nil); err != nil {
		t.Fatalf("MAIL FROM:<%s>: %v", from, err)
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			t.Fatalf("RCPT TO:<%s>: %v", rcpt, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	if _, err := w.Write([]byte(testMessage)); err != nil {
		t.Fatalf("write message: %v", err)
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	return resp.StatusText, nil
}

func TestRcptOutcomes(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	tests := []struct {
		rcpt     string
		code     int
		enhanced smtp.EnhancedCode
	}{
		{"bounce@example.test", 550, smtp.EnhancedCode{5, 1, 1}},
		{"BOUNCE@Example.Test", 550, smtp.EnhancedCode{5, 1, 1}},
		{"bounce+welcome@example.test", 550, smtp.EnhancedCode{5, 1, 1}},
		{"Bounce+@example.test", 550, smtp.EnhancedCode{5, 1, 1}},
		{"full@example.test", 452, smtp.EnhancedCode{4, 2, 2}},
		{"Full+x@example.test", 452, smtp.EnhancedCode{4, 2, 2}},
	}
	for _, tt := range tests {
		t.Run(tt.rcpt, func(t *testing.T) {
			t.Parallel()
			c := dial(t, s.Addr())
			if err := c.Mail("sender@posthaste.test", nil); err != nil {
				t.Fatalf("MAIL: %v", err)
			}
			// The same recipient is refused every time, not only the first.
			for range 2 {
				wantSMTPError(t, "RCPT "+tt.rcpt, c.Rcpt(tt.rcpt, nil), tt.code, tt.enhanced)
			}
		})
	}
}

func TestLookalikesAreAccepted(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	c := dial(t, s.Addr())
	to := []string{"bounced@example.test", "xbounce@example.test", "full.name@example.test", "bounce@bounce.test"}
	// bounce@bounce.test is refused: the domain does not matter, only the local part.
	if err := c.Mail("sender@posthaste.test", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	for _, rcpt := range to[:3] {
		if err := c.Rcpt(rcpt, nil); err != nil {
			t.Errorf("RCPT %s: %v, want accepted", rcpt, err)
		}
	}
	wantSMTPError(t, "RCPT "+to[3], c.Rcpt(to[3], nil), 550, smtp.EnhancedCode{5, 1, 1})
}

func TestAcceptedMessage(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	c := dial(t, s.Addr())

	before := time.Now()
	text, err := send(t, c, "sender@posthaste.test", "alice@example.test", "Bob+news@example.test")
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	// The client strips the code from a success but keeps the enhanced code.
	id, ok := strings.CutPrefix(text, "2.0.0 OK: queued as ")
	if !ok || id == "" {
		t.Fatalf("reply to DATA = %q, want \"2.0.0 OK: queued as <id>\"", text)
	}

	got := s.Received()
	if len(got) != 1 {
		t.Fatalf("Received() has %d messages, want 1: %+v", len(got), got)
	}
	r := got[0]
	if r.From != "sender@posthaste.test" {
		t.Errorf("From = %q", r.From)
	}
	if strings.Join(r.To, ",") != "alice@example.test,Bob+news@example.test" {
		t.Errorf("To = %q", r.To)
	}
	// The client sends the message with CRLF line endings and dot-stuffing
	// undone; nothing here starts with a dot, so the size is the message's.
	if r.Size != len(testMessage) {
		t.Errorf("Size = %d, want %d", r.Size, len(testMessage))
	}
	if r.QueueID != id {
		t.Errorf("QueueID = %q, reply said %q", r.QueueID, id)
	}
	if r.At.Before(before) || r.At.After(time.Now()) {
		t.Errorf("At = %v, not during the test", r.At)
	}

	// A second message on the same connection gets its own id.
	text2, err := send(t, c, "", "carol@example.test")
	if err != nil {
		t.Fatalf("second DATA: %v", err)
	}
	if text2 == text {
		t.Errorf("two messages got the same reply %q", text)
	}
	got = s.Received()
	if len(got) != 2 || got[1].From != "" || got[1].To[0] != "carol@example.test" {
		t.Fatalf("Received() = %+v, want the null-sender message last", got)
	}

	// The caller's copy is its own.
	got[1].To[0] = "changed"
	if s.Received()[1].To[0] != "carol@example.test" {
		t.Error("Received() shares its To slices with the server")
	}
}

func TestDeferThenAccept(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	c := dial(t, s.Addr())
	const from = "sender@posthaste.test"

	rcpt := func(from, to string) error {
		t.Helper()
		if err := c.Reset(); err != nil {
			t.Fatalf("RSET: %v", err)
		}
		if err := c.Mail(from, nil); err != nil {
			t.Fatalf("MAIL: %v", err)
		}
		return c.Rcpt(to, nil)
	}

	wantSMTPError(t, "first try", rcpt(from, "defer@example.test"), 451, smtp.EnhancedCode{4, 3, 0})
	// Another sender, another pair: deferred on its own first try.
	wantSMTPError(t, "other sender", rcpt("other@posthaste.test", "defer@example.test"), 451, smtp.EnhancedCode{4, 3, 0})
	// A tagged address is another recipient address, so another pair.
	wantSMTPError(t, "tagged", rcpt(from, "defer+1@example.test"), 451, smtp.EnhancedCode{4, 3, 0})

	// The retry is accepted, case folded, and the message goes through.
	if err := rcpt(from, "Defer@Example.test"); err != nil {
		t.Fatalf("retry: %v, want accepted", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	if _, err := w.Write([]byte(testMessage)); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("end of DATA: %v", err)
	}
	got := s.Received()
	if len(got) != 1 || got[0].To[0] != "Defer@Example.test" {
		t.Fatalf("Received() = %+v, want the deferred message", got)
	}

	// The pair is forgotten once accepted: the next message defers again.
	wantSMTPError(t, "next message", rcpt(from, "defer@example.test"), 451, smtp.EnhancedCode{4, 3, 0})
	if err := rcpt("other@posthaste.test", "defer@example.test"); err != nil {
		t.Fatalf("other sender's retry: %v, want accepted", err)
	}
}

func TestPendingDefersAreBounded(t *testing.T) {
	t.Parallel()
	var p pendingDefers
	p.seq = make(map[pair]uint64)
	first := pair{rcpt: "defer@example.test", from: "0"}
	if !p.toggle(first) {
		t.Fatal("first try accepted, want deferred")
	}
	for i := 1; i <= maxPendingDefers; i++ {
		p.toggle(pair{rcpt: "defer@example.test", from: fmt.Sprint(i)})
	}
	if len(p.seq) != maxPendingDefers {
		t.Fatalf("%d pairs remembered, want %d", len(p.seq), maxPendingDefers)
	}
	if len(p.order) > 2*maxPendingDefers {
		t.Fatalf("order holds %d entries", len(p.order))
	}
	// The oldest pair was forgotten, so its retry counts as a first try.
	if !p.toggle(first) {
		t.Error("forgotten pair accepted, want deferred again")
	}
	// A pair still remembered is accepted.
	if p.toggle(pair{rcpt: "defer@example.test", from: fmt.Sprint(maxPendingDefers)}) {
		t.Error("remembered pair deferred, want accepted")
	}
}

func TestRejectData(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	c := dial(t, s.Addr())

	_, err := send(t, c, "sender@posthaste.test", "Reject-Data+x@example.test")
	wantSMTPError(t, "end of DATA", err, 554, smtp.EnhancedCode{5, 6, 0})

	// Every recipient of the transaction shares the one reply to DATA.
	_, err = send(t, c, "sender@posthaste.test", "alice@example.test", "reject-data@example.test")
	wantSMTPError(t, "end of DATA, mixed transaction", err, 554, smtp.EnhancedCode{5, 6, 0})

	if got := s.Received(); len(got) != 0 {
		t.Fatalf("Received() = %+v, want nothing after rejections", got)
	}

	// Only that transaction: the next one on the same connection is accepted.
	if _, err := send(t, c, "sender@posthaste.test", "alice@example.test"); err != nil {
		t.Fatalf("next transaction: %v", err)
	}
	if got := s.Received(); len(got) != 1 || got[0].To[0] != "alice@example.test" {
		t.Fatalf("Received() = %+v, want alice's message", got)
	}
}

func TestRefusedRecipientLeavesTransaction(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	c := dial(t, s.Addr())
	if err := c.Mail("sender@posthaste.test", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	if err := c.Rcpt("alice@example.test", nil); err != nil {
		t.Fatalf("RCPT alice: %v", err)
	}
	wantSMTPError(t, "RCPT bounce", c.Rcpt("bounce@example.test", nil), 550, smtp.EnhancedCode{5, 1, 1})
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	if _, err := w.Write([]byte(testMessage)); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("end of DATA: %v", err)
	}
	got := s.Received()
	if len(got) != 1 || len(got[0].To) != 1 || got[0].To[0] != "alice@example.test" {
		t.Fatalf("Received() = %+v, want only alice", got)
	}
}

func TestSlowIsAccepted(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{SlowDelay: time.Millisecond})
	c := dial(t, s.Addr())
	text, err := send(t, c, "sender@posthaste.test", "SLOW+1@example.test")
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	if !strings.HasPrefix(text, "2.0.0 OK: queued as ") {
		t.Fatalf("reply = %q", text)
	}
	if got := s.Received(); len(got) != 1 || got[0].To[0] != "SLOW+1@example.test" {
		t.Fatalf("Received() = %+v", got)
	}
}

// signalHandler is a slog handler that reports when a record with the given
// message is logged.
type signalHandler struct {
	msg string
	ch  chan struct{}
}

func (h *signalHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *signalHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *signalHandler) WithGroup(string) slog.Handler            { return h }
func (h *signalHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message == h.msg {
		select {
		case h.ch <- struct{}{}:
		default:
		}
	}
	return nil
}

func TestStopAbandonsSlowReply(t *testing.T) {
	t.Parallel()
	h := &signalHandler{msg: "sandbox delaying reply to DATA", ch: make(chan struct{}, 1)}
	s := New(Config{SlowDelay: time.Hour, Logger: slog.New(h)})
	if err := s.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	c := dial(t, s.Addr())

	result := make(chan error, 1)
	go func() {
		if err := c.Mail("sender@posthaste.test", nil); err != nil {
			result <- err
			return
		}
		if err := c.Rcpt("slow@example.test", nil); err != nil {
			result <- err
			return
		}
		w, err := c.Data()
		if err != nil {
			result <- err
			return
		}
		if _, err := w.Write([]byte(testMessage)); err != nil {
			result <- err
			return
		}
		result <- w.Close()
	}()

	select {
	case <-h.ch:
	case err := <-result:
		t.Fatalf("transaction ended before the slow wait: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("server never started the slow wait")
	}
	// Stop must not wait out the hour.
	s.Stop()
	if err := <-result; err == nil {
		t.Fatal("slow message accepted although the server stopped")
	}
	if got := s.Received(); len(got) != 0 {
		t.Fatalf("Received() = %+v, want nothing", got)
	}
}

func TestMaxMessageBytes(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{MaxMessageBytes: 64})
	c := dial(t, s.Addr())
	if size, ok := c.MaxMessageSize(); !ok || size != 64 {
		t.Fatalf("SIZE = %d, %v; want 64", size, ok)
	}
	_, err := send(t, c, "sender@posthaste.test", "alice@example.test")
	wantSMTPError(t, "oversized DATA", err, 552, smtp.EnhancedCode{5, 3, 4})
	if got := s.Received(); len(got) != 0 {
		t.Fatalf("Received() = %+v, want nothing", got)
	}
}

func TestReceivedKeepsTheLatest(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{})
	c := dial(t, s.Addr())
	const total = keepReceived + 5
	for i := range total {
		if _, err := send(t, c, fmt.Sprintf("s%d@posthaste.test", i), "alice@example.test"); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	got := s.Received()
	if len(got) != keepReceived {
		t.Fatalf("Received() has %d messages, want %d", len(got), keepReceived)
	}
	for i, r := range got {
		if want := fmt.Sprintf("s%d@posthaste.test", i+5); r.From != want {
			t.Fatalf("Received()[%d].From = %q, want %q (oldest first)", i, r.From, want)
		}
	}
}

// TestOutcomesTable checks that the printed table says what the server does.
func TestOutcomesTable(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{SlowDelay: time.Millisecond})
	outcomes := Outcomes()
	seen := map[string]bool{}
	for _, o := range outcomes {
		seen[o.LocalPart] = true
		if o.Description == "" {
			t.Errorf("%s: no description", o.LocalPart)
		}
		t.Run(o.LocalPart, func(t *testing.T) {
			c := dial(t, s.Addr())
			local := o.LocalPart
			if local == "*" {
				local = "anyone"
			}
			to := local + "@example.test"
			if err := c.Mail("table@posthaste.test", nil); err != nil {
				t.Fatalf("MAIL: %v", err)
			}
			rcptErr := c.Rcpt(to, nil)
			var reply string
			switch o.Stage {
			case "RCPT":
				var se *smtp.SMTPError
				if !errors.As(rcptErr, &se) {
					t.Fatalf("RCPT: %v, want a refusal", rcptErr)
				}
				reply = fmt.Sprintf("%d %d.%d.%d %s", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2], se.Message)
			case "DATA":
				if rcptErr != nil {
					t.Fatalf("RCPT: %v, want accepted", rcptErr)
				}
				w, err := c.Data()
				if err != nil {
					t.Fatalf("DATA: %v", err)
				}
				if _, err := w.Write([]byte(testMessage)); err != nil {
					t.Fatalf("write: %v", err)
				}
				resp, err := w.CloseWithResponse()
				var se *smtp.SMTPError
				switch {
				case errors.As(err, &se):
					reply = fmt.Sprintf("%d %d.%d.%d %s", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2], se.Message)
				case err != nil:
					t.Fatalf("end of DATA: %v", err)
				default:
					// The client returns a success's text without the basic
					// code (250 is all it accepts) but with the enhanced code.
					id, ok := strings.CutPrefix(resp.StatusText, "2.0.0 OK: queued as ")
					if !ok {
						t.Fatalf("reply %q", resp.StatusText)
					}
					reply = "250 2.0.0 OK: queued as <id>"
					if id == "" {
						t.Fatal("empty queue id")
					}
				}
			default:
				t.Fatalf("unknown stage %q", o.Stage)
			}
			if reply != o.Reply {
				t.Errorf("server replied %q, table says %q", reply, o.Reply)
			}
		})
	}
	for _, lp := range []string{"bounce", "defer", "reject-data", "full", "slow", "*"} {
		if !seen[lp] {
			t.Errorf("Outcomes() lacks %q", lp)
		}
	}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	tests := []struct {
		addr string
		want behaviour
	}{
		{"bounce@example.test", behaviourBounce},
		{"BoUnCe@example.test", behaviourBounce},
		{"bounce+a+b@example.test", behaviourBounce},
		{"defer+x@example.test", behaviourDefer},
		{"reject-data@example.test", behaviourRejectData},
		{"full@example.test", behaviourFull},
		{"slow@example.test", behaviourSlow},
		{"Bounce-Async+x@example.test", behaviourBounceAsync},
		{"complaint@example.test", behaviourComplaint},
		{"\"bounce@x\"@example.test", behaviourAccept},
		{"bounce", behaviourBounce},
		{"+bounce@example.test", behaviourAccept},
		{"reject@example.test", behaviourAccept},
		{"", behaviourAccept},
	}
	for _, tt := range tests {
		if got := classify(tt.addr); got != tt.want {
			t.Errorf("classify(%q) = %v, want %v", tt.addr, got, tt.want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     Config
		wantErr string // prefix after "sandbox config: "; "" = valid
	}{
		{"defaults", Config{}, ""},
		{"addr without port", Config{Addr: "127.0.0.1"}, "Addr:"},
		{"negative slow delay", Config{SlowDelay: -time.Second}, "SlowDelay:"},
		{"negative max size", Config{MaxMessageBytes: -1}, "MaxMessageBytes:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.cfg.WithDefaults().validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("validate: %v", err)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
				t.Fatalf("validate = %v, want an error starting %q", err, tt.wantErr)
			}
			s := New(tt.cfg)
			if err := s.Start(context.Background()); err == nil {
				s.Stop()
				t.Fatal("Start accepted an invalid config")
			}
		})
	}
}

func TestWithDefaults(t *testing.T) {
	t.Parallel()
	c := Config{}.WithDefaults()
	if c.Addr != "127.0.0.1:0" || c.Hostname != "sandbox.posthaste.invalid" ||
		c.SlowDelay != 2*time.Second || c.MaxMessageBytes != 40<<20 || c.Logger == nil {
		t.Fatalf("WithDefaults() = %+v", c)
	}
	set := Config{Addr: "127.0.0.1:2525", Hostname: "h.invalid", SlowDelay: time.Second, MaxMessageBytes: 10}
	if got := set.WithDefaults(); got.Addr != set.Addr || got.Hostname != set.Hostname ||
		got.SlowDelay != set.SlowDelay || got.MaxMessageBytes != set.MaxMessageBytes {
		t.Fatalf("WithDefaults() changed set fields: %+v", got)
	}
}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	s := New(Config{Hostname: "mx.sandbox.invalid"})
	if s.Addr() != "" {
		t.Fatalf("Addr() before Start = %q", s.Addr())
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := s.Start(context.Background()); err == nil {
		t.Fatal("second Start succeeded")
	}
	if !strings.HasPrefix(s.Addr(), "127.0.0.1:") || strings.HasSuffix(s.Addr(), ":0") {
		t.Fatalf("Addr() = %q, want 127.0.0.1 and a real port", s.Addr())
	}

	// An idle connection does not hold up Stop, and is closed by it.
	c, err := smtp.Dial(s.Addr())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if err := c.Hello("client.posthaste.test"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	s.Stop()
	s.Stop()
	if err := c.Noop(); err == nil {
		t.Fatal("NOOP succeeded after Stop")
	}
	if err := s.Start(context.Background()); err == nil {
		t.Fatal("Start after Stop succeeded")
	}

	New(Config{}).Stop() // Stop without Start returns
}

func TestGreetingNamesHost(t *testing.T) {
	t.Parallel()
	s := startSandbox(t, Config{Hostname: "mx.sandbox.invalid"})
	conn, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer conn.Close()
	tc := textproto.NewConn(conn)
	code, msg, err := tc.ReadResponse(220)
	if err != nil {
		t.Fatalf("greeting: %d %q %v", code, msg, err)
	}
	if !strings.HasPrefix(msg, "mx.sandbox.invalid ") {
		t.Fatalf("greeting %q does not start with the hostname", msg)
	}
	if err := tc.PrintfLine("QUIT"); err != nil {
		t.Fatalf("QUIT: %v", err)
	}
	if _, _, err := tc.ReadResponse(221); err != nil {
		t.Fatalf("reply to QUIT: %v", err)
	}
}

// TestAsyncReports: bounce-async@ and complaint@ are accepted, and then a
// DSN and a feedback report go from <> to the MAIL FROM address at
// ReportAddr. Mail from the null sender gets none.
func TestAsyncReports(t *testing.T) {
	t.Parallel()
	listener := testenv.StartSMTP(t)
	s := startSandbox(t, Config{ReportAddr: listener.Addr, ReportDelay: time.Millisecond})
	c := dial(t, s.Addr())
	const from = "b+token@bounces.sandbox.invalid"
	if _, err := send(t, c, from, "Bounce-Async@example.test", "someone@example.test", "complaint+x@example.test"); err != nil {
		t.Fatalf("send: %v", err)
	}
	if _, err := send(t, c, "", "bounce-async@example.test"); err != nil {
		t.Fatalf("send from <>: %v", err)
	}
	got := listener.WaitMessages(t, 2, 10*time.Second)
	kinds := map[bounce.Kind]bounce.Report{}
	for _, m := range got {
		if m.From != "" || len(m.To) != 1 || m.To[0] != from {
			t.Errorf("report from %q to %v, want from <> to %s", m.From, m.To, from)
		}
		r := bounce.ParseReport(m.Data)
		kinds[r.Kind] = r
	}
	dsn, ok := kinds[bounce.KindDSN]
	if !ok || len(dsn.Recipients) != 1 {
		t.Fatalf("no DSN with one recipient among %+v", kinds)
	}
	if r := dsn.Recipients[0]; r.FinalRecipient != "Bounce-Async@example.test" || r.Action != "failed" || r.Status != "5.1.1" || r.ReplyCode != 550 {
		t.Errorf("DSN recipient %+v", r)
	}
	if dsn.OriginalMessageID == "" && !strings.Contains(string(got[0].Data)+string(got[1].Data), "Subject: sandbox test") {
		t.Error("the original header was not returned")
	}
	arf, ok := kinds[bounce.KindComplaint]
	if !ok || arf.Feedback == nil || arf.Feedback.Type != "abuse" ||
		len(arf.Feedback.OriginalRcptTo) != 1 || arf.Feedback.OriginalRcptTo[0] != "complaint+x@example.test" {
		t.Errorf("feedback report %+v", arf)
	}
	if n := len(listener.Messages()); n != 2 {
		t.Errorf("%d reports, want 2 (none for mail from <>)", n)
	}
}
