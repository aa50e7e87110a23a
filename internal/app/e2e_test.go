package app_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"mime"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message/mail"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

const testKey = "ph_test_key_0123456789abcdef"

// bundle is one running Posthaste wired to a loopback DNS server that names
// a go-smtp server as the MX of example.test.
type bundle struct {
	app  *app.App
	smtp *testenv.SMTPServer
	dns  *testenv.DNSServer
	base string
}

func setup(t *testing.T, opts ...testenv.SMTPOption) *bundle {
	t.Helper()
	dns := testenv.StartDNS(t)
	smtpSrv := testenv.StartSMTP(t, opts...)
	dns.AddMX("example.test", "mx.example.test", 10)
	dns.AddA("mx.example.test", "127.0.0.1")

	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Delivery: delivery.Config{
			DNSServer:    dns.Addr,
			PollInterval: 100 * time.Millisecond,
		},
	}
	cfg.Delivery.SMTP.Port = smtpSrv.Port
	cfg.Delivery.SMTP.Hostname = "posthaste.test"
	// The test MX is on loopback, which the destination guard refuses
	// unless allowed.
	cfg.Delivery.AllowDestinations = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	cfg.Delivery.Retry.InitialInterval = 200 * time.Millisecond
	cfg.Delivery.Retry.MaxInterval = time.Second
	// Tests send from domains nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
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
	return &bundle{app: a, smtp: smtpSrv, dns: dns, base: "http://" + a.HTTPAddr()}
}

func (b *bundle) do(t *testing.T, method, path string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		buf, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(buf)
	}
	req, err := http.NewRequest(method, b.base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(resp.Body)
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("%s %s: status %d, body not JSON: %s", method, path, resp.StatusCode, raw)
		}
	}
	return resp.StatusCode, out
}

// waitStatus polls GET /v1/messages/{id} until the message has the status.
func (b *bundle) waitStatus(t *testing.T, id, status string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last map[string]any
	for time.Now().Before(deadline) {
		code, msg := b.do(t, http.MethodGet, "/v1/messages/"+id, nil)
		if code != http.StatusOK {
			t.Fatalf("get: status %d: %v", code, msg)
		}
		if msg["status"] == status {
			return msg
		}
		last = msg
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("message %s never reached %q; last: %v", id, status, last)
	return nil
}

func TestSendOverRESTIsDeliveredToTheMX(t *testing.T) {
	t.Parallel()
	b := setup(t)
	attachment := []byte("%PDF-1.4\x00\x01\x02 binary \xff\xfe bytes")
	code, resp := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from":    map[string]any{"address": "sender@posthaste.test", "name": "Zoë Sender"},
		"to":      []any{map[string]any{"address": "alice@example.test", "name": "Alice"}},
		"bcc":     []any{map[string]any{"address": "hidden@example.test"}},
		"subject": "Grüße aus Köln ✉",
		"text":    "Hello Alice, plain.",
		"html":    "<p>Hello <b>Alice</b></p>",
		"attachments": []any{map[string]any{
			"filename":     "report.pdf",
			"content_type": "application/pdf",
			"content":      base64.StdEncoding.EncodeToString(attachment),
		}},
		"tags":     []any{"welcome"},
		"metadata": map[string]any{"user_id": "42"},
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: status %d: %v", code, resp)
	}
	id, _ := resp["id"].(string)
	if id == "" || resp["message_id_header"] == "" {
		t.Fatalf("send: missing id or message_id_header: %v", resp)
	}
	if n := len(resp["recipients"].([]any)); n != 2 {
		t.Fatalf("send: %d recipients in answer, want 2", n)
	}

	msg := b.waitStatus(t, id, "delivered")
	attempts, _ := msg["attempts"].([]any)
	if len(attempts) == 0 {
		t.Fatalf("no attempt recorded: %v", msg)
	}
	first := attempts[0].(map[string]any)
	if first["mx_host"] != "mx.example.test" || first["ip"] != "127.0.0.1" {
		t.Errorf("attempt host/ip = %v/%v, want mx.example.test/127.0.0.1", first["mx_host"], first["ip"])
	}
	for _, r := range msg["recipients"].([]any) {
		rec := r.(map[string]any)
		if rec["status"] != "delivered" || rec["delivered_at"] == nil {
			t.Errorf("recipient %v not delivered: %v", rec["address"], rec)
		}
		reply, _ := rec["last_reply"].(map[string]any)
		if reply == nil || reply["code"] != float64(250) {
			t.Errorf("recipient %v last_reply = %v, want code 250", rec["address"], reply)
		}
	}

	got := b.smtp.WaitMessages(t, 1, 10*time.Second)
	if len(got) != 1 {
		t.Fatalf("MX received %d transactions, want 1 (both recipients in one)", len(got))
	}
	if strings.Join(got[0].To, ",") != "alice@example.test,hidden@example.test" {
		t.Errorf("RCPT TO = %v", got[0].To)
	}
	if got[0].From != "sender@posthaste.test" {
		t.Errorf("MAIL FROM = %q", got[0].From)
	}
	checkReceived(t, got[0].Data, attachment)
}

// checkReceived parses the bytes the MX got back into the intended structure.
func checkReceived(t *testing.T, data, attachment []byte) {
	t.Helper()
	if bytes.Contains(bytes.ToLower(data), []byte("\nbcc:")) || bytes.Contains(data, []byte("hidden@example.test")) {
		t.Errorf("Bcc leaked into the message:\n%s", data)
	}
	mr, err := mail.CreateReader(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("parse received message: %v", err)
	}
	subject, err := mr.Header.Subject()
	if err != nil || subject != "Grüße aus Köln ✉" {
		t.Errorf("subject = %q (%v)", subject, err)
	}
	from, err := mr.Header.AddressList("From")
	if err != nil || len(from) != 1 || from[0].Name != "Zoë Sender" {
		t.Errorf("from = %v (%v)", from, err)
	}
	var text, html string
	var gotAttachment []byte
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("next part: %v", err)
		}
		body, _ := io.ReadAll(p.Body)
		switch h := p.Header.(type) {
		case *mail.InlineHeader:
			ct, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
			switch ct {
			case "text/plain":
				text = string(body)
			case "text/html":
				html = string(body)
			}
		case *mail.AttachmentHeader:
			name, _ := h.Filename()
			if name != "report.pdf" {
				t.Errorf("attachment filename = %q", name)
			}
			gotAttachment = body
		}
	}
	if strings.TrimSpace(text) != "Hello Alice, plain." {
		t.Errorf("text = %q", text)
	}
	if !strings.Contains(html, "<b>Alice</b>") {
		t.Errorf("html = %q", html)
	}
	if !bytes.Equal(gotAttachment, attachment) {
		t.Errorf("attachment = %q, want %q", gotAttachment, attachment)
	}
}

func TestSendOverGRPCIsDelivered(t *testing.T) {
	t.Parallel()
	b := setup(t)
	conn, err := grpc.NewClient(b.app.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := posthastev1.NewMailServiceClient(conn)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+testKey)
	attachment := []byte("%PDF-1.4\x00\x01\x02 binary \xff\xfe bytes")
	resp, err := client.SendMessage(ctx, &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: "sender@posthaste.test", Name: "Zoë Sender"},
		To:      []*posthastev1.Address{{Address: "bob@example.test", Name: "Bob"}},
		Bcc:     []*posthastev1.Address{{Address: "hidden@example.test"}},
		Subject: "Grüße aus Köln ✉",
		Text:    "Hello Alice, plain.",
		Html:    "<p>Hello <b>Alice</b></p>",
		Attachments: []*posthastev1.Attachment{{
			Filename:    "report.pdf",
			ContentType: "application/pdf",
			Content:     base64.StdEncoding.EncodeToString(attachment),
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		msg, err := client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: resp.GetId()})
		if err != nil {
			t.Fatal(err)
		}
		if msg.GetStatus() == "delivered" {
			// One attempt row per recipient (bob and the Bcc), from one SMTP transaction.
			if len(msg.GetAttempts()) != 2 || msg.GetAttempts()[0].GetReply().GetCode() != 250 {
				t.Errorf("attempts = %v", msg.GetAttempts())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not delivered: %v", msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
	got := b.smtp.Messages()
	if len(got) != 1 || strings.Join(got[0].To, ",") != "bob@example.test,hidden@example.test" {
		t.Fatalf("MX received %v", got)
	}
	checkReceived(t, got[0].Data, attachment)
}

func TestCRLFInSubjectIsRefusedAndNothingStored(t *testing.T) {
	t.Parallel()
	b := setup(t)
	code, resp := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from":    map[string]any{"address": "sender@posthaste.test"},
		"to":      []any{map[string]any{"address": "alice@example.test"}},
		"subject": "hi\r\nBcc: victim@example.test",
		"text":    "x",
	})
	if code != http.StatusBadRequest {
		t.Fatalf("status %d, want 400: %v", code, resp)
	}
	body, _ := json.Marshal(resp)
	if !strings.Contains(string(body), `"subject"`) {
		t.Errorf("error does not name subject: %s", body)
	}
	code, list := b.do(t, http.MethodGet, "/v1/messages", nil)
	if code != http.StatusOK {
		t.Fatalf("list: %d %v", code, list)
	}
	if msgs, _ := list["messages"].([]any); len(msgs) != 0 {
		t.Errorf("a message was stored: %v", msgs)
	}
}

// TestScheduledAndCanceled sends two messages for the same near future:
// the one canceled before its time is never attempted, the other is
// delivered after send_at and not before.
func TestScheduledAndCanceled(t *testing.T) {
	t.Parallel()
	b := setup(t)
	sendAt := time.Now().Add(4 * time.Second).UTC()
	send := func(to string) string {
		code, resp := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
			"from":    map[string]any{"address": "sender@posthaste.test"},
			"to":      []any{map[string]any{"address": to}},
			"subject": "later",
			"text":    "x",
			"send_at": sendAt.Format(time.RFC3339Nano),
		})
		if code != http.StatusAccepted || resp["recipients"].([]any)[0].(map[string]any)["status"] != "scheduled" {
			t.Fatalf("send: %d %v", code, resp)
		}
		return resp["id"].(string)
	}
	kept := send("kept@example.test")
	canceled := send("canceled@example.test")
	code, resp := b.do(t, http.MethodPost, "/v1/messages/"+canceled+":cancel", map[string]any{})
	if code != http.StatusOK || resp["status"] != "canceled" {
		t.Fatalf("cancel: %d %v", code, resp)
	}

	msg := b.waitStatus(t, kept, "delivered")
	attempts := msg["attempts"].([]any)
	started, err := time.Parse(time.RFC3339Nano, attempts[0].(map[string]any)["started_at"].(string))
	if err != nil {
		t.Fatal(err)
	}
	if started.Before(sendAt) {
		t.Errorf("attempted at %v, before send_at %v", started, sendAt)
	}
	// The kept message was claimed in a poll after send_at; by then the
	// canceled one was due too and must have been skipped.
	_, got := b.do(t, http.MethodGet, "/v1/messages/"+canceled, nil)
	rec := got["recipients"].([]any)[0].(map[string]any)
	canceledAttempts, _ := got["attempts"].([]any)
	if got["status"] != "canceled" || rec["attempt_count"] != 0.0 || len(canceledAttempts) != 0 {
		t.Errorf("canceled message was touched: %v", got)
	}
	for _, m := range b.smtp.Messages() {
		if slices.Contains(m.To, "canceled@example.test") {
			t.Errorf("canceled recipient reached the MX: %v", m.To)
		}
	}
}

func TestBootstrapKeyStoredOnceAndHashed(t *testing.T) {
	t.Parallel()
	b := setup(t)
	store, err := db.Open(context.Background(), b.app.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	keys, err := store.ListAPIKeys(context.Background(), db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].Name != "bootstrap" || keys[0].Prefix != service.APIKeyListPrefix(testKey) ||
		!slices.Equal(keys[0].Scopes, []string{db.ScopeAdmin}) {
		t.Fatalf("keys = %+v, want one admin bootstrap key of the default project with a short prefix", keys)
	}
	if _, err := store.LookupAPIKey(context.Background(), service.HashAPIKey(testKey)); err != nil {
		t.Errorf("bootstrap key not found by its hash: %v", err)
	}
}
