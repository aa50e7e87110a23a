package app_test

import (
	"context"
	"encoding/base32"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/delivery/webhook"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
)

const (
	testBounceDomain = "bounces.posthaste.test"
	testBounceSecret = "bounce-secret-0123456789"
)

// bounceBundle is a running Posthaste with a bounce domain, its listener on
// loopback, an MX for example.test that refuses ratelimit@ with a 5yz rate
// limit and takes everything else, and webhooks allowed to loopback.
type bounceBundle struct {
	*bundle
	store *db.DB
}

func setupBounces(t *testing.T) *bounceBundle {
	t.Helper()
	dns := testenv.StartDNS(t)
	smtpSrv := testenv.StartSMTP(t, testenv.WithRcptReply(func(to string) *smtp.SMTPError {
		if strings.HasPrefix(to, "ratelimit@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
				Message: "Unfortunately, messages from 198.51.100.7 weren't sent: too many messages, try again later"}
		}
		return nil
	}))
	dns.AddMX("example.test", "mx.example.test", 10)
	dns.AddA("mx.example.test", "127.0.0.1")
	cfg := app.Config{
		HTTPAddr:            "127.0.0.1:0",
		GRPCAddr:            "127.0.0.1:0",
		DatabaseURL:         testenv.Database(t),
		BootstrapAPIKey:     testKey,
		Delivery:            delivery.Config{DNSServer: dns.Addr, PollInterval: 100 * time.Millisecond},
		BounceDomain:        testBounceDomain,
		BounceSecrets:       []string{testBounceSecret},
		WebhookAllowPrivate: true,
		Webhook:             webhook.Config{PollInterval: 10 * time.Millisecond, RetrySchedule: []time.Duration{10 * time.Millisecond}},
	}
	cfg.BounceListener.Addr = "127.0.0.1:0"
	// Tests send from a domain nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
	// The test MX is on loopback, which the address guard refuses unless
	// allowed.
	cfg.Delivery.AllowDestinations = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	cfg.Delivery.SMTP.Port = smtpSrv.Port
	cfg.Delivery.SMTP.Hostname = "posthaste.test"
	cfg.Delivery.Retry.InitialInterval = time.Hour
	a := startApp(t, cfg)
	store, err := db.Open(context.Background(), a.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	return &bounceBundle{bundle: &bundle{app: a, smtp: smtpSrv, dns: dns, base: "http://" + a.HTTPAddr()}, store: store}
}

func startApp(t *testing.T, cfg app.Config) *app.App {
	t.Helper()
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return a
}

func (b *bundle) send(t *testing.T, to ...string) string {
	t.Helper()
	var rcpts []any
	for _, a := range to {
		rcpts = append(rcpts, map[string]any{"address": a})
	}
	code, resp := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "shop@posthaste.test"}, "to": rcpts, "subject": "hi", "text": "hello",
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, resp)
	}
	return resp["id"].(string)
}

// waitEvent polls the message's timeline until it has an event of typ and
// returns the events of that type.
func (b *bundle) waitEvent(t *testing.T, id, typ string) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, resp := b.do(t, http.MethodGet, "/v1/messages/"+id+"/events", nil)
		if code != http.StatusOK {
			t.Fatalf("events: %d %v", code, resp)
		}
		var out []map[string]any
		evs, _ := resp["events"].([]any)
		for _, e := range evs {
			if ev := e.(map[string]any); ev["type"] == typ {
				out = append(out, ev)
			}
		}
		if len(out) > 0 {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event for %s; events: %v", typ, id, evs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sendReport delivers a report over SMTP, from the null sender, to rcpt at
// the listener, as a remote MTA would.
func sendReport(addr, rcpt string, msg []byte) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Hello("mx.example.test"); err != nil {
		return err
	}
	if err := c.Mail("", nil); err != nil {
		return err
	}
	if err := c.Rcpt(rcpt, nil); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write(msg); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}

// postfixDSN is a bounce as Postfix sends it after the receiving server
// took the message and the mailbox then turned out not to exist.
func postfixDSN(to, rcpt string) []byte {
	return []byte(strings.ReplaceAll(fmt.Sprintf(`From: MAILER-DAEMON@mx.example.test (Mail Delivery System)
To: %[1]s
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: text/plain; charset=us-ascii

<%[2]s>: host store.example.test said: 550 5.1.1 <%[2]s>: Recipient address
    rejected: User unknown in virtual mailbox table

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.test

Final-Recipient: rfc822; %[2]s
Original-Recipient: rfc822;%[2]s
Action: failed
Status: 5.1.1
Remote-MTA: dns; store.example.test
Diagnostic-Code: smtp; 550 5.1.1 <%[2]s>: Recipient address rejected: User
    unknown in virtual mailbox table

--B1--
`, to, rcpt), "\n", "\r\n"))
}

func feedbackReport(to, rcpt string) []byte {
	return []byte(strings.ReplaceAll(fmt.Sprintf(`From: <feedback@fbl.example.test>
To: %[1]s
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="B2"

--B2
Content-Type: text/plain

An abuse report.

--B2
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: fbl/1.0
Version: 1
Original-Mail-From: <%[1]s>
Original-Rcpt-To: <%[2]s>

--B2--
`, to, rcpt), "\n", "\r\n"))
}

// TestBounceLoop is the whole loop: a message is delivered to the MX, which
// later sends a DSN to the envelope sender it saw; the recipient turns
// bounced with its class, the bounced event reaches a webhook, and the
// address is suppressed.
func TestBounceLoop(t *testing.T) {
	t.Parallel()
	b := setupBounces(t)
	var (
		mu    sync.Mutex
		hooks []string
	)
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		hooks = append(hooks, string(body))
		mu.Unlock()
	}))
	defer rcv.Close()
	if code, resp := b.do(t, http.MethodPost, "/v1/webhooks", map[string]any{
		"url": rcv.URL, "event_types": []string{"bounced", "suppressed"},
	}); code != http.StatusOK {
		t.Fatalf("create webhook: %d %v", code, resp)
	}

	id := b.send(t, "alice@example.test")
	b.waitStatus(t, id, "delivered")
	got := b.smtp.Messages()
	if len(got) != 1 {
		t.Fatalf("MX received %d messages", len(got))
	}
	from := got[0].From
	if !strings.HasSuffix(from, "@"+testBounceDomain) || !strings.HasPrefix(from, "b+") {
		t.Fatalf("MAIL FROM %q is not a VERP address at %s", from, testBounceDomain)
	}
	if !strings.Contains(string(got[0].Data), "From: <shop@posthaste.test>") && !strings.Contains(string(got[0].Data), "From: shop@posthaste.test") {
		t.Errorf("visible From changed:\n%s", got[0].Data)
	}

	if err := sendReport(b.app.BounceAddr(), from, postfixDSN(from, "alice@example.test")); err != nil {
		t.Fatalf("send DSN: %v", err)
	}
	msg := b.waitStatus(t, id, "bounced")
	rec := msg["recipients"].([]any)[0].(map[string]any)
	if reply := rec["last_reply"].(map[string]any); reply["code"] != float64(550) || reply["enhanced_code"] != "5.1.1" {
		t.Errorf("last reply %v", reply)
	}
	bounced := b.waitEvent(t, id, "bounced")
	if ev := bounced[0]; ev["class"] != "recipient" || ev["permanent"] != true || ev["dsn_action"] != "failed" ||
		ev["dsn_status"] != "5.1.1" || ev["remote_mta"] != "store.example.test" {
		t.Errorf("bounced event %v", ev)
	}
	if ev := b.waitEvent(t, id, "suppressed")[0]; ev["reason"] != "hard_bounce" {
		t.Errorf("suppressed event %v", ev)
	}
	s, err := b.store.GetSuppression(context.Background(), db.DefaultProjectID(), "alice@example.test")
	if err != nil || s.Reason != db.SuppressionHardBounce || s.MessageID.String() != id {
		t.Errorf("suppression %+v, %v", s, err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		n := len(hooks)
		joined := strings.Join(hooks, "\n")
		mu.Unlock()
		if n >= 2 {
			if !strings.Contains(joined, `"type": "bounced"`) || !strings.Contains(joined, `"class": "recipient"`) {
				t.Errorf("webhook bodies %s", joined)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("webhook got %d requests: %s", n, joined)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestBounceListenerRefusesBadAddresses goes through the wired app: a
// forged token, a guessed one, a token of another recipient altered to
// name a third, and another domain are refused at RCPT.
func TestBounceListenerRefusesBadAddresses(t *testing.T) {
	t.Parallel()
	b := setupBounces(t)
	id := b.send(t, "carol@example.test")
	b.waitStatus(t, id, "delivered")
	real := b.smtp.Messages()[0].From
	local, _, _ := strings.Cut(real, "@")
	flip := []byte(local)
	last := len(flip) - 3
	if flip[last] == 'a' {
		flip[last] = 'b'
	} else {
		flip[last] = 'a'
	}
	stranger, err := bounce.NewVERP(testBounceDomain, "", [][]byte{[]byte("not-the-secret-0123456789")})
	if err != nil {
		t.Fatal(err)
	}
	// The real token with the recipient position changed, its MAC kept.
	raw, err := base32.StdEncoding.WithPadding(base32.NoPadding).DecodeString(strings.ToUpper(local[2:]))
	if err != nil || len(raw) != 31 {
		t.Fatalf("decode token %q: %v (%d bytes)", local, err, len(raw))
	}
	raw[20]++
	otherRcpt := "b+" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(raw)) + "@" + testBounceDomain
	for name, rcpt := range map[string]string{
		"altered token":                   string(flip) + "@" + testBounceDomain,
		"another recipient":               otherRcpt,
		"guessed token":                   "b+" + strings.Repeat("a", 50) + "@" + testBounceDomain,
		"forged with a stranger's secret": stranger.Address(uuid.MustParse(id), bounce.RecipientAt(1)),
		"unknown local part":              "postmaster@" + testBounceDomain,
		"another domain":                  "b+" + local[2:] + "@example.test",
	} {
		err := sendReport(b.app.BounceAddr(), rcpt, postfixDSN(rcpt, "carol@example.test"))
		var se *smtp.SMTPError
		if !errors.As(err, &se) || se.Code != 550 {
			t.Errorf("%s (%s): %v, want 550 at RCPT", name, rcpt, err)
			continue
		}
		want := smtp.EnhancedCode{5, 1, 1}
		if name == "another domain" {
			want = smtp.EnhancedCode{5, 7, 1}
		}
		if se.EnhancedCode != want {
			t.Errorf("%s: enhanced code %v, want %v", name, se.EnhancedCode, want)
		}
	}
	if msg := b.waitStatus(t, id, "delivered"); msg["status"] != "delivered" {
		t.Errorf("status %v", msg["status"])
	}
}

func TestComplaintSuppresses(t *testing.T) {
	t.Parallel()
	b := setupBounces(t)
	id := b.send(t, "dave@example.test")
	b.waitStatus(t, id, "delivered")
	from := b.smtp.Messages()[0].From
	if err := sendReport(b.app.BounceAddr(), from, feedbackReport(from, "dave@example.test")); err != nil {
		t.Fatal(err)
	}
	if ev := b.waitEvent(t, id, "complained")[0]; ev["recipient_id"] == nil || ev["reason"] != "abuse" {
		t.Errorf("complained event %v", ev)
	}
	if ev := b.waitEvent(t, id, "suppressed")[0]; ev["reason"] != "complaint" {
		t.Errorf("suppressed event %v", ev)
	}
	if s, err := b.store.GetSuppression(context.Background(), db.DefaultProjectID(), "dave@example.test"); err != nil || s.Reason != db.SuppressionComplaint {
		t.Errorf("suppression %+v, %v", s, err)
	}
	if msg := b.waitStatus(t, id, "delivered"); msg["status"] != "delivered" {
		t.Errorf("status after a complaint: %v", msg["status"])
	}
}

// TestRateLimitRefusalIsNotSuppressed: a 550 that says "too many messages"
// bounces the recipient, as every 5yz does, but it is a rate limit, which is
// never permanent for the address: nothing is suppressed.
func TestRateLimitRefusalIsNotSuppressed(t *testing.T) {
	t.Parallel()
	b := setupBounces(t)
	id := b.send(t, "ratelimit@example.test")
	b.waitStatus(t, id, "bounced")
	if ev := b.waitEvent(t, id, "bounced")[0]; ev["class"] != "rate_limit" || ev["permanent"] == true {
		t.Errorf("bounced event %v", ev)
	}
	if _, err := b.store.GetSuppression(context.Background(), db.DefaultProjectID(), "ratelimit@example.test"); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("rate limit suppressed: %v", err)
	}
}

// TestSandboxAsyncOutcomes runs serve --sandbox without a bounce domain:
// bounce-async@ is delivered and then bounced by a DSN, complaint@ is
// delivered and then complained about, both sent by the sandbox to the
// local listener.
func TestSandboxAsyncOutcomes(t *testing.T) {
	t.Parallel()
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Sandbox:         true,
	}
	cfg.Delivery.PollInterval = 100 * time.Millisecond
	cfg.SandboxServer.ReportDelay = 50 * time.Millisecond
	a := startApp(t, cfg)
	if a.BounceAddr() == "" {
		t.Fatal("no bounce listener in sandbox mode")
	}
	b := &bundle{app: a, base: "http://" + a.HTTPAddr()}
	bounced := b.send(t, "bounce-async@example.com")
	complained := b.send(t, "complaint@example.com")

	msg := b.waitStatus(t, bounced, "bounced")
	if ev := b.waitEvent(t, bounced, "bounced")[0]; ev["class"] != "recipient" || ev["dsn_action"] != "failed" {
		t.Errorf("bounced event %v", ev)
	}
	b.waitEvent(t, bounced, "delivered")
	if rec := msg["recipients"].([]any)[0].(map[string]any); rec["delivered_at"] == nil {
		t.Errorf("bounce-async@ was never delivered: %v", rec)
	}
	b.waitEvent(t, bounced, "suppressed")

	b.waitEvent(t, complained, "complained")
	if ev := b.waitEvent(t, complained, "suppressed")[0]; ev["reason"] != "complaint" {
		t.Errorf("suppressed event %v", ev)
	}
	if msg := b.waitStatus(t, complained, "delivered"); msg["status"] != "delivered" {
		t.Errorf("complaint@ status %v", msg["status"])
	}
}
