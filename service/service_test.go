package service_test

import (
	"context"
	"encoding/base64"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}

// env is a MailService on a real gRPC server on loopback, backed by a fresh
// database, with a client and an API key. The service reaches the database
// through proxy, so a test can take the database away; raw reaches it
// directly, to arrange and inspect rows.
type env struct {
	srv     *service.Server
	store   *db.DB
	raw     *pgxpool.Pool
	proxy   *testenv.Proxy
	direct  string
	logger  *slog.Logger
	client  posthastev1.MailServiceClient
	conn    *grpc.ClientConn
	key     string
	keyID   uuid.UUID
	commits atomic.Int64
}

// setup is setupEnv for tests that send from domains nobody verified.
func setup(t *testing.T, cfg service.Config) *env {
	t.Helper()
	cfg.AllowUnverifiedDomains = true
	return setupEnv(t, cfg)
}

func setupEnv(t *testing.T, cfg service.Config) *env {
	t.Helper()
	direct, proxied, proxy := testenv.ProxiedDatabase(t)
	e := &env{store: open(t, proxied), proxy: proxy, direct: direct}
	var err error
	e.raw, err = pgxpool.New(t.Context(), direct)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.raw.Close)
	if cfg.Hostname == "" {
		cfg.Hostname = "mta.posthaste.test"
	}
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	e.logger = cfg.Logger
	srv, err := service.New(cfg, e.store, func() { e.commits.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	srv.Start(t.Context())
	t.Cleanup(srv.Stop)
	e.conn = serve(t, service.NewGRPCServer(srv, e.store, cfg.Logger))
	e.client = posthastev1.NewMailServiceClient(e.conn)
	e.key, e.keyID = createKey(t, e.store, "test")
	return e
}

func open(t *testing.T, url string) *db.DB {
	t.Helper()
	d, err := db.Open(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

// serve runs gs on loopback until the test ends and returns a client
// connection to it.
func serve(t *testing.T, gs *grpc.Server) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(testenv.ServeGRPC(t, gs), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// createKey makes a send and read key in the default project.
func createKey(t *testing.T, store *db.DB, name string) (string, uuid.UUID) {
	t.Helper()
	return createScopedKey(t, store, uuid.Nil, name, db.ScopeSend, db.ScopeRead)
}

// createScopedKey makes a key of project (uuid.Nil: the default one) with
// the given scopes.
func createScopedKey(t *testing.T, store *db.DB, project uuid.UUID, name string, scopes ...string) (string, uuid.UUID) {
	t.Helper()
	key, prefix, hash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	k, err := store.CreateAPIKey(t.Context(), db.NewAPIKeyParams{
		ProjectID: project, Name: name, Prefix: prefix, Hash: hash, Scopes: scopes,
	})
	if err != nil {
		t.Fatal(err)
	}
	return key, k.ID
}

func (e *env) ctx(t *testing.T) context.Context {
	return withKey(t.Context(), e.key)
}

func withKey(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
}

// counts returns how many messages and recipients are stored, looking
// directly, so that it works while the service's database is away.
func (e *env) counts(t *testing.T) (messages, recipients int) {
	t.Helper()
	err := e.raw.QueryRow(t.Context(),
		`SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM recipients)`).Scan(&messages, &recipients)
	if err != nil {
		t.Fatal(err)
	}
	return messages, recipients
}

func validRequest() *posthastev1.SendMessageRequest {
	return &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: "ada@example.test", Name: "Ada Lovelace"},
		To:      []*posthastev1.Address{{Address: "bob@example.test"}, {Address: "carol@example.test", Name: "Carol"}},
		Subject: "Hello",
		Text:    "Hello there.",
	}
}

func violations(err error) []string {
	var out []string
	for _, d := range status.Convert(err).Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				out = append(out, v.GetField())
			}
		}
	}
	return out
}

func TestSendMessageStoresMessage(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	req := validRequest()
	req.Cc = []*posthastev1.Address{{Address: "dave@EXAMPLE.test"}}
	// Duplicates collapse to one envelope recipient; the domain compares
	// case-insensitively and the first kind wins.
	req.Bcc = []*posthastev1.Address{{Address: "eve@example.test"}, {Address: "bob@Example.TEST"}, {Address: "dave@example.test"}}
	req.Tags = []string{"welcome"}
	req.Metadata = map[string]string{"user": "42"}
	req.Attachments = []*posthastev1.Attachment{{Filename: "a.txt", ContentType: "text/plain", Content: "aGVsbG8="}}
	req.Headers = []*posthastev1.Header{{Name: "X-Campaign", Value: "spring"}}

	resp, err := e.client.SendMessage(e.ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	if e.commits.Load() != 1 {
		t.Errorf("onCommit called %d times, want 1", e.commits.Load())
	}
	if !strings.HasPrefix(resp.GetMessageIdHeader(), "<") || !strings.HasSuffix(resp.GetMessageIdHeader(), "@example.test>") {
		t.Errorf("message_id_header %q: want <...@example.test>", resp.GetMessageIdHeader())
	}
	var got []string
	for _, r := range resp.GetRecipients() {
		got = append(got, r.GetAddress()+"/"+r.GetStatus())
	}
	want := "bob@example.test/queued carol@example.test/queued dave@example.test/queued eve@example.test/queued"
	if strings.Join(got, " ") != want {
		t.Errorf("recipients %v, want %s", got, want)
	}

	id := uuid.MustParse(resp.GetId())
	m, err := e.store.GetMessage(t.Context(), db.DefaultProjectID(), id)
	if err != nil {
		t.Fatal(err)
	}
	if m.APIKeyID != e.keyID || m.EnvelopeFrom != "ada@example.test" || m.Subject != "Hello" || m.MessageIDHeader != resp.GetMessageIdHeader() {
		t.Errorf("stored message %+v", m)
	}
	var kinds []string
	for _, r := range m.Recipients {
		kinds = append(kinds, r.Address+"/"+r.Kind)
	}
	if strings.Join(kinds, " ") != "bob@example.test/to carol@example.test/to dave@example.test/cc eve@example.test/bcc" {
		t.Errorf("stored recipients %v", kinds)
	}
	content, err := e.store.LoadMessageContents(t.Context(), []uuid.UUID{id})
	if err != nil {
		t.Fatal(err)
	}
	raw := string(content[id].Raw)
	for _, s := range []string{"Subject: Hello\r\n", "X-Campaign: spring\r\n", "Message-Id: " + resp.GetMessageIdHeader(), "a.txt"} {
		if !strings.Contains(strings.ToLower(raw), strings.ToLower(s)) {
			t.Errorf("raw message lacks %q:\n%s", s, raw)
		}
	}
	if strings.Contains(raw, "eve@") {
		t.Error("a bcc recipient appears in the message")
	}
}

func TestSendMessageValidationStoresNothing(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	req := validRequest()
	req.Subject = "Hi\r\nBcc: victim@example.test"
	req.To[1].Address = "not an address"
	req.Tags = []string{strings.Repeat("t", 65)}
	_, err := e.client.SendMessage(e.ctx(t), req)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("got %v, want InvalidArgument", err)
	}
	if got := strings.Join(violations(err), ","); got != "to[1].address,subject,tags[0]" {
		t.Errorf("violations %s: want every problem reported", got)
	}
	if !strings.Contains(status.Convert(err).Message(), "to[1].address") {
		t.Errorf("message %q does not name the first field", status.Convert(err).Message())
	}
	if m, r := e.counts(t); m != 0 || r != 0 {
		t.Errorf("stored %d messages, %d recipients after a refused request", m, r)
	}
	if e.commits.Load() != 0 {
		t.Error("onCommit called for a refused request")
	}
}

func TestSendMessageTooLarge(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{MaxMessageBytes: 8 << 10})
	for name, req := range map[string]*posthastev1.SendMessageRequest{
		// Refused on the estimate, before building.
		"estimate": func() *posthastev1.SendMessageRequest {
			r := validRequest()
			r.Text = strings.Repeat("a", 9<<10)
			return r
		}(),
		// Under the limit until encoded: quoted-printable triples "=".
		"encoded": func() *posthastev1.SendMessageRequest {
			r := validRequest()
			r.Text = strings.Repeat("=", 4<<10)
			return r
		}(),
	} {
		_, err := e.client.SendMessage(e.ctx(t), req)
		st := status.Convert(err)
		var reason string
		for _, d := range st.Details() {
			if info, ok := d.(*errdetails.ErrorInfo); ok {
				reason = info.GetReason()
			}
		}
		if st.Code() != codes.ResourceExhausted || reason != service.ReasonMessageTooLarge {
			t.Errorf("%s: got %v reason %q, want ResourceExhausted MESSAGE_TOO_LARGE", name, err, reason)
		}
	}
	raw := "From: a@example.test\r\nSubject: big\r\n\r\n" + strings.Repeat(strings.Repeat("x", 70)+"\r\n", 200)
	_, err := e.client.SendRawMessage(e.ctx(t), &posthastev1.SendRawMessageRequest{
		Raw: b64(raw), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"},
	})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("raw: got %v, want ResourceExhausted", err)
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
}

func TestAuth(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	revoked, revokedID := createKey(t, e.store, "old")
	if _, err := e.store.RevokeAPIKey(t.Context(), db.DefaultProjectID(), revokedID); err != nil {
		t.Fatal(err)
	}
	unknown, _, _, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	for name, ctx := range map[string]context.Context{
		"no key":      t.Context(),
		"wrong key":   withKey(t.Context(), unknown),
		"revoked key": withKey(t.Context(), revoked),
		"malformed":   withKey(t.Context(), "hunter2"),
		"basic auth":  metadata.AppendToOutgoingContext(t.Context(), "authorization", "Basic "+e.key),
	} {
		_, err := e.client.SendMessage(ctx, validRequest())
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: SendMessage got %v, want Unauthenticated", name, err)
		}
		_, err = e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{})
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: ListMessages got %v, want Unauthenticated", name, err)
		}
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages without a valid key", m)
	}
	if _, err := e.client.ListMessages(e.ctx(t), &posthastev1.ListMessagesRequest{}); err != nil {
		t.Errorf("valid key: %v", err)
	}
}

func TestHealthAndReflectionNeedNoKey(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	resp, err := healthpb.NewHealthClient(e.conn).Check(t.Context(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", resp, err)
	}
	resp, err = healthpb.NewHealthClient(e.conn).Check(t.Context(), &healthpb.HealthCheckRequest{Service: "posthaste.v1.MailService"})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health of MailService: %v %v", resp, err)
	}

	stream, err := reflectionpb.NewServerReflectionClient(e.conn).ServerReflectionInfo(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}); err != nil {
		t.Fatal(err)
	}
	r, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range r.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !strings.Contains(strings.Join(names, " "), "posthaste.v1.MailService") {
		t.Errorf("reflection lists %v", names)
	}
}

func TestIdempotency(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})

	req := validRequest()
	req.IdempotencyKey = "order-1234"
	first, err := e.client.SendMessage(e.ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	// The same request with the key as metadata instead of in the body is
	// the same request.
	again := validRequest()
	second, err := e.client.SendMessage(metadata.AppendToOutgoingContext(e.ctx(t), "idempotency-key", "order-1234"), again)
	if err != nil {
		t.Fatal(err)
	}
	// The first receipt, marked as a replay.
	if first.GetReplayed() || !second.GetReplayed() {
		t.Errorf("replayed: first %v, replay %v; want false, true", first.GetReplayed(), second.GetReplayed())
	}
	second.Replayed = false
	if !proto.Equal(first, second) {
		t.Errorf("replay answered %v, first call %v", second, first)
	}
	if m, r := e.counts(t); m != 1 || r != 2 {
		t.Errorf("stored %d messages, %d recipients; want 1, 2", m, r)
	}
	if e.commits.Load() != 1 {
		t.Errorf("onCommit called %d times, want 1", e.commits.Load())
	}

	changed := validRequest()
	changed.Subject = "Something else"
	changed.IdempotencyKey = "order-1234"
	_, err = e.client.SendMessage(e.ctx(t), changed)
	if status.Code(err) != codes.AlreadyExists || !strings.Contains(status.Convert(err).Message(), "different request") {
		t.Errorf("reuse with another request: %v, want AlreadyExists", err)
	}

	// Keys belong to the project: another API key of the same project
	// replays (a client that rotated its key keeps its retries safe), while
	// another project's identical key is theirs.
	sameProject, _ := createKey(t, e.store, "rotated")
	replayed, err := e.client.SendMessage(withKey(t.Context(), sameProject), req)
	if err != nil {
		t.Fatal(err)
	}
	if replayed.GetId() != first.GetId() {
		t.Error("another key of the same project did not replay the first answer")
	}
	other, err := e.store.CreateProject(t.Context(), "other")
	if err != nil {
		t.Fatal(err)
	}
	otherKey, _ := createScopedKey(t, e.store, other.ID, "other", db.ScopeSend)
	third, err := e.client.SendMessage(withKey(t.Context(), otherKey), req)
	if err != nil {
		t.Fatal(err)
	}
	if third.GetId() == first.GetId() {
		t.Error("another project's key replayed the first caller's message")
	}

	conflict := validRequest()
	conflict.IdempotencyKey = "a"
	_, err = e.client.SendMessage(metadata.AppendToOutgoingContext(e.ctx(t), "idempotency-key", "b"), conflict)
	if status.Code(err) != codes.InvalidArgument || strings.Join(violations(err), ",") != "idempotency_key" {
		t.Errorf("differing keys: %v", err)
	}
	if m, _ := e.counts(t); m != 2 {
		t.Errorf("stored %d messages, want 2", m)
	}
}

func TestSendRawMessage(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	raw := "From: Ada <ada@example.test>\r\nTo: bob@example.test\r\nSubject: Raw hello\r\n\r\nBody.\r\n"
	resp, err := e.client.SendRawMessage(e.ctx(t), &posthastev1.SendRawMessageRequest{
		Raw:          b64(raw),
		EnvelopeFrom: "bounces@example.test",
		Recipients:   []string{"bob@example.test", "BOB@example.test", "carol@Example.Test"},
		Tags:         []string{"raw"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetRecipients()) != 3 {
		// Local parts are case-sensitive (RFC 5321 section 2.4): BOB is
		// another mailbox than bob.
		t.Errorf("recipients %v", resp.GetRecipients())
	}
	m, err := e.client.GetMessage(e.ctx(t), &posthastev1.GetMessageRequest{Id: resp.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if m.GetSubject() != "Raw hello" || m.GetEnvelopeFrom() != "bounces@example.test" || m.GetMessageIdHeader() == "" {
		t.Errorf("message %v", m)
	}
	if len(m.GetRecipients()) != 3 {
		t.Errorf("stored recipients %v, want 3", m.GetRecipients())
	}
	// The message had no Date or Message-ID: both are added in front, the
	// rest is kept as given.
	id := uuid.MustParse(resp.GetId())
	content, err := e.store.LoadMessageContents(t.Context(), []uuid.UUID{id})
	if err != nil {
		t.Fatal(err)
	}
	stored := string(content[id].Raw)
	if !strings.HasPrefix(stored, "Date: ") || !strings.Contains(stored, "Message-ID: "+m.GetMessageIdHeader()+"\r\n") ||
		!strings.HasSuffix(stored, raw) {
		t.Errorf("stored message:\n%s", stored)
	}
	for _, r := range m.GetRecipients() {
		if r.GetKind() != "envelope" {
			t.Errorf("recipient kind %q", r.GetKind())
		}
	}

	for _, tc := range []struct {
		name  string
		req   *posthastev1.SendRawMessageRequest
		field string
	}{
		{"bad base64", &posthastev1.SendRawMessageRequest{Raw: "%%%", EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"empty raw", &posthastev1.SendRawMessageRequest{EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"bare LF", &posthastev1.SendRawMessageRequest{Raw: b64("From: a@example.test\nSubject: x\n\nhi\n"), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"bare CR", &posthastev1.SendRawMessageRequest{Raw: b64("From: a@example.test\r\nSubject: x\r\n\r\nhi\rthere\r\n"), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"line over 998 octets", &posthastev1.SendRawMessageRequest{Raw: b64("From: a@example.test\r\n\r\n" + strings.Repeat("x", 999) + "\r\n"), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"unparsable", &posthastev1.SendRawMessageRequest{Raw: b64("this is not a header\r\n\r\nhi\r\n"), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"SMTP parameter injection", &posthastev1.SendRawMessageRequest{Raw: b64(raw), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test> NOTIFY=SUCCESS"}}, "recipients[0]"},
		{"no From", &posthastev1.SendRawMessageRequest{Raw: b64("Subject: x\r\n\r\nhi\r\n"), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test"}}, "raw"},
		{"envelope_from", &posthastev1.SendRawMessageRequest{Raw: b64(raw), EnvelopeFrom: "nope", Recipients: []string{"b@example.test"}}, "envelope_from"},
		{"no recipients", &posthastev1.SendRawMessageRequest{Raw: b64(raw), EnvelopeFrom: "a@example.test"}, "recipients"},
		{"bad recipient", &posthastev1.SendRawMessageRequest{Raw: b64(raw), EnvelopeFrom: "a@example.test", Recipients: []string{"b@example.test", "c@"}}, "recipients[1]"},
		{"address literal recipient", &posthastev1.SendRawMessageRequest{Raw: b64(raw), EnvelopeFrom: "a@example.test", Recipients: []string{"c@[10.0.0.1]"}}, "recipients[0]"},
	} {
		_, err := e.client.SendRawMessage(e.ctx(t), tc.req)
		if status.Code(err) != codes.InvalidArgument || len(violations(err)) == 0 || violations(err)[0] != tc.field {
			t.Errorf("%s: got %v (fields %v), want InvalidArgument on %s", tc.name, err, violations(err), tc.field)
		}
	}
	if n, _ := e.counts(t); n != 1 {
		t.Errorf("stored %d messages, want 1", n)
	}
}

func TestGetListCancel(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	ctx := e.ctx(t)

	scheduled := validRequest()
	scheduled.SendAt = timestamppb.New(time.Now().Add(time.Hour))
	scheduled.Tags = []string{"later"}
	sent, err := e.client.SendMessage(ctx, scheduled)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range sent.GetRecipients() {
		if r.GetStatus() != "scheduled" {
			t.Errorf("recipient status %q, want scheduled", r.GetStatus())
		}
	}
	var ids []string
	for range 3 {
		r, err := e.client.SendMessage(ctx, validRequest())
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.GetId())
	}

	m, err := e.client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: sent.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if m.GetStatus() != "scheduled" || m.GetSendAt() == nil || m.GetFrom() != "Ada Lovelace <ada@example.test>" || len(m.GetRecipients()) != 2 {
		t.Errorf("GetMessage: %v", m)
	}
	for _, r := range m.GetRecipients() {
		if r.GetKind() != "to" || r.GetLastReply() != nil || r.GetNextAttemptAt() == nil {
			t.Errorf("recipient %v: want kind to, no reply, a next attempt", r)
		}
	}

	// Newest first, two per page, then the rest.
	page, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{PageSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.GetMessages()) != 2 || page.GetNextPageToken() == "" ||
		page.GetMessages()[0].GetId() != ids[2] || page.GetMessages()[1].GetId() != ids[1] {
		t.Fatalf("first page: %v", page)
	}
	page, err = e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{PageSize: 2, PageToken: page.GetNextPageToken()})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.GetMessages()) != 2 || page.GetNextPageToken() != "" ||
		page.GetMessages()[0].GetId() != ids[0] || page.GetMessages()[1].GetId() != sent.GetId() {
		t.Fatalf("second page: %v", page)
	}
	page, err = e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{Status: "scheduled", Tag: "later"})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.GetMessages()) != 1 || page.GetMessages()[0].GetId() != sent.GetId() {
		t.Errorf("filtered list: %v", page)
	}
	page, err = e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{Recipient: "carol@EXAMPLE.test"})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.GetMessages()) != 4 {
		t.Errorf("recipient filter found %d messages, want 4", len(page.GetMessages()))
	}

	canceled, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: sent.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if canceled.GetStatus() != "canceled" || len(canceled.GetRecipients()) != 2 {
		t.Errorf("canceled message status %q, recipients %v", canceled.GetStatus(), canceled.GetRecipients())
	}
	for _, r := range canceled.GetRecipients() {
		if r.GetStatus() != "canceled" || r.GetNextAttemptAt() != nil {
			t.Errorf("recipient after cancel: %v", r)
		}
	}

	for _, tc := range []struct {
		name  string
		call  func() error
		code  codes.Code
		field string
	}{
		{"get bad id", func() error {
			_, err := e.client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: "nope"})
			return err
		}, codes.InvalidArgument, "id"},
		{"cancel bad id", func() error {
			_, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: "42"})
			return err
		}, codes.InvalidArgument, "id"},
		{"get unknown", func() error {
			_, err := e.client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: uuid.NewString()})
			return err
		}, codes.NotFound, ""},
		{"cancel unknown", func() error {
			_, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: uuid.NewString()})
			return err
		}, codes.NotFound, ""},
		{"page size", func() error {
			_, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{PageSize: -1})
			return err
		}, codes.InvalidArgument, "page_size"},
		{"status", func() error {
			_, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{Status: "lost"})
			return err
		}, codes.InvalidArgument, "status"},
		{"page token", func() error {
			_, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{PageToken: "bm90IGEgdG9rZW4"})
			return err
		}, codes.InvalidArgument, "page_token"},
	} {
		err := tc.call()
		if status.Code(err) != tc.code {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.code)
			continue
		}
		if tc.field != "" && strings.Join(violations(err), ",") != tc.field {
			t.Errorf("%s: fields %v, want %s", tc.name, violations(err), tc.field)
		}
	}
}

func b64(s string) string {
	return base64.StdEncoding.EncodeToString([]byte(s))
}

// Identical requests racing with one idempotency key store one message, and
// every caller gets that message's receipt.
func TestIdempotencyConcurrent(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	const callers = 10
	var (
		wg    sync.WaitGroup
		resps [callers]*posthastev1.SendMessageResponse
	)
	for i := range callers {
		wg.Go(func() {
			req := validRequest()
			ctx := e.ctx(t)
			// Half send the key in the body, half as the Idempotency-Key
			// header would arrive: the same request either way.
			if i%2 == 0 {
				req.IdempotencyKey = "race-1"
			} else {
				ctx = metadata.AppendToOutgoingContext(ctx, "idempotency-key", "race-1")
			}
			resp, err := e.client.SendMessage(ctx, req)
			if err != nil {
				t.Errorf("caller %d: %v", i, err)
				return
			}
			resps[i] = resp
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// One caller stored the message; the others replay its receipt.
	firsts := 0
	for _, r := range resps {
		if !r.GetReplayed() {
			firsts++
		}
	}
	if firsts != 1 {
		t.Errorf("%d callers were answered as the first, want 1", firsts)
	}
	for i, r := range resps[1:] {
		a, b := proto.Clone(r).(*posthastev1.SendMessageResponse), proto.Clone(resps[0]).(*posthastev1.SendMessageResponse)
		a.Replayed, b.Replayed = false, false
		if !proto.Equal(a, b) {
			t.Errorf("caller %d got %v, caller 0 got %v", i+1, r, resps[0])
		}
	}
	if m, r := e.counts(t); m != 1 || r != 2 {
		t.Errorf("stored %d messages, %d recipients; want 1, 2", m, r)
	}
	var stored string
	if err := e.raw.QueryRow(t.Context(), `SELECT id::text FROM messages`).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored != resps[0].GetId() {
		t.Errorf("stored message %s, receipts name %s", stored, resps[0].GetId())
	}
	if n := e.commits.Load(); n != 1 {
		t.Errorf("onCommit called %d times, want 1", n)
	}
}

// Paging walks every message exactly once, newest first, even when many
// share one created_at and a page boundary falls among them.
func TestListMessagesPagingSameCreatedAt(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	const total = 11
	ids := make(map[string]bool, total)
	for i := range total {
		req := validRequest()
		if i%2 == 0 {
			req.Tags = []string{"even"}
		}
		resp, err := e.client.SendMessage(e.ctx(t), req)
		if err != nil {
			t.Fatal(err)
		}
		ids[resp.GetId()] = true
	}
	// Two instants: the first four messages share one, the rest the other.
	early := time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC)
	late := early.Add(time.Second)
	if _, err := e.raw.Exec(t.Context(), `UPDATE messages SET created_at = $1`, late); err != nil {
		t.Fatal(err)
	}
	if _, err := e.raw.Exec(t.Context(), `UPDATE messages SET created_at = $1
		WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT 4)`, early); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name     string
		req      *posthastev1.ListMessagesRequest
		want     int
		maxPages int
	}{
		{"page size 3", &posthastev1.ListMessagesRequest{PageSize: 3}, total, 4},
		{"page size 2", &posthastev1.ListMessagesRequest{PageSize: 2}, total, 6},
		{"page size equal to the total", &posthastev1.ListMessagesRequest{PageSize: total}, total, 1},
		{"filtered by tag", &posthastev1.ListMessagesRequest{PageSize: 2, Tag: "even"}, 6, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []*posthastev1.Message
			seen := map[string]bool{}
			pages := 0
			req := proto.Clone(tc.req).(*posthastev1.ListMessagesRequest)
			for {
				page, err := e.client.ListMessages(e.ctx(t), req)
				if err != nil {
					t.Fatal(err)
				}
				pages++
				if len(page.GetMessages()) == 0 || len(page.GetMessages()) > int(req.GetPageSize()) {
					t.Fatalf("page %d has %d messages", pages, len(page.GetMessages()))
				}
				for _, m := range page.GetMessages() {
					if seen[m.GetId()] {
						t.Errorf("message %s listed twice", m.GetId())
					}
					if !ids[m.GetId()] {
						t.Errorf("unknown message %s listed", m.GetId())
					}
					seen[m.GetId()] = true
					got = append(got, m)
				}
				if page.GetNextPageToken() == "" {
					break
				}
				if pages >= tc.maxPages {
					t.Fatalf("more than %d pages", tc.maxPages)
				}
				req.PageToken = page.GetNextPageToken()
			}
			if len(got) != tc.want || pages != tc.maxPages {
				t.Errorf("listed %d messages on %d pages, want %d on %d", len(got), pages, tc.want, tc.maxPages)
			}
			for i := 1; i < len(got); i++ {
				a, b := got[i-1], got[i]
				ta, tb := a.GetCreatedAt().AsTime(), b.GetCreatedAt().AsTime()
				// Canonical UUID text sorts as the UUID's bytes do.
				if ta.Before(tb) || ta.Equal(tb) && a.GetId() <= b.GetId() {
					t.Errorf("position %d: %s (%v) listed before %s (%v)", i, a.GetId(), ta, b.GetId(), tb)
				}
			}
		})
	}
}

// Internationalized domains are stored and listed by their A-labels, and a
// caller may search with either form.
func TestInternationalizedDomain(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	req := validRequest()
	req.To = []*posthastev1.Address{{Address: "user@bücher.test"}}
	resp, err := e.client.SendMessage(e.ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	const want = "user@xn--bcher-kva.test"
	if len(resp.GetRecipients()) != 1 || resp.GetRecipients()[0].GetAddress() != want {
		t.Fatalf("recipients %v, want %s", resp.GetRecipients(), want)
	}
	var domain string
	if err := e.raw.QueryRow(t.Context(), `SELECT domain FROM recipients`).Scan(&domain); err != nil {
		t.Fatal(err)
	}
	if domain != "xn--bcher-kva.test" {
		t.Errorf("stored domain %q", domain)
	}
	for _, q := range []string{"user@bücher.test", want} {
		page, err := e.client.ListMessages(e.ctx(t), &posthastev1.ListMessagesRequest{Recipient: q})
		if err != nil {
			t.Fatal(err)
		}
		if len(page.GetMessages()) != 1 || page.GetMessages()[0].GetId() != resp.GetId() {
			t.Errorf("recipient filter %q found %v", q, page.GetMessages())
		}
	}
}

// A NUL is valid UTF-8 and JSON, but jsonb cannot store it: refused as the
// caller's mistake, not failed as the server's.
func TestMetadataNULRefused(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	req := validRequest()
	req.Metadata = map[string]string{"k": "a\x00b"}
	_, err := e.client.SendMessage(e.ctx(t), req)
	if status.Code(err) != codes.InvalidArgument || strings.Join(violations(err), ",") != `metadata["k"]` {
		t.Errorf("got %v (fields %v), want InvalidArgument on metadata[\"k\"]", err, violations(err))
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
}

// RFC 2047 encoded words pass the 7-bit header check yet can decode to NUL,
// invalid UTF-8 or line breaks. The message is accepted as written; its
// summary is stored and shown with those characters replaced.
func TestSendRawMessageEncodedControlCharacters(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	for _, tc := range []struct {
		name, from, subject, wantFrom, wantSubject string
	}{
		{"NUL", "=?UTF-8?B?AA==?= <ada@example.test>", "=?UTF-8?B?YQBi?=",
			"\uFFFD <ada@example.test>", "a\uFFFDb"},
		{"invalid UTF-8", "ada@example.test", "=?UTF-8?B?/w==?=", "ada@example.test", "\uFFFD"},
		{"CR LF", "ada@example.test", "=?UTF-8?Q?a=0D=0AX-Injected:_1?=", "ada@example.test", "a\uFFFD\uFFFDX-Injected: 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := "From: " + tc.from + "\r\nSubject: " + tc.subject + "\r\nDate: Mon, 2 Jan 2006 15:04:05 +0000\r\nMessage-ID: <" + uuid.NewString() + "@example.test>\r\n\r\nBody.\r\n"
			resp, err := e.client.SendRawMessage(e.ctx(t), &posthastev1.SendRawMessageRequest{
				Raw: b64(raw), EnvelopeFrom: "ada@example.test", Recipients: []string{"bob@example.test"},
			})
			if err != nil {
				t.Fatal(err)
			}
			m, err := e.client.GetMessage(e.ctx(t), &posthastev1.GetMessageRequest{Id: resp.GetId()})
			if err != nil {
				t.Fatal(err)
			}
			if m.GetFrom() != tc.wantFrom || m.GetSubject() != tc.wantSubject {
				t.Errorf("from %q, subject %q; want %q, %q", m.GetFrom(), m.GetSubject(), tc.wantFrom, tc.wantSubject)
			}
			content, err := e.store.LoadMessageContents(t.Context(), []uuid.UUID{uuid.MustParse(resp.GetId())})
			if err != nil {
				t.Fatal(err)
			}
			if got := string(content[uuid.MustParse(resp.GetId())].Raw); got != raw {
				t.Errorf("stored message changed:\n%q\nwant\n%q", got, raw)
			}
		})
	}
}

func TestDrainReportsNotServingButKeepsServing(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	e.srv.Drain()
	health := healthpb.NewHealthClient(e.conn)
	for _, name := range []string{"", "posthaste.v1.MailService"} {
		resp, err := health.Check(t.Context(), &healthpb.HealthCheckRequest{Service: name})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Errorf("health of %q after Drain: %v %v", name, resp, err)
		}
	}
	// Draining only steers new traffic away; calls still work.
	if _, err := e.client.ListMessages(e.ctx(t), &posthastev1.ListMessagesRequest{}); err != nil {
		t.Errorf("call after Drain: %v", err)
	}
}
