package gateway

import (
	"encoding/json"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// openAPIParameter is an operation's parameter.
type openAPIParameter struct {
	Name string `json:"name"`
	In   string `json:"in"`
	Type string `json:"type"`
}

// openAPIDoc is the part of the OpenAPI v2 document the tests look at.
type openAPIDoc struct {
	SecurityDefinitions map[string]struct {
		Type string `json:"type"`
		In   string `json:"in"`
		Name string `json:"name"`
	} `json:"securityDefinitions"`
	Security []map[string][]string `json:"security"`
	Paths    map[string]map[string]struct {
		OperationID string                 `json:"operationId"`
		Security    *[]map[string][]string `json:"security"`
		Parameters  []openAPIParameter     `json:"parameters"`
		Responses   map[string]struct {
			Schema struct {
				Ref string `json:"$ref"`
			} `json:"schema"`
		} `json:"responses"`
	} `json:"paths"`
	Definitions map[string]struct {
		Properties map[string]json.RawMessage `json:"properties"`
	} `json:"definitions"`
}

// The served document must say what the gateway does: 202 from the sends,
// errors in the one shape, API key authentication everywhere, and the
// Idempotency-Key header.
func TestOpenAPIDocument(t *testing.T) {
	t.Parallel()
	var doc openAPIDoc
	if err := json.Unmarshal(posthastev1.OpenAPI(), &doc); err != nil {
		t.Fatal(err)
	}

	bearer, ok := doc.SecurityDefinitions["Bearer"]
	if !ok || bearer.Type != "apiKey" || bearer.In != "header" || bearer.Name != "Authorization" {
		t.Errorf("securityDefinitions: %+v, want Bearer as an apiKey in the Authorization header", doc.SecurityDefinitions)
	}
	if len(doc.Security) != 1 || !reflect.DeepEqual(doc.Security[0], map[string][]string{"Bearer": {}}) {
		t.Errorf("security %v, want Bearer for every operation", doc.Security)
	}

	const errorRef = "#/definitions/v1ErrorResponse"
	want := map[string]struct {
		success string
		errors  []string
	}{
		"MailService_SendMessage":           {"202", []string{"400", "401", "403", "409", "413", "429", "500", "503"}},
		"MailService_SendRawMessage":        {"202", []string{"400", "401", "403", "409", "413", "429", "500", "503"}},
		"MailService_GetMessage":            {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_ListMessages":          {"200", []string{"400", "401", "403", "500", "503"}},
		"MailService_CancelMessage":         {"200", []string{"400", "401", "403", "404", "409", "500", "503"}},
		"MailService_GetMessageRaw":         {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_CreateApiKey":          {"200", []string{"400", "401", "403", "500", "503"}},
		"MailService_ListApiKeys":           {"200", []string{"401", "403", "500", "503"}},
		"MailService_RevokeApiKey":          {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_CreateWebhook":         {"200", []string{"400", "401", "403", "500", "503"}},
		"MailService_ListWebhooks":          {"200", []string{"401", "403", "500", "503"}},
		"MailService_GetWebhook":            {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_UpdateWebhook":         {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_DeleteWebhook":         {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_RotateWebhookSecret":   {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_ListWebhookDeliveries": {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_RetryWebhookDelivery":  {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_ListMessageEvents":     {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_ListEvents":            {"200", []string{"400", "401", "403", "500", "503"}},
		"MailService_SendBatch":             {"200", []string{"400", "401", "403", "413", "429", "500", "503"}},
		"MailService_CreateDomain":          {"200", []string{"400", "401", "403", "409", "500", "503"}},
		"MailService_ListDomains":           {"200", []string{"401", "403", "500", "503"}},
		"MailService_GetDomain":             {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_VerifyDomain":          {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_RotateDomainKey":       {"200", []string{"400", "401", "403", "404", "409", "500", "503"}},
		"MailService_DeleteDomain":          {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_ListSuppressions":      {"200", []string{"400", "401", "403", "500", "503"}},
		"MailService_GetSuppression":        {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_AddSuppressions":       {"200", []string{"400", "401", "403", "500", "503"}},
		"MailService_DeleteSuppression":     {"200", []string{"400", "401", "403", "404", "500", "503"}},
		"MailService_DeleteSuppressions":    {"200", []string{"400", "401", "403", "500", "503"}},
	}
	seen := 0
	for path, ops := range doc.Paths {
		for method, op := range ops {
			name := method + " " + path
			w, ok := want[op.OperationID]
			if !ok {
				t.Errorf("%s: unexpected operation %q", name, op.OperationID)
				continue
			}
			seen++
			if op.Security != nil {
				t.Errorf("%s overrides the document's security with %v", name, *op.Security)
			}
			codes := slices.Sorted(maps.Keys(op.Responses))
			if wantCodes := append([]string{w.success}, w.errors...); !slices.Equal(codes, wantCodes) {
				t.Errorf("%s: responses %v, want %v", name, codes, wantCodes)
			}
			if op.Responses[w.success].Schema.Ref == "" {
				t.Errorf("%s: %s response has no schema", name, w.success)
			}
			for _, code := range w.errors {
				if ref := op.Responses[code].Schema.Ref; ref != errorRef {
					t.Errorf("%s: %s response schema %q, want %s", name, code, ref, errorRef)
				}
			}
			hasKey := slices.Contains(op.Parameters, openAPIParameter{Name: "Idempotency-Key", In: "header", Type: "string"})
			if isSend := w.success == "202" || op.OperationID == "MailService_SendBatch"; hasKey != isSend {
				t.Errorf("%s: Idempotency-Key header parameter present = %t, want %t", name, hasKey, isSend)
			}
		}
	}
	if seen != len(want) {
		t.Errorf("found %d operations, want %d", seen, len(want))
	}

	// The documented error shape is the one errorBody writes.
	for def, typ := range map[string]reflect.Type{
		"v1ErrorResponse":  reflect.TypeFor[errorBody](),
		"v1Error":          reflect.TypeFor[errorDetail](),
		"v1FieldViolation": reflect.TypeFor[fieldViolation](),
	} {
		documented := slices.Sorted(maps.Keys(doc.Definitions[def].Properties))
		if written := jsonFieldNames(typ); !slices.Equal(documented, written) {
			t.Errorf("definition %s has properties %v; the gateway writes %v", def, documented, written)
		}
	}
}

func jsonFieldNames(t reflect.Type) []string {
	var names []string
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name == "-" {
			continue // not written: a header, not part of the body
		}
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}
