package openapiconv_test

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/getkin/kin-openapi/openapi2"
	"github.com/getkin/kin-openapi/openapi2conv"

	"github.com/posthaste/posthaste/internal/openapiconv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// The committed OpenAPI 3 document is the conversion of the committed
// version 2 one: make generate was run after the last change of either.
func TestCommittedV3IsUpToDate(t *testing.T) {
	t.Parallel()
	got, err := openapiconv.ToV3(t.Context(), posthastev1.OpenAPI())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, posthastev1.OpenAPIv3()) {
		t.Error("proto/posthaste/v1/mail.openapi3.json is stale; run make generate")
	}
}

// Both documents load with a validating library: version 3 against the
// specification's rules, version 2 by kin-openapi's strict model, whose
// conversion must resolve every reference and validate as well.
func TestDocumentsValidate(t *testing.T) {
	t.Parallel()
	if err := openapiconv.Validate(t.Context(), posthastev1.OpenAPIv3()); err != nil {
		t.Errorf("openapi 3: %v", err)
	}

	var v2 openapi2.T
	if err := json.Unmarshal(posthastev1.OpenAPI(), &v2); err != nil {
		t.Fatalf("openapi 2: %v", err)
	}
	if v2.Swagger != "2.0" || len(v2.Paths) == 0 || len(v2.Definitions) == 0 {
		t.Errorf("openapi 2: swagger %q, %d paths, %d definitions", v2.Swagger, len(v2.Paths), len(v2.Definitions))
	}
	v3, err := openapi2conv.ToV3(&v2)
	if err != nil {
		t.Fatalf("openapi 2 conversion: %v", err)
	}
	b, err := json.Marshal(v3)
	if err != nil {
		t.Fatal(err)
	}
	if err := openapiconv.Validate(t.Context(), b); err != nil {
		t.Errorf("openapi 2, converted: %v", err)
	}
}

// A document that breaks the rules is refused rather than written.
func TestToV3RefusesInvalid(t *testing.T) {
	t.Parallel()
	bad := []byte(`{"swagger":"2.0","info":{"title":"x","version":"1"},"paths":{"/a":{"get":{"responses":{"200":{"description":"ok","schema":{"$ref":"#/definitions/Missing"}}}}}}}`)
	if _, err := openapiconv.ToV3(t.Context(), bad); err == nil {
		t.Error("a dangling $ref was converted without an error")
	}
}
