// Package openapiconv turns the OpenAPI 2 document that protoc-gen-openapiv2
// writes into an OpenAPI 3 document, for tools that only read version 3.
// The version 2 document stays the source: the conversion runs at
// generation time (make generate) and its output is committed next to it.
package openapiconv

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"

	"github.com/getkin/kin-openapi/openapi2"
	"github.com/getkin/kin-openapi/openapi2conv"
	"github.com/getkin/kin-openapi/openapi3"
)

// ToV3 converts an OpenAPI 2 document to OpenAPI 3 and checks the result
// against the OpenAPI 3 rules, so that a document that would not validate
// is never written. The output is indented JSON ending in a newline, the
// same bytes for the same input.
func ToV3(ctx context.Context, v2 []byte) ([]byte, error) {
	var doc2 openapi2.T
	if err := json.Unmarshal(v2, &doc2); err != nil {
		return nil, fmt.Errorf("parse openapi 2 document: %w", err)
	}
	doc3, err := openapi2conv.ToV3(&doc2)
	if err != nil {
		return nil, fmt.Errorf("convert to openapi 3: %w", err)
	}
	out, err := json.Marshal(doc3)
	if err != nil {
		return nil, fmt.Errorf("encode openapi 3 document: %w", err)
	}
	// Validate what a reader will load, not the converter's in-memory form:
	// a round trip through JSON is what resolves every $ref.
	if err := Validate(ctx, out); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := json.Indent(&b, out, "", "  "); err != nil {
		return nil, fmt.Errorf("indent openapi 3 document: %w", err)
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// Validate loads an OpenAPI 3 document, resolving its references, and
// checks it against the specification's rules (kin-openapi's validator).
func Validate(ctx context.Context, v3 []byte) error {
	loader := openapi3.NewLoader()
	loader.Context = ctx
	doc, err := loader.LoadFromData(v3)
	if err != nil {
		return fmt.Errorf("load openapi 3 document: %w", err)
	}
	if err := doc.Validate(ctx); err != nil {
		return fmt.Errorf("validate openapi 3 document: %w", err)
	}
	return nil
}
