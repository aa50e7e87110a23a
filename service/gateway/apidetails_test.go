package gateway_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// sendREST sends req and returns its receipt.
func (e *env) sendREST(t *testing.T, req *posthastev1.SendMessageRequest) (response, string) {
	t.Helper()
	r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, req)))
	if r.code != http.StatusAccepted {
		t.Fatalf("send: HTTP %d %s", r.code, r.body)
	}
	var receipt struct{ ID string }
	if err := json.Unmarshal(r.body, &receipt); err != nil || receipt.ID == "" {
		t.Fatalf("receipt %s: %v", r.body, err)
	}
	return r, receipt.ID
}

// listIDs lists messages with query and returns their ids in order.
func (e *env) listIDs(t *testing.T, query string) []string {
	t.Helper()
	r := e.do(t, http.MethodGet, "/v1/messages?"+query, nil)
	if r.code != http.StatusOK {
		t.Fatalf("list %s: HTTP %d %s", query, r.code, r.body)
	}
	var page struct{ Messages []struct{ ID string } }
	if err := json.Unmarshal(r.body, &page); err != nil {
		t.Fatal(err)
	}
	ids := []string{}
	for _, m := range page.Messages {
		ids = append(ids, m.ID)
	}
	return ids
}

// Empty lists are [] and zero values are there; fields with presence that
// are unset (a recipient's delivered_at) are left out rather than null.
func TestEmptyListsAndZeroValues(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	r := e.do(t, http.MethodGet, "/v1/messages?status=bounced", nil)
	var page map[string]any
	if err := json.Unmarshal(r.body, &page); err != nil {
		t.Fatal(err)
	}
	if msgs, ok := page["messages"].([]any); r.code != http.StatusOK || !ok || len(msgs) != 0 || page["next_page_token"] != "" {
		t.Errorf("empty listing: HTTP %d %s, want messages [] and next_page_token \"\"", r.code, r.body)
	}

	_, id := e.sendREST(t, validRequest())
	r = e.do(t, http.MethodGet, "/v1/messages/"+id, nil)
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatal(err)
	}
	if a, ok := m["attempts"].([]any); !ok || len(a) != 0 {
		t.Errorf("attempts = %#v, want []", m["attempts"])
	}
	if tags, ok := m["tags"].([]any); !ok || len(tags) != 0 {
		t.Errorf("tags = %#v, want []", m["tags"])
	}
	if md, ok := m["metadata"].(map[string]any); !ok || len(md) != 0 {
		t.Errorf("metadata = %#v, want {}", m["metadata"])
	}
	// int64 is a string in the protobuf JSON mapping.
	if _, ok := m["size_bytes"].(string); !ok {
		t.Errorf("size_bytes = %#v, want a string", m["size_bytes"])
	}
	if _, ok := m["send_at"]; ok {
		t.Errorf("unset send_at is present: %s", r.body)
	}
	if bytes.Contains(r.body, []byte("null")) {
		t.Errorf("answer holds null: %s", r.body)
	}
	rcpt := m["recipients"].([]any)[0].(map[string]any)
	if _, ok := rcpt["delivered_at"]; ok {
		t.Errorf("unset delivered_at is present: %v", rcpt)
	}
	if rcpt["attempt_count"] != 0.0 {
		t.Errorf("attempt_count = %#v, want 0", rcpt["attempt_count"])
	}
}

// Every REST error carries a reason a program can branch on.
func TestErrorReasonsOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{MaxMessageBytes: 4096})
	_, id := e.sendREST(t, validRequest())
	readOnly := "Bearer " + restKey(t, e, db.DefaultProjectName, db.ScopeRead)
	if r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())), "Idempotency-Key", "k1"); r.code != http.StatusAccepted {
		t.Fatalf("send: HTTP %d %s", r.code, r.body)
	}
	other := validRequest()
	other.Subject = "another"
	big := validRequest()
	big.Text = strings.Repeat("x", 5000)
	canceled, _ := e.sendREST(t, validRequest())
	var c struct{ ID string }
	if err := json.Unmarshal(canceled.body, &c); err != nil {
		t.Fatal(err)
	}
	if r := e.do(t, http.MethodPost, "/v1/messages/"+c.ID+":cancel", strings.NewReader("{}")); r.code != http.StatusOK {
		t.Fatalf("first cancel: HTTP %d %s", r.code, r.body)
	}

	for _, tc := range []struct {
		name, method, path, body string
		headers                  []string
		code                     int
		reason                   string
	}{
		{"no key", http.MethodGet, "/v1/messages", "", []string{"Authorization", ""}, 401, "UNAUTHENTICATED"},
		{"missing scope", http.MethodPost, "/v1/messages", toJSON(t, validRequest()), []string{"Authorization", readOnly}, 403, "MISSING_SCOPE"},
		{"invalid field", http.MethodPost, "/v1/messages", `{"to":[{"address":"x"}]}`, nil, 400, "FIELD_INVALID"},
		{"malformed body", http.MethodPost, "/v1/messages", `{"to":`, nil, 400, "MALFORMED_REQUEST"},
		{"not JSON", http.MethodPost, "/v1/messages", `a=b`, []string{"Content-Type", "application/x-www-form-urlencoded"}, 415, "UNSUPPORTED_MEDIA_TYPE"},
		{"unknown message", http.MethodGet, "/v1/messages/" + uuid.NewString(), "", nil, 404, "NOT_FOUND"},
		{"unknown route", http.MethodGet, "/v1/nothing", "", nil, 404, "ROUTE_NOT_FOUND"},
		{"idempotency conflict", http.MethodPost, "/v1/messages", toJSON(t, other), []string{"Idempotency-Key", "k1"}, 409, "IDEMPOTENCY_CONFLICT"},
		{"nothing to cancel", http.MethodPost, "/v1/messages/" + c.ID + ":cancel", "{}", nil, 409, "NOTHING_TO_CANCEL"},
		{"too large", http.MethodPost, "/v1/messages", toJSON(t, big), nil, 413, "MESSAGE_TOO_LARGE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body *strings.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			} else {
				body = strings.NewReader("")
			}
			r := e.do(t, tc.method, tc.path, body, tc.headers...)
			if r.code != tc.code {
				t.Fatalf("HTTP %d %s, want %d", r.code, r.body, tc.code)
			}
			if got := decodeError(t, r).Error.Reason; got != tc.reason {
				t.Errorf("reason %q, want %q: %s", got, tc.reason, r.body)
			}
		})
	}

	// Last: it takes the database away.
	e.proxy.Stop()
	r := e.do(t, http.MethodGet, "/v1/messages/"+id, nil)
	if r.code != http.StatusServiceUnavailable || decodeError(t, r).Error.Reason != "DATABASE_UNAVAILABLE" {
		t.Errorf("database down: HTTP %d %s, want 503 DATABASE_UNAVAILABLE", r.code, r.body)
	}
}

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// Every answer carries a request id: the client's when it is sane, else a
// new one. 202 answers say where the message is.
func TestRequestIDAndLocation(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())), "X-Request-Id", "checkout-7f3a")
	if got := r.header.Get("X-Request-Id"); got != "checkout-7f3a" {
		t.Errorf("X-Request-Id %q, want the client's", got)
	}
	var receipt struct{ ID string }
	if err := json.Unmarshal(r.body, &receipt); err != nil {
		t.Fatal(err)
	}
	if loc := r.header.Get("Location"); loc != "/v1/messages/"+receipt.ID {
		t.Errorf("Location %q, want /v1/messages/%s", loc, receipt.ID)
	}
	if get := e.do(t, http.MethodGet, r.header.Get("Location"), nil); get.code != http.StatusOK {
		t.Errorf("GET Location: HTTP %d %s", get.code, get.body)
	}

	for _, tc := range []struct{ name, sent string }{
		{"none", ""},
		{"with a space", "a b"},
		{"too long", strings.Repeat("a", 129)},
		{"quote", `a"b`},
	} {
		r := e.do(t, http.MethodGet, "/v1/messages", nil, "X-Request-Id", tc.sent)
		if got := r.header.Get("X-Request-Id"); !uuidRE.MatchString(got) {
			t.Errorf("%s: X-Request-Id %q, want a generated UUID", tc.name, got)
		}
	}
	// Refused before the gRPC server is reached, and public paths too.
	for _, path := range []string{"/v1/messages", "/healthz", "/openapi.v3.json"} {
		r := e.do(t, http.MethodGet, path, nil, "Authorization", "", "X-Request-Id", "probe-1")
		if got := r.header.Get("X-Request-Id"); got != "probe-1" {
			t.Errorf("%s: X-Request-Id %q, want probe-1", path, got)
		}
	}
}

func TestListFiltersOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	send := func(to string, tags ...string) string {
		req := validRequest()
		req.To = []*posthastev1.Address{{Address: to}}
		req.Cc = nil
		req.Tags = tags
		_, id := e.sendREST(t, req)
		return id
	}
	a := send("bounce@example.test", "receipt")
	b := send("someone@example.test", "welcome", "a,b")
	c := send("other@example.test")
	if r := e.do(t, http.MethodPost, "/v1/messages/"+c+":cancel", strings.NewReader("{}")); r.code != http.StatusOK {
		t.Fatalf("cancel: HTTP %d %s", r.code, r.body)
	}

	for _, tc := range []struct {
		query string
		want  []string
	}{
		{"recipient=BOUNCE@Example.TEST", []string{a}},
		{"recipient=bounce@example.test", []string{a}},
		{"status=canceled", []string{c}},
		{"status=canceled&status=queued", []string{c, b, a}},
		{"status=canceled,queued", []string{c, b, a}},
		{"statuses=canceled&status=queued", []string{c, b, a}},
		{"tag=receipt", []string{a}},
		{"tag=receipt&tag=welcome", []string{b, a}},
		{"tags=receipt,welcome", []string{b, a}},
		{"tag=receipt,welcome&status=queued", []string{b, a}},
		{"tag=none", []string{}},
	} {
		if got := e.listIDs(t, tc.query); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.query, got, tc.want)
		}
	}
}

// The raw message is the bytes stored, as base64 JSON or as message/rfc822;
// another project's is 404 (TestProjectIsolationOverREST).
func TestGetMessageRawOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	_, id := e.sendREST(t, validRequest())
	var stored []byte
	if err := e.raw.QueryRow(t.Context(), `SELECT raw FROM messages WHERE id = $1`, id).Scan(&stored); err != nil {
		t.Fatal(err)
	}

	r := e.do(t, http.MethodGet, "/v1/messages/"+id+"/raw", nil)
	if r.code != http.StatusOK {
		t.Fatalf("HTTP %d %s", r.code, r.body)
	}
	var got struct {
		ID           string   `json:"id"`
		EnvelopeFrom string   `json:"envelope_from"`
		Recipients   []string `json:"recipients"`
		Raw          string   `json:"raw"`
	}
	if err := json.Unmarshal(r.body, &got); err != nil {
		t.Fatal(err)
	}
	raw, err := base64.StdEncoding.DecodeString(got.Raw)
	if err != nil || !bytes.Equal(raw, stored) {
		t.Errorf("raw %q (%v), want the stored bytes %q", got.Raw, err, stored)
	}
	if got.ID != id || got.EnvelopeFrom != "ada@example.test" || len(got.Recipients) == 0 {
		t.Errorf("envelope %+v", got)
	}

	for _, accept := range []string{"message/rfc822", "message/rfc822, application/json;q=0.5", "*/*;q=0.1, message/rfc822"} {
		r = e.do(t, http.MethodGet, "/v1/messages/"+id+"/raw", nil, "Accept", accept)
		if r.code != http.StatusOK || r.header.Get("Content-Type") != "message/rfc822" || !bytes.Equal(r.body, stored) {
			t.Errorf("Accept %q: HTTP %d %s %q", accept, r.code, r.header.Get("Content-Type"), r.body)
		}
	}
	// Errors stay JSON whatever was accepted.
	r = e.do(t, http.MethodGet, "/v1/messages/"+uuid.NewString()+"/raw", nil, "Accept", "message/rfc822")
	if r.code != http.StatusNotFound || decodeError(t, r).Error.Reason != "NOT_FOUND" {
		t.Errorf("unknown id: HTTP %d %s", r.code, r.body)
	}
	// Other answers stay JSON too.
	r = e.do(t, http.MethodGet, "/v1/messages/"+id, nil, "Accept", "message/rfc822")
	if r.code != http.StatusOK || !strings.HasPrefix(r.header.Get("Content-Type"), "application/json") {
		t.Errorf("GetMessage with Accept message/rfc822: HTTP %d %s", r.code, r.header.Get("Content-Type"))
	}
}
