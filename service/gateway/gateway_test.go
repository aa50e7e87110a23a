package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
	"github.com/posthaste/posthaste/service/gateway"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}

// env is the REST gateway in front of a real gRPC server on loopback,
// backed by a fresh database that the server reaches through proxy, so a
// test can take it away; raw reaches the database directly.
type env struct {
	store  *db.DB
	raw    *pgxpool.Pool
	proxy  *testenv.Proxy
	url    string
	conn   *grpc.ClientConn
	client posthastev1.MailServiceClient
	key    string
}

func setup(t *testing.T, cfg service.Config, opts ...gateway.Option) *env {
	t.Helper()
	direct, proxied, proxy := testenv.ProxiedDatabase(t)
	e := &env{proxy: proxy}
	store, err := db.Open(t.Context(), proxied)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	e.store = store
	e.raw, err = pgxpool.New(t.Context(), direct)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.raw.Close)
	cfg.Hostname = "mta.posthaste.test"
	cfg.AllowUnverifiedDomains = true
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg.Logger = logger
	srv, err := service.New(cfg, e.store, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start(t.Context())
	t.Cleanup(srv.Stop)
	gs := service.NewGRPCServer(srv, e.store, logger)
	grpcAddr := testenv.ServeGRPC(t, gs)
	// As the process wires it: the key is checked before the body is read.
	opts = append([]gateway.Option{gateway.WithAuthCheck(srv.CheckAuthorization)}, opts...)
	h, closeGateway, err := gateway.New(t.Context(), grpcAddr, logger, opts...)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(h)
	t.Cleanup(func() {
		hs.Close()
		if err := closeGateway(); err != nil {
			t.Error(err)
		}
	})
	e.url = hs.URL

	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.conn = conn
	e.client = posthastev1.NewMailServiceClient(conn)

	key, prefix, hash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.CreateAPIKey(t.Context(), db.NewAPIKeyParams{
		Name: "test", Prefix: prefix, Hash: hash, Scopes: []string{db.ScopeSend, db.ScopeRead},
	}); err != nil {
		t.Fatal(err)
	}
	e.key = key
	return e
}

type response struct {
	code   int
	header http.Header
	body   []byte
}

// do sends a request with the API key unless headers set Authorization
// (an empty value sends none).
func (e *env) do(t *testing.T, method, path string, body io.Reader, headers ...string) response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, e.url+path, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+e.key)
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i+1] == "" {
			req.Header.Del(headers[i])
		} else {
			req.Header.Set(headers[i], headers[i+1])
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{code: resp.StatusCode, header: resp.Header, body: b}
}

func (e *env) grpcCtx(t *testing.T) context.Context {
	return metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+e.key)
}

// counts returns how many messages and recipients are stored, looking
// directly, so that it works while the server's database is away.
func (e *env) counts(t *testing.T) (messages, recipients int) {
	t.Helper()
	err := e.raw.QueryRow(t.Context(),
		`SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM recipients)`).Scan(&messages, &recipients)
	if err != nil {
		t.Fatal(err)
	}
	return messages, recipients
}

// restError is the REST error shape, decoded strictly.
type restError struct {
	Error struct {
		Code            int    `json:"code"`
		Status          string `json:"status"`
		Message         string `json:"message"`
		Reason          string `json:"reason"`
		FieldViolations []struct {
			Field       string `json:"field"`
			Description string `json:"description"`
		} `json:"field_violations"`
		RequestID string `json:"request_id"`
	} `json:"error"`
}

func decodeError(t *testing.T, r response) restError {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q", ct)
	}
	var e restError
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("error body %s: %v", r.body, err)
	}
	// Every error names its reason and the request it answers.
	if e.Error.Code != r.code || e.Error.Status == "" || e.Error.Message == "" || e.Error.Reason == "" ||
		e.Error.RequestID == "" || e.Error.RequestID != r.header.Get("X-Request-Id") {
		t.Errorf("error body %s for HTTP %d", r.body, r.code)
	}
	return e
}

func (e restError) fields() []string {
	var out []string
	for _, v := range e.Error.FieldViolations {
		out = append(out, v.Field)
	}
	return out
}

func grpcFields(err error) []string {
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

func validRequest() *posthastev1.SendMessageRequest {
	return &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: "ada@example.test"},
		To:      []*posthastev1.Address{{Address: "bob@example.test"}},
		Subject: "Hello",
		Text:    "Hello there.",
	}
}

func toJSON(t *testing.T, req *posthastev1.SendMessageRequest) string {
	t.Helper()
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestValidation(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	addrs := func(n int) []*posthastev1.Address {
		var out []*posthastev1.Address
		for i := range n {
			out = append(out, &posthastev1.Address{Address: "r" + strings.Repeat("x", i) + "@example.test"})
		}
		return out
	}
	for _, tc := range []struct {
		name  string
		mod   func(*posthastev1.SendMessageRequest)
		field string
	}{
		{"no from", func(r *posthastev1.SendMessageRequest) { r.From = nil }, "from.address"},
		{"bad from", func(r *posthastev1.SendMessageRequest) { r.From.Address = "ada" }, "from.address"},
		{"from name with LF", func(r *posthastev1.SendMessageRequest) { r.From.Name = "Ada\nBcc: x@example.test" }, "from.name"},
		{"no recipients", func(r *posthastev1.SendMessageRequest) { r.To = nil }, "to"},
		{"bad to", func(r *posthastev1.SendMessageRequest) {
			r.To = append(addrs(2), &posthastev1.Address{Address: "x@@example.test"})
		}, "to[2].address"},
		{"SMTP parameter injection", func(r *posthastev1.SendMessageRequest) {
			r.To = []*posthastev1.Address{{Address: "a@b.test> NOTIFY=SUCCESS"}}
		}, "to[0].address"},
		{"address literal recipient", func(r *posthastev1.SendMessageRequest) {
			r.To = []*posthastev1.Address{{Address: "root@[127.0.0.1]"}}
		}, "to[0].address"},
		{"bad cc", func(r *posthastev1.SendMessageRequest) { r.Cc = []*posthastev1.Address{{Address: "cc"}} }, "cc[0].address"},
		{"bad bcc", func(r *posthastev1.SendMessageRequest) { r.Bcc = []*posthastev1.Address{{Address: "b@"}} }, "bcc[0].address"},
		{"bad reply_to", func(r *posthastev1.SendMessageRequest) { r.ReplyTo = []*posthastev1.Address{{Address: "@x"}} }, "reply_to[0].address"},
		{"too many recipients", func(r *posthastev1.SendMessageRequest) { r.To = addrs(30); r.Cc = addrs(21) }, "cc"},
		{"CRLF in subject", func(r *posthastev1.SendMessageRequest) { r.Subject = "Hi\r\nBcc: victim@example.test" }, "subject"},
		{"no body", func(r *posthastev1.SendMessageRequest) { r.Text = "" }, "text"},
		{"bad base64", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{Filename: "a.pdf", Content: "not base64!"}}
		}, "attachments[0].content"},
		{"empty attachment", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{Filename: "a.pdf"}}
		}, "attachments[0].content"},
		{"CR in filename", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{Filename: "a\r.pdf", Content: "aGk="}}
		}, "attachments[0].filename"},
		{"LF in content type", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{ContentType: "text/plain\nX-Evil: 1", Content: "aGk="}}
		}, "attachments[0].content_type"},
		{"bad content_id", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{ContentId: "a b", Content: "aGk="}}
		}, "attachments[0].content_id"},
		{"inline part without html", func(r *posthastev1.SendMessageRequest) {
			r.Attachments = []*posthastev1.Attachment{{ContentId: "logo", Content: "aGk="}}
		}, "attachments[0].content_id"},
		{"reserved header", func(r *posthastev1.SendMessageRequest) {
			r.Headers = []*posthastev1.Header{{Name: "X-Ok", Value: "1"}, {Name: "bcc", Value: "x@example.test"}}
		}, "headers[1].name"},
		{"header name with colon", func(r *posthastev1.SendMessageRequest) {
			r.Headers = []*posthastev1.Header{{Name: "X-A:b", Value: "1"}}
		}, "headers[0].name"},
		{"LF in header value", func(r *posthastev1.SendMessageRequest) {
			r.Headers = []*posthastev1.Header{{Name: "X-A", Value: "1\nBcc: x@example.test"}}
		}, "headers[0].value"},
		{"too many tags", func(r *posthastev1.SendMessageRequest) { r.Tags = make([]string, 21) }, "tags"},
		{"long tag", func(r *posthastev1.SendMessageRequest) { r.Tags = []string{strings.Repeat("t", 65)} }, "tags[0]"},
		{"LF in tag", func(r *posthastev1.SendMessageRequest) { r.Tags = []string{"a\nb"} }, "tags[0]"},
		{"too many metadata keys", func(r *posthastev1.SendMessageRequest) {
			r.Metadata = map[string]string{}
			for i := range 21 {
				r.Metadata[strings.Repeat("k", i+1)] = "v"
			}
		}, "metadata"},
		{"long metadata key", func(r *posthastev1.SendMessageRequest) {
			r.Metadata = map[string]string{strings.Repeat("k", 65): "v"}
		}, `metadata["` + strings.Repeat("k", 65) + `"]`},
		{"long metadata value", func(r *posthastev1.SendMessageRequest) {
			r.Metadata = map[string]string{"k": strings.Repeat("v", 513)}
		}, `metadata["k"]`},
		{"send_at too far", func(r *posthastev1.SendMessageRequest) {
			r.SendAt = timestamppb.New(time.Now().Add(31 * 24 * time.Hour))
		}, "send_at"},
		{"idempotency key too long", func(r *posthastev1.SendMessageRequest) { r.IdempotencyKey = strings.Repeat("k", 256) }, "idempotency_key"},
		{"idempotency key not printable", func(r *posthastev1.SendMessageRequest) { r.IdempotencyKey = "k\x01" }, "idempotency_key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := validRequest()
			tc.mod(req)

			_, err := e.client.SendMessage(e.grpcCtx(t), req)
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("gRPC: got %v, want InvalidArgument", err)
			} else if f := grpcFields(err); len(f) == 0 || f[0] != tc.field {
				t.Errorf("gRPC: fields %v, want %s first", f, tc.field)
			} else if !strings.Contains(status.Convert(err).Message(), tc.field) {
				t.Errorf("gRPC: message %q does not name %s", status.Convert(err).Message(), tc.field)
			}

			r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, req)))
			if r.code != http.StatusBadRequest {
				t.Fatalf("REST: HTTP %d %s, want 400", r.code, r.body)
			}
			re := decodeError(t, r)
			if re.Error.Status != "INVALID_ARGUMENT" || len(re.fields()) == 0 || re.fields()[0] != tc.field {
				t.Errorf("REST: %s, want field %s", r.body, tc.field)
			}
		})
	}
	if m, r := e.counts(t); m != 0 || r != 0 {
		t.Errorf("stored %d messages and %d recipients from invalid requests", m, r)
	}
}

// Invalid timestamps cannot be written as JSON, so this case is gRPC only.
func TestInvalidSendAt(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	req := validRequest()
	req.SendAt = &timestamppb.Timestamp{Seconds: 1, Nanos: -5}
	_, err := e.client.SendMessage(e.grpcCtx(t), req)
	if status.Code(err) != codes.InvalidArgument || strings.Join(grpcFields(err), ",") != "send_at" {
		t.Errorf("got %v", err)
	}
}

func TestSendRawValidationOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	for _, tc := range []struct{ body, field string }{
		{`{"raw":"%%","envelope_from":"a@example.test","recipients":["b@example.test"]}`, "raw"},
		{`{"raw":"RnJvbTogYUBleGFtcGxlLnRlc3QNCg0KaGkNCg==","envelope_from":"a","recipients":["b@example.test"]}`, "envelope_from"},
		{`{"raw":"RnJvbTogYUBleGFtcGxlLnRlc3QNCg0KaGkNCg==","envelope_from":"a@example.test","recipients":["b@example.test","b"]}`, "recipients[1]"},
	} {
		r := e.do(t, http.MethodPost, "/v1/messages:sendRaw", strings.NewReader(tc.body))
		if r.code != http.StatusBadRequest {
			t.Errorf("%s: HTTP %d %s", tc.field, r.code, r.body)
			continue
		}
		if f := decodeError(t, r).fields(); len(f) == 0 || f[0] != tc.field {
			t.Errorf("%s: fields %v", tc.field, f)
		}
	}
	r := e.do(t, http.MethodPost, "/v1/messages:sendRaw", strings.NewReader(
		`{"raw":"RnJvbTogYUBleGFtcGxlLnRlc3QNCg0KaGkNCg==","envelope_from":"a@example.test","recipients":["b@example.test"]}`))
	if r.code != http.StatusAccepted {
		t.Errorf("valid raw message: HTTP %d %s", r.code, r.body)
	}
	if m, _ := e.counts(t); m != 1 {
		t.Errorf("stored %d messages, want 1", m)
	}
}

func TestSendSnakeCaseAndGetListCancel(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	sendAt := time.Now().Add(2 * time.Hour).UTC().Format(time.RFC3339)
	body := `{
		"from": {"address": "ada@example.test", "name": "Ada"},
		"reply_to": [{"address": "help@example.test"}],
		"to": [{"address": "bob@example.test"}],
		"bcc": [{"address": "audit@example.test"}],
		"subject": "Scheduled",
		"html": "<p>Hi</p>",
		"attachments": [{"filename": "logo.png", "content_type": "image/png", "content_id": "logo", "content": "iVBORw0KGgo="}],
		"metadata": {"order_id": "17"},
		"send_at": "` + sendAt + `"
	}`
	r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(body))
	if r.code != http.StatusAccepted {
		t.Fatalf("send: HTTP %d %s", r.code, r.body)
	}
	var sent map[string]any
	if err := json.Unmarshal(r.body, &sent); err != nil {
		t.Fatal(err)
	}
	if _, ok := sent["message_id_header"]; !ok {
		t.Errorf("response is not snake_case: %s", r.body)
	}
	id, _ := sent["id"].(string)
	if _, err := uuid.Parse(id); err != nil {
		t.Fatalf("send response has no message id: %s", r.body)
	}

	r = e.do(t, http.MethodGet, "/v1/messages/"+id, nil)
	if r.code != http.StatusOK {
		t.Fatalf("get: HTTP %d %s", r.code, r.body)
	}
	for _, want := range []string{`"envelope_from":"ada@example.test"`, `"size_bytes":`, `"send_at":`, `"created_at":`, `"next_attempt_at":`, `"status":"scheduled"`, `"order_id":"17"`, `"kind":"bcc"`} {
		if !bytes.Contains(r.body, []byte(want)) {
			t.Errorf("get response lacks %s: %s", want, r.body)
		}
	}
	if bytes.Contains(r.body, []byte("messageIdHeader")) || bytes.Contains(r.body, []byte("last_reply")) {
		t.Errorf("get response has camelCase or an empty reply: %s", r.body)
	}

	r = e.do(t, http.MethodGet, "/v1/messages?status=scheduled&page_size=10", nil)
	if r.code != http.StatusOK || !bytes.Contains(r.body, []byte(id)) {
		t.Fatalf("list: HTTP %d %s", r.code, r.body)
	}
	r = e.do(t, http.MethodGet, "/v1/messages?page_token=garbage", nil)
	if r.code != http.StatusBadRequest || strings.Join(decodeError(t, r).fields(), ",") != "page_token" {
		t.Errorf("bad page token: HTTP %d %s", r.code, r.body)
	}

	r = e.do(t, http.MethodPost, "/v1/messages/"+id+":cancel", strings.NewReader(`{}`))
	if r.code != http.StatusOK {
		t.Fatalf("cancel: HTTP %d %s", r.code, r.body)
	}
	var canceled posthastev1.Message
	if err := protojson.Unmarshal(r.body, &canceled); err != nil {
		t.Fatal(err)
	}
	if canceled.GetStatus() != "canceled" || len(canceled.GetRecipients()) != 2 {
		t.Errorf("after cancel: %v", &canceled)
	}
	for _, rc := range canceled.GetRecipients() {
		if rc.GetStatus() != "canceled" {
			t.Errorf("recipient %s is %s after cancel", rc.GetAddress(), rc.GetStatus())
		}
	}

	r = e.do(t, http.MethodGet, "/v1/messages/not-a-uuid", nil)
	if r.code != http.StatusBadRequest || strings.Join(decodeError(t, r).fields(), ",") != "id" {
		t.Errorf("bad id: HTTP %d %s", r.code, r.body)
	}
	r = e.do(t, http.MethodGet, "/v1/messages/"+uuid.NewString(), nil)
	if r.code != http.StatusNotFound || decodeError(t, r).Error.Status != "NOT_FOUND" {
		t.Errorf("unknown id: HTTP %d %s", r.code, r.body)
	}
}

func TestIdempotencyOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	body := toJSON(t, validRequest())
	first := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(body), "Idempotency-Key", "signup-42")
	second := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(body), "Idempotency-Key", "signup-42")
	if first.code != http.StatusAccepted || second.code != http.StatusAccepted {
		t.Fatalf("HTTP %d, %d: %s %s", first.code, second.code, first.body, second.body)
	}
	// The replay is the first answer, marked as a replay.
	if want := bytes.Replace(first.body, []byte(`"replayed":false`), []byte(`"replayed":true`), 1); !bytes.Equal(second.body, want) {
		t.Errorf("replay answered %s, first call %s", second.body, first.body)
	}
	if first.header.Get("Idempotent-Replayed") != "" || second.header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("Idempotent-Replayed: first %q, replay %q; want none, then true",
			first.header.Get("Idempotent-Replayed"), second.header.Get("Idempotent-Replayed"))
	}
	if m, _ := e.counts(t); m != 1 {
		t.Errorf("stored %d messages, want 1", m)
	}
	other := validRequest()
	other.Subject = "Different"
	r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, other)), "Idempotency-Key", "signup-42")
	if r.code != http.StatusConflict || decodeError(t, r).Error.Status != "ALREADY_EXISTS" {
		t.Errorf("different body: HTTP %d %s, want 409", r.code, r.body)
	}
	if m, _ := e.counts(t); m != 1 {
		t.Errorf("stored %d messages, want 1", m)
	}
}

func TestAuthOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	revokedKey, prefix, hash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	k, err := e.store.CreateAPIKey(t.Context(), db.NewAPIKeyParams{
		Name: "revoked", Prefix: prefix, Hash: hash, Scopes: []string{db.ScopeSend, db.ScopeRead},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.RevokeAPIKey(t.Context(), db.DefaultProjectID(), k.ID); err != nil {
		t.Fatal(err)
	}
	wrongKey, _, _, _ := service.NewAPIKey()
	for name, auth := range map[string]string{
		"no key":      "",
		"wrong key":   "Bearer " + wrongKey,
		"revoked key": "Bearer " + revokedKey,
		"not bearer":  "Basic " + e.key,
	} {
		r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())), "Authorization", auth)
		if r.code != http.StatusUnauthorized {
			t.Errorf("%s: HTTP %d %s, want 401", name, r.code, r.body)
			continue
		}
		if decodeError(t, r).Error.Status != "UNAUTHENTICATED" || !strings.HasPrefix(r.header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s: %s, WWW-Authenticate %q", name, r.body, r.header.Get("WWW-Authenticate"))
		}
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
}

func TestHealthzAndOpenAPI(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	r := e.do(t, http.MethodGet, "/healthz", nil, "Authorization", "")
	if r.code != http.StatusOK || string(r.body) != "ok" {
		t.Errorf("healthz: HTTP %d %q", r.code, r.body)
	}
	r = e.do(t, http.MethodGet, "/openapi.json", nil, "Authorization", "")
	if r.code != http.StatusOK || r.header.Get("Content-Type") != "application/json" || !bytes.Equal(r.body, posthastev1.OpenAPI()) {
		t.Errorf("openapi.json: HTTP %d %s, %d bytes", r.code, r.header.Get("Content-Type"), len(r.body))
	}
	if !json.Valid(r.body) {
		t.Error("openapi.json is not JSON")
	}
}

// With the gRPC server gone, /healthz must fail rather than claim health.
func TestHealthzWithoutBackend(t *testing.T) {
	t.Parallel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	h, closeGateway, err := gateway.New(t.Context(), addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closeGateway()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req := httptest.NewRequestWithContext(ctx, http.MethodGet, "/healthz", nil)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("HTTP %d %s, want 503", rec.Code, rec.Body)
	}
	var re restError
	if err := json.Unmarshal(rec.Body.Bytes(), &re); err != nil || re.Error.Status != "UNAVAILABLE" {
		t.Errorf("body %s: %v", rec.Body, err)
	}
}

func TestErrorShapes(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	for _, tc := range []struct {
		name, method, path, body string
		code                     int
		status, field            string
	}{
		{"malformed JSON", http.MethodPost, "/v1/messages", `{"subject": `, 400, "INVALID_ARGUMENT", ""},
		{"trailing data", http.MethodPost, "/v1/messages", `{} {}`, 400, "INVALID_ARGUMENT", ""},
		{"not an object", http.MethodPost, "/v1/messages", `[1]`, 400, "INVALID_ARGUMENT", ""},
		{"unknown field", http.MethodPost, "/v1/messages", `{"subjekt": "x"}`, 400, "INVALID_ARGUMENT", "subjekt"},
		{"wrong type", http.MethodPost, "/v1/messages", `{"subject": 5}`, 400, "INVALID_ARGUMENT", "subject"},
		{"bad timestamp", http.MethodPost, "/v1/messages", `{"subject": "é", "send_at": "garbage"}`, 400, "INVALID_ARGUMENT", "send_at"},
		{"nested unknown field", http.MethodPost, "/v1/messages", `{"to": [{"adress": "a@b.test"}]}`, 400, "INVALID_ARGUMENT", "to[0].adress"},
		{"object for a list", http.MethodPost, "/v1/messages", `{"headers": {"X-A": "b"}}`, 400, "INVALID_ARGUMENT", "headers"},
		{"wrong kind in a list", http.MethodPost, "/v1/messages", "{\n \"to\": [{\"address\": \"a@b.test\"},\n  {\"address\": []}]}", 400, "INVALID_ARGUMENT", "to[1].address"},
		{"wrong kind for bytes", http.MethodPost, "/v1/messages", `{"attachments": [{"filename": "a", "content": {}}]}`, 400, "INVALID_ARGUMENT", "attachments[0].content"},
		{"no route", http.MethodGet, "/v2/nothing", "", 404, "NOT_FOUND", ""},
		{"wrong method", http.MethodDelete, "/v1/messages", "", 405, "UNIMPLEMENTED", ""},
	} {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		r := e.do(t, tc.method, tc.path, body)
		if r.code != tc.code {
			t.Errorf("%s: HTTP %d %s, want %d", tc.name, r.code, r.body, tc.code)
			continue
		}
		re := decodeError(t, r)
		if re.Error.Status != tc.status || strings.Join(re.fields(), ",") != tc.field {
			t.Errorf("%s: %s, want status %s field %q", tc.name, r.body, tc.status, tc.field)
		}
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
}

func TestOversize(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{MaxMessageBytes: 16 << 10}, gateway.WithMaxBodyBytes(32<<10))
	big := validRequest()
	big.Text = strings.Repeat("a", 40<<10)
	bigJSON := toJSON(t, big)

	// Announced by Content-Length: refused before reading.
	r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(bigJSON))
	if r.code != http.StatusRequestEntityTooLarge || decodeError(t, r).Error.Status != "RESOURCE_EXHAUSTED" {
		t.Errorf("large body: HTTP %d %s, want 413", r.code, r.body)
	}
	// Chunked, no length: refused when reading crosses the limit.
	r = e.do(t, http.MethodPost, "/v1/messages", io.MultiReader(strings.NewReader(bigJSON)))
	if r.code != http.StatusRequestEntityTooLarge {
		t.Errorf("large chunked body: HTTP %d %s, want 413", r.code, r.body)
	}
	// Within the body limit but over the message limit once encoded.
	mid := validRequest()
	mid.Text = strings.Repeat("=", 8<<10)
	r = e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, mid)))
	if r.code != http.StatusRequestEntityTooLarge || decodeError(t, r).Error.Reason != service.ReasonMessageTooLarge {
		t.Errorf("large message: HTTP %d %s, want 413 MESSAGE_TOO_LARGE", r.code, r.body)
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
	r = e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())))
	if r.code != http.StatusAccepted {
		t.Errorf("small message: HTTP %d %s", r.code, r.body)
	}
}

// With the database down, every REST call answers 503 in the one error
// shape with a generic message, and /healthz turns 503 too.
func TestDatabaseDownIs503(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())))
	if r.code != http.StatusAccepted {
		t.Fatalf("send with the database up: HTTP %d %s", r.code, r.body)
	}
	var sent struct{ ID string }
	if err := json.Unmarshal(r.body, &sent); err != nil || sent.ID == "" {
		t.Fatalf("send response %s: %v", r.body, err)
	}
	if r := e.do(t, http.MethodGet, "/healthz", nil, "Authorization", ""); r.code != http.StatusOK {
		t.Fatalf("healthz with the database up: HTTP %d %s", r.code, r.body)
	}

	e.proxy.Stop()
	raw := `{"raw":"RnJvbTogYUBleGFtcGxlLnRlc3QNCg0KaGkNCg==","envelope_from":"a@example.test","recipients":["b@example.test"]}`
	for _, tc := range []struct{ method, path, body string }{
		{http.MethodPost, "/v1/messages", toJSON(t, validRequest())},
		{http.MethodPost, "/v1/messages:sendRaw", raw},
		{http.MethodGet, "/v1/messages/" + sent.ID, ""},
		{http.MethodGet, "/v1/messages", ""},
		{http.MethodPost, "/v1/messages/" + sent.ID + ":cancel", "{}"},
	} {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		r := e.do(t, tc.method, tc.path, body)
		if r.code != http.StatusServiceUnavailable {
			t.Errorf("%s %s: HTTP %d %s, want 503", tc.method, tc.path, r.code, r.body)
			continue
		}
		re := decodeError(t, r)
		if re.Error.Status != "UNAVAILABLE" || !strings.Contains(re.Error.Message, "temporarily unavailable") ||
			strings.Contains(re.Error.Message, "127.0.0.1") {
			t.Errorf("%s %s: %s", tc.method, tc.path, r.body)
		}
	}

	// A health answer is reused for up to a second; poll past that.
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := e.do(t, http.MethodGet, "/healthz", nil, "Authorization", "")
		if r.code == http.StatusServiceUnavailable {
			if re := decodeError(t, r); re.Error.Status != "UNAVAILABLE" {
				t.Errorf("healthz: %s", r.body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("healthz with the database down: HTTP %d %s, want 503", r.code, r.body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if m, _ := e.counts(t); m != 1 {
		t.Errorf("stored %d messages, want only the first", m)
	}
}

// Identical requests racing with one Idempotency-Key store one message and
// all get its receipt.
func TestConcurrentIdempotencyOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	body := toJSON(t, validRequest())
	const callers = 8
	var (
		wg    sync.WaitGroup
		resps [callers]response
	)
	for i := range callers {
		wg.Go(func() {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, e.url+"/v1/messages", strings.NewReader(body))
			if err != nil {
				t.Error(err)
				return
			}
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Authorization", "Bearer "+e.key)
			req.Header.Set("Idempotency-Key", "race-over-rest")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Error(err)
				return
			}
			resps[i] = response{code: resp.StatusCode, header: resp.Header, body: b}
		})
	}
	wg.Wait()
	// One caller stored the message, the others replay its receipt.
	firsts := 0
	norm := func(b []byte) []byte {
		return bytes.Replace(b, []byte(`"replayed":true`), []byte(`"replayed":false`), 1)
	}
	for i, r := range resps {
		if r.code != http.StatusAccepted {
			t.Errorf("caller %d: HTTP %d %s", i, r.code, r.body)
			continue
		}
		if !bytes.Equal(norm(r.body), norm(resps[0].body)) {
			t.Errorf("caller %d got %s, caller 0 got %s", i, r.body, resps[0].body)
		}
		if r.header.Get("Idempotent-Replayed") == "" {
			firsts++
		}
	}
	if firsts != 1 {
		t.Errorf("%d callers were answered as the first, want 1", firsts)
	}
	if m, r := e.counts(t); m != 1 || r != 1 {
		t.Errorf("stored %d messages, %d recipients; want 1, 1", m, r)
	}
}
