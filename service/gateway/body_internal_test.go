package gateway

import (
	"strings"
	"testing"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/protobuf/encoding/protojson"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// TestDecodeFastPathRefusesWhatJSONRefuses feeds the decoder bodies that
// protojson alone would take but JSON does not, and bodies both take: the
// fast path must give the strict path's answer for each.
func TestDecodeFastPathRefusesWhatJSONRefuses(t *testing.T) {
	m := &jsonMarshaler{JSONPb: runtime.JSONPb{UnmarshalOptions: protojson.UnmarshalOptions{}}}
	for _, tt := range []struct {
		body   string
		ok     bool
		wantPS int32
	}{
		{`{"page_size": 7}`, true, 7},
		{`  {"page_size": 2e1}  `, true, 20},
		{`{"page_size": 1e}`, false, 0},
		{`{"page_size": 25E}`, false, 0},
		{`{"page_size": 7} {}`, false, 0},
		{`{"page_size": 7`, false, 0},
	} {
		var req posthastev1.ListMessagesRequest
		err := m.decode(strings.NewReader(tt.body), &req)
		if (err == nil) != tt.ok {
			t.Errorf("decode(%s) = %v, want ok %v", tt.body, err, tt.ok)
			continue
		}
		if tt.ok && req.GetPageSize() != tt.wantPS {
			t.Errorf("decode(%s): page_size %d, want %d", tt.body, req.GetPageSize(), tt.wantPS)
		}
	}
}
