package gateway_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/openapiconv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// schemaDoc is the part of the OpenAPI 2 document that says which values
// and fields a definition allows.
type schemaDoc struct {
	Definitions map[string]struct {
		Required   []string `json:"required"`
		Properties map[string]struct {
			Enum  []string `json:"enum"`
			Items struct {
				Enum []string `json:"enum"`
			} `json:"items"`
		} `json:"properties"`
	} `json:"definitions"`
}

func strs[T ~string](in []T) []string {
	out := make([]string, len(in))
	for i, v := range in {
		out[i] = string(v)
	}
	return out
}

// The enums the document lists are the values the code knows, so a value
// added in the code without the document (or the other way round) fails
// here; required fields are marked.
func TestOpenAPIEnumsAndRequired(t *testing.T) {
	t.Parallel()
	var doc schemaDoc
	if err := json.Unmarshal(posthastev1.OpenAPI(), &doc); err != nil {
		t.Fatal(err)
	}
	recipientStatuses := []string{db.StatusScheduled, db.StatusQueued, db.StatusSending, db.StatusDeferred,
		db.StatusDelivered, db.StatusBounced, db.StatusFailed, db.StatusCanceled}
	messageStatuses := append(slices.Clone(recipientStatuses), db.MessagePartiallyDelivered)
	enum := func(def, prop string) []string {
		p := doc.Definitions[def].Properties[prop]
		if p.Enum != nil {
			return p.Enum
		}
		return p.Items.Enum
	}
	for _, tc := range []struct {
		def, prop string
		want      []string
	}{
		{"v1Message", "status", messageStatuses},
		{"v1ListMessageEventsResponse", "status", messageStatuses},
		{"v1Recipient", "status", recipientStatuses},
		{"v1RecipientSummary", "status", []string{db.StatusQueued, db.StatusScheduled}},
		{"v1Recipient", "kind", []string{db.KindTo, db.KindCc, db.KindBcc, db.KindEnvelope}},
		{"v1Event", "type", strs(db.EventTypes)},
		{"v1Webhook", "event_types", strs(db.WebhookEventTypes())},
		{"v1CreateWebhookRequest", "event_types", strs(db.WebhookEventTypes())},
		{"v1ApiKey", "scopes", []string{db.ScopeSend, db.ScopeRead, db.ScopeAdmin}},
		{"v1CreateApiKeyRequest", "scopes", []string{db.ScopeSend, db.ScopeRead, db.ScopeAdmin}},
		{"v1Attempt", "source", []string{"remote", "local"}},
	} {
		if got := enum(tc.def, tc.prop); !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(tc.want))) {
			t.Errorf("%s.%s enum %v, want %v", tc.def, tc.prop, got, tc.want)
		}
	}
	for def, want := range map[string][]string{
		"v1SendMessageRequest":    {"from"},
		"v1SendRawMessageRequest": {"raw", "envelope_from", "recipients"},
		"v1Address":               {"address"},
		"v1CreateApiKeyRequest":   {"name"},
		"v1CreateWebhookRequest":  {"url"},
	} {
		if got := doc.Definitions[def].Required; !slices.Equal(got, want) {
			t.Errorf("%s required %v, want %v", def, got, want)
		}
	}
}

// The OpenAPI 3 document is served without a key and validates.
func TestOpenAPIv3Served(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	r := e.do(t, http.MethodGet, "/openapi.v3.json", nil, "Authorization", "")
	if r.code != http.StatusOK || r.header.Get("Content-Type") != "application/json" || !bytes.Equal(r.body, posthastev1.OpenAPIv3()) {
		t.Fatalf("HTTP %d %s", r.code, r.header.Get("Content-Type"))
	}
	if err := openapiconv.Validate(t.Context(), r.body); err != nil {
		t.Error(err)
	}
}
