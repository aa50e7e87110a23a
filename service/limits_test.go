package service_test

import (
	"bytes"
	"encoding/hex"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// restrictedKey makes a send key of the default project that may only
// send from domains.
func restrictedKey(t *testing.T, e *env, domains ...string) string {
	t.Helper()
	key, prefix, hash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.CreateAPIKey(t.Context(), db.NewAPIKeyParams{Name: "restricted", Prefix: prefix, Hash: hash,
		Scopes: []string{db.ScopeSend, db.ScopeRead}, SenderDomains: domains}); err != nil {
		t.Fatal(err)
	}
	return key
}

func TestSenderDomainsRestrictKey(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	ctx := withKey(t.Context(), restrictedKey(t, e, "example.test"))

	req := validRequest()
	req.From.Address = "ada@other.test"
	_, err := e.client.SendMessage(ctx, req)
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), "from") {
		t.Fatalf("From at another domain: %v, want PermissionDenied naming from", err)
	}
	if got := violations(err); len(got) != 1 || got[0] != "from" {
		t.Fatalf("violations %v, want [from]", got)
	}
	for name, raw := range map[string]*posthastev1.SendRawMessageRequest{
		"envelope_from": {Raw: b64("From: ada@example.test\r\nSubject: x\r\n\r\nhi\r\n"), EnvelopeFrom: "b@other.test",
			Recipients: []string{"bob@example.test"}},
		"raw": {Raw: b64("From: ada@other.test\r\nSubject: x\r\n\r\nhi\r\n"), EnvelopeFrom: "b@example.test",
			Recipients: []string{"bob@example.test"}},
	} {
		_, err := e.client.SendRawMessage(ctx, raw)
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("raw, %s at another domain: %v, want PermissionDenied", name, err)
		}
		if got := violations(err); len(got) != 1 || got[0] != name {
			t.Fatalf("raw: violations %v, want [%s]", got, name)
		}
	}
	batch, err := e.client.SendBatch(ctx, &posthastev1.SendBatchRequest{Messages: []*posthastev1.SendMessageRequest{req}})
	if err != nil {
		t.Fatal(err)
	}
	if e := batch.GetResults()[0].GetError(); e.GetStatus() != "PERMISSION_DENIED" || e.GetCode() != 403 ||
		len(e.GetFieldViolations()) != 1 || e.GetFieldViolations()[0].GetField() != "messages[0].from" {
		t.Fatalf("batch item: %v", e)
	}
	if m, _ := e.counts(t); m != 0 {
		t.Fatalf("%d messages stored from refused senders", m)
	}

	req.From.Address = "ada@Example.TEST"
	if _, err := e.client.SendMessage(ctx, req); err != nil {
		t.Fatalf("From at the allowed domain: %v", err)
	}

	// An admin key makes restricted keys over the API.
	admin, _ := createScopedKey(t, e.store, db.DefaultProjectID(), "admin", db.ScopeAdmin)
	resp, err := e.client.CreateApiKey(withKey(t.Context(), admin), &posthastev1.CreateApiKeyRequest{
		Name: "shop", SenderDomains: []string{"Shop.Example", "mail.shop.example"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetApiKey().GetSenderDomains(); len(got) != 2 || got[0] != "shop.example" {
		t.Fatalf("sender domains %v", got)
	}
	_, err = e.client.CreateApiKey(withKey(t.Context(), admin), &posthastev1.CreateApiKeyRequest{
		Name: "bad", SenderDomains: []string{"not a domain"}})
	if got := violations(err); status.Code(err) != codes.InvalidArgument || len(got) != 1 || got[0] != "sender_domains" {
		t.Fatalf("bad sender domain: %v", err)
	}
}

// retryInfo returns the error's reason and RetryInfo delay in seconds.
func retryInfo(t *testing.T, err error) (string, float64) {
	t.Helper()
	var reason string
	delay := -1.0
	for _, d := range status.Convert(err).Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			reason = d.GetReason()
		case *errdetails.RetryInfo:
			delay = d.GetRetryDelay().AsDuration().Seconds()
		}
	}
	return reason, delay
}

func TestRequestsPerSecondPerKey(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{RequestsPerSecond: 2})
	var refused error
	for range 10 {
		if _, err := e.client.SendMessage(e.ctx(t), validRequest()); err != nil {
			refused = err
			break
		}
	}
	if status.Code(refused) != codes.ResourceExhausted {
		t.Fatalf("10 calls at once with 2 per second: %v, want ResourceExhausted", refused)
	}
	if reason, delay := retryInfo(t, refused); reason != service.ReasonRateLimited || delay < 1 {
		t.Fatalf("reason %q, retry delay %vs", reason, delay)
	}
	m, _ := e.counts(t)
	if m < 2 || m > 9 {
		t.Fatalf("%d messages stored", m)
	}
	// A key's override of 0 lifts the limit for that key only.
	zero := 0
	key, prefix, hash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.CreateAPIKey(t.Context(), db.NewAPIKeyParams{Name: "bulk", Prefix: prefix, Hash: hash,
		Scopes: []string{db.ScopeRead}, RequestsPerSecond: &zero}); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if _, err := e.client.ListMessages(withKey(t.Context(), key), &posthastev1.ListMessagesRequest{}); err != nil {
			t.Fatalf("call %d with an unlimited key: %v", i, err)
		}
	}
}

func TestRecipientsPerDayPerProject(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{RecipientsPerDay: 4})
	req := validRequest() // two recipients
	req.IdempotencyKey = "first"
	if _, err := e.client.SendMessage(e.ctx(t), req); err != nil {
		t.Fatal(err)
	}
	// A replay stores nothing, and what it counted is taken back.
	if _, err := e.client.SendMessage(e.ctx(t), req); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.SendMessage(e.ctx(t), validRequest()); err != nil {
		t.Fatalf("recipients 3 and 4 of the day: %v", err)
	}
	one := validRequest()
	one.To = one.To[:1]
	_, err := e.client.SendMessage(e.ctx(t), one)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a fifth recipient with a limit of 4: %v, want ResourceExhausted", err)
	}
	if reason, delay := retryInfo(t, err); reason != service.ReasonRateLimited || delay < 1 || delay > 86400 {
		t.Fatalf("reason %q, retry delay %vs (until the next UTC day)", reason, delay)
	}
	if m, r := e.counts(t); m != 2 || r != 4 {
		t.Fatalf("stored %d messages, %d recipients; want 2 and 4", m, r)
	}
	// The project's override wins over the default.
	more := int64(100)
	if err := e.store.SetProjectLimits(t.Context(), db.DefaultProjectID(), db.ProjectLimits{RecipientsPerDay: &more}); err != nil {
		t.Fatal(err)
	}
	fresh, _ := createKey(t, e.store, "fresh") // not in the key cache yet
	if _, err := e.client.SendMessage(withKey(t.Context(), fresh), one); err != nil {
		t.Fatalf("after raising the project's limit: %v", err)
	}
}

// syncBuffer is a bytes.Buffer for a logger written from several
// goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFailedAuthLogsNoSecret makes authentication fail every way it can,
// the database being away included, with every log level on, and looks for
// the key (and its hash) in the log and in the errors.
func TestFailedAuthLogsNoSecret(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e := setup(t, service.Config{Logger: logger, APIKeyCacheTTL: -1})
	e.conn = serve(t, service.NewGRPCServer(e.srv, e.store, logger))
	client := posthastev1.NewMailServiceClient(e.conn)
	unknown, _, unknownHash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	revoked, revokedID := createKey(t, e.store, "revoked")
	if _, err := e.store.RevokeAPIKey(t.Context(), db.DefaultProjectID(), revokedID); err != nil {
		t.Fatal(err)
	}
	secrets := []string{unknown, revoked, e.key, hex.EncodeToString(unknownHash), hex.EncodeToString(service.HashAPIKey(e.key))}
	var answers []string
	call := func(key string) {
		_, err := client.SendMessage(withKey(t.Context(), key), validRequest())
		if err == nil {
			t.Fatalf("call with key %.6s... succeeded", key)
		}
		answers = append(answers, err.Error())
	}
	call(unknown)
	call(revoked)
	call(unknown + "\r\nX-Injected: 1")
	// With the database away the lookup fails, and the failure is logged.
	e.proxy.Stop()
	call(e.key)
	call(unknown)
	out := logs.String() + strings.Join(answers, "\n")
	if !strings.Contains(out, "database unavailable") {
		t.Fatalf("the database failure was not logged; log:\n%s", logs.String())
	}
	for _, s := range secrets {
		if strings.Contains(out, s) || strings.Contains(out, s[:20]) {
			t.Fatalf("a secret (%.6s...) appears in the log or an error:\n%s", s, out)
		}
	}
}
