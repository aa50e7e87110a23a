package posthastev1_test

import (
	"bytes"
	"encoding/json"
	"testing"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// What one caller does to its copy of the document, another never sees.
func TestOpenAPIReturnsACopy(t *testing.T) {
	first := posthastev1.OpenAPI()
	if !json.Valid(first) {
		t.Fatal("the OpenAPI document is not JSON")
	}
	want := bytes.Clone(first)
	clear(first)
	if got := posthastev1.OpenAPI(); !bytes.Equal(got, want) {
		t.Error("changing the returned document changed the next one")
	}
}
