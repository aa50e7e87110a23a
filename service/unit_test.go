package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

func TestNewAPIKey(t *testing.T) {
	t.Parallel()
	key, prefix, hash, err := NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(key, "ph_") || len(key) != 55 {
		t.Errorf("key %q: want ph_ and 52 base32 characters", key)
	}
	if !strings.HasPrefix(key, prefix) || len(prefix) < 10 || len(prefix) >= len(key)/2 {
		t.Errorf("prefix %q of key %q", prefix, key)
	}
	if string(hash) != string(HashAPIKey(key)) || len(hash) != 32 {
		t.Errorf("hash is not HashAPIKey(key)")
	}
	if !plausibleAPIKey(key) {
		t.Errorf("plausibleAPIKey(%q) = false", key)
	}
	other, _, _, err := NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if other == key {
		t.Error("two keys are equal")
	}
	for _, bad := range []string{"", "ph_", "fifteen-chars-x", key[:10] + " " + key[11:], key[:10] + "\x00" + key[11:], key[:10] + "é" + key[12:], strings.Repeat("k", 257)} {
		if plausibleAPIKey(bad) {
			t.Errorf("plausibleAPIKey(%q) = true", bad)
		}
	}
	if !plausibleAPIKey("operator-chosen-bootstrap-key") {
		t.Error("an operator-chosen key of printable ASCII is refused")
	}
}

func TestBearerToken(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"Bearer abc", "abc", true},
		{"bearer abc", "abc", true},
		{"BEARER  abc ", "abc", true},
		{"Basic abc", "", false},
		{"Bearer", "", false},
		{"Bearer ", "", false},
		{"abc", "", false},
		{"", "", false},
	} {
		got, ok := bearerToken(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("bearerToken(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestPageTokenRoundTrip(t *testing.T) {
	t.Parallel()
	c := db.Cursor{CreatedAt: time.Date(2031, 5, 6, 7, 8, 9, 123456000, time.UTC), ID: uuid.Must(uuid.NewV7())}
	got, err := decodePageToken(encodePageToken(c))
	if err != nil {
		t.Fatal(err)
	}
	if !got.CreatedAt.Equal(c.CreatedAt) || got.ID != c.ID {
		t.Errorf("round trip: got %+v, want %+v", got, c)
	}
	tok := encodePageToken(c)
	for _, bad := range []string{"x", "!!!!", tok[:len(tok)-2], "Z" + tok[1:], tok + "AA"} {
		if _, err := decodePageToken(bad); err == nil {
			t.Errorf("decodePageToken(%q) succeeded", bad)
		}
	}
}

func TestRequestHash(t *testing.T) {
	t.Parallel()
	a := &posthastev1.SendMessageRequest{
		Subject:        "hi",
		Metadata:       map[string]string{"a": "1", "b": "2", "c": "3", "d": "4"},
		IdempotencyKey: "k1",
	}
	b := &posthastev1.SendMessageRequest{
		Subject:        "hi",
		Metadata:       map[string]string{"d": "4", "c": "3", "b": "2", "a": "1"},
		IdempotencyKey: "k2",
	}
	ha, err := requestHash(a)
	if err != nil {
		t.Fatal(err)
	}
	hb, err := requestHash(b)
	if err != nil {
		t.Fatal(err)
	}
	if string(ha) != string(hb) {
		t.Error("equal requests with different keys hash differently")
	}
	if a.IdempotencyKey != "k1" {
		t.Error("requestHash modified the request")
	}
	b.Subject = "hi!"
	hc, _ := requestHash(b)
	if string(hc) == string(ha) {
		t.Error("different requests hash equally")
	}
	// A raw request encoding to the same bytes is still a different request.
	hr, _ := requestHash(&posthastev1.SendRawMessageRequest{})
	he, _ := requestHash(&posthastev1.SendMessageRequest{})
	if string(hr) == string(he) {
		t.Error("empty raw and built requests hash equally")
	}
}

func TestToStatus(t *testing.T) {
	t.Parallel()
	logger := slog.New(slog.DiscardHandler)
	ctx := context.Background()
	for _, tc := range []struct {
		err  error
		code codes.Code
		msg  string
	}{
		{fmt.Errorf("get message x: %w", db.ErrNotFound), codes.NotFound, "message not found"},
		{fmt.Errorf("insert: %w", db.ErrIdempotencyConflict), codes.AlreadyExists, "idempotency key"},
		{fmt.Errorf("insert: %w: dial tcp 10.0.0.1:5432", db.ErrUnavailable), codes.Unavailable, "temporarily unavailable"},
		{fmt.Errorf("x: %w", context.Canceled), codes.Canceled, "canceled"},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), codes.DeadlineExceeded, "deadline"},
		{&unauthenticatedError{reason: "invalid API key"}, codes.Unauthenticated, "invalid API key"},
		{errors.New(`pq: relation "secret_table" does not exist`), codes.Internal, "internal error"},
	} {
		st := status.Convert(toStatus(ctx, logger, tc.err))
		if st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
			t.Errorf("toStatus(%v) = %v %q; want %v containing %q", tc.err, st.Code(), st.Message(), tc.code, tc.msg)
		}
		if strings.Contains(st.Message(), "secret_table") || strings.Contains(st.Message(), "10.0.0.1") {
			t.Errorf("toStatus(%v) leaks the cause: %q", tc.err, st.Message())
		}
	}
	if toStatus(ctx, logger, nil) != nil {
		t.Error("toStatus(nil) != nil")
	}

	st := status.Convert(toStatus(ctx, logger, &invalidArgumentError{violations: []fieldViolation{
		{"subject", "must not contain CR or LF"}, {"to[0].address", "bad"}, {"tags", "too many"},
	}}))
	if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "subject") || !strings.Contains(st.Message(), "2 more") {
		t.Errorf("invalid argument status %v %q", st.Code(), st.Message())
	}
	var fields []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	if strings.Join(fields, ",") != "subject,to[0].address,tags" {
		t.Errorf("field violations %v", fields)
	}

	st = status.Convert(toStatus(ctx, logger, &messageTooLargeError{size: 11, limit: 10}))
	var reason string
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			reason = info.GetReason()
		}
	}
	if st.Code() != codes.ResourceExhausted || reason != ReasonMessageTooLarge {
		t.Errorf("too large: %v reason %q", st.Code(), reason)
	}
}

func TestRecoverInterceptor(t *testing.T) {
	t.Parallel()
	var buf strings.Builder
	ic := interceptors{logger: slog.New(slog.NewTextHandler(&buf, nil))}
	_, err := ic.recoverUnary(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/x/Y"},
		func(context.Context, any) (any, error) { panic("boom") })
	if st := status.Convert(err); st.Code() != codes.Internal || st.Message() != "internal error" {
		t.Errorf("after panic: %v %q", st.Code(), st.Message())
	}
	if !strings.Contains(buf.String(), "boom") {
		t.Errorf("panic not logged: %q", buf.String())
	}
}

func TestConfig(t *testing.T) {
	t.Parallel()
	c := Config{}.WithDefaults()
	if c.MaxRecipients != 50 || c.MaxMessageBytes != 10<<20 || c.IdempotencyTTL != 24*time.Hour || c.Logger == nil || c.Hostname == "" {
		t.Errorf("defaults: %+v", c)
	}
	if err := c.validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
	for _, tc := range []struct {
		mod   func(*Config)
		field string
	}{
		{func(c *Config) { c.MaxRecipients = -1 }, "MaxRecipients"},
		{func(c *Config) { c.MaxMessageBytes = 100 }, "MaxMessageBytes"},
		{func(c *Config) { c.Hostname = "single" }, "Hostname"},
		{func(c *Config) { c.Hostname = "bad host.test" }, "Hostname"},
		{func(c *Config) { c.IdempotencyTTL = -time.Second }, "IdempotencyTTL"},
		// The API promises keys are kept at least a day.
		{func(c *Config) { c.IdempotencyTTL = time.Hour }, "IdempotencyTTL"},
	} {
		c := Config{}.WithDefaults()
		tc.mod(&c)
		err := c.validate()
		if err == nil || !strings.HasPrefix(err.Error(), tc.field) {
			t.Errorf("validate() = %v, want an error starting with %s", err, tc.field)
		}
	}
}

// Invalid UTF-8 cannot travel through gRPC or protojson (both refuse it),
// so it is checked here, against the validation itself.
func TestCheckSendMessageInvalidUTF8(t *testing.T) {
	t.Parallel()
	s := &Server{cfg: Config{Hostname: "mta.example.test"}.WithDefaults()}
	bad := "a\xffb"
	base := func() *posthastev1.SendMessageRequest {
		return &posthastev1.SendMessageRequest{
			From: &posthastev1.Address{Address: "ada@example.test"},
			To:   []*posthastev1.Address{{Address: "bob@example.test"}},
			Text: "hello",
		}
	}
	for _, tc := range []struct {
		field string
		mod   func(*posthastev1.SendMessageRequest)
	}{
		{"subject", func(r *posthastev1.SendMessageRequest) { r.Subject = bad }},
		{"text", func(r *posthastev1.SendMessageRequest) { r.Text = bad }},
		{"html", func(r *posthastev1.SendMessageRequest) { r.Html = bad }},
		{"from.name", func(r *posthastev1.SendMessageRequest) { r.From.Name = bad }},
		{"to[0].address", func(r *posthastev1.SendMessageRequest) { r.To[0].Address = "b\xff@example.test" }},
		{"tags[0]", func(r *posthastev1.SendMessageRequest) { r.Tags = []string{bad} }},
		{`metadata["k"]`, func(r *posthastev1.SendMessageRequest) { r.Metadata = map[string]string{"k": bad} }},
		{"headers[0].value", func(r *posthastev1.SendMessageRequest) {
			r.Headers = []*posthastev1.Header{{Name: "X-Thing", Value: bad}}
		}},
		{"attachments[0].filename", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{Filename: bad, Content: "aGk="}}
		}},
	} {
		req := base()
		tc.mod(req)
		_, _, err := s.checkSendMessage(req, "", time.Now())
		var inv *invalidArgumentError
		if !errors.As(err, &inv) || inv.violations[0].field != tc.field {
			t.Errorf("%s: got %v", tc.field, err)
		}
	}
	if _, _, err := s.checkSendMessage(base(), "", time.Now()); err != nil {
		t.Errorf("valid request: %v", err)
	}
}

func TestDBHealth(t *testing.T) {
	t.Parallel()
	var (
		mu    sync.Mutex
		down  bool
		pings int
	)
	h := newDBHealth(func(context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		pings++
		if down {
			return fmt.Errorf("ping database: %w", db.ErrUnavailable)
		}
		return nil
	}, slog.New(slog.DiscardHandler))
	mail := posthastev1.MailService_ServiceDesc.ServiceName
	check := func(service string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		resp, err := h.Check(context.Background(), &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatalf("Check(%q): %v", service, err)
		}
		return resp.GetStatus()
	}
	expire := func() {
		h.mu.Lock()
		h.pingedAt = time.Time{}
		h.mu.Unlock()
	}
	setDown := func(d bool) {
		mu.Lock()
		down = d
		mu.Unlock()
	}

	if got := check(mail); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("database up: %v", got)
	}
	setDown(true)
	// Within healthPingEvery the last answer stands and nothing is pinged.
	h.mu.Lock()
	h.pingedAt = time.Now()
	h.mu.Unlock()
	if got := check(mail); got != healthpb.HealthCheckResponse_SERVING || pings != 1 {
		t.Errorf("cached: %v after %d pings, want SERVING after 1", got, pings)
	}
	expire()
	if got := check(mail); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("database down: %v", got)
	}
	if got := check(""); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("overall status with the database down: %v, want SERVING", got)
	}
	list, err := h.List(context.Background(), &healthpb.HealthListRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := list.GetStatuses()[mail].GetStatus(); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("List: MailService %v", got)
	}
	setDown(false)
	expire()
	if got := check(mail); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("database back: %v", got)
	}

	// Probes arriving together share one ping.
	expire()
	mu.Lock()
	pings = 0
	mu.Unlock()
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() { check(mail) })
	}
	wg.Wait()
	if pings != 1 {
		t.Errorf("20 concurrent checks sent %d pings, want 1", pings)
	}
}

func TestSummaryText(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"Hello, Jörg":   "Hello, Jörg",
		"tab\there":     "tab\there",
		"a\x00b":        "a\uFFFDb",
		"a\r\nb":        "a\uFFFD\uFFFDb",
		"bad \xff byte": "bad \uFFFD byte",
		"del\x7f":       "del\uFFFD",
		"c1\u0085":      "c1\uFFFD",
	} {
		if got := summaryText(in); got != want {
			t.Errorf("summaryText(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestAPIKeyListPrefixKeepsMostOfTheSecret(t *testing.T) {
	t.Parallel()
	key, prefix, _, err := NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if got := APIKeyListPrefix(key); got != prefix || len(got) != apiKeyListPrefixLen {
		t.Errorf("prefix of a generated key = %q, want %q", got, prefix)
	}
	operator := "operator-chosen-24-chars"
	if got := APIKeyListPrefix(operator); got != "operat" {
		t.Errorf("prefix of %q = %q, want a quarter of it", operator, got)
	}
}

// TestMessageToProtoAttempts checks that each attempt keeps whose words its
// reply is, and that the ambiguous outcome passes through.
func TestMessageToProtoAttempts(t *testing.T) {
	t.Parallel()
	m := db.Message{ID: uuid.New(), Attempts: []db.Attempt{
		{ID: uuid.New(), MXHost: "mx.example.test", Code: 250, EnhancedCode: "2.0.0", Text: "queued",
			Outcome: db.StatusDelivered, Source: db.AttemptSourceRemote},
		{ID: uuid.New(), MXHost: "mx.example.test", Code: 451, EnhancedCode: "4.4.2",
			Text:    "connection lost after end of data; the receiver may have the message: EOF",
			Outcome: db.AttemptAmbiguous, Source: db.AttemptSourceLocal},
	}}
	got := messageToProto(m).GetAttempts()
	if len(got) != 2 {
		t.Fatalf("%d attempts, want 2", len(got))
	}
	if a := got[0]; a.GetSource() != "remote" || a.GetOutcome() != "delivered" {
		t.Errorf("attempt 0: source %q, outcome %q", a.GetSource(), a.GetOutcome())
	}
	if a := got[1]; a.GetSource() != "local" || a.GetOutcome() != "ambiguous" || a.GetReply().GetCode() != 451 {
		t.Errorf("attempt 1: source %q, outcome %q, reply %v", a.GetSource(), a.GetOutcome(), a.GetReply())
	}
}
