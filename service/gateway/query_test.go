package gateway_test

import (
	"net/http"
	"slices"
	"testing"

	"github.com/posthaste/posthaste/service"
)

func TestListQueryErrors(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	for _, tc := range []struct {
		name, query string
		fields      []string
		description string // of the first violation
	}{
		{"page_size not a number", "page_size=abc", []string{"page_size"}, "must be a 32-bit integer"},
		{"page_size too big for int32", "page_size=99999999999", []string{"page_size"}, "must be a 32-bit integer"},
		{"JSON name", "pageSize=abc", []string{"page_size"}, "must be a 32-bit integer"},
		{"created_after not a time", "created_after=yesterday", []string{"created_after"}, "must be an RFC 3339 timestamp, e.g. 2025-01-31T09:00:00Z"},
		{"createdBefore not a time", "createdBefore=2025-13-01", []string{"created_before"}, "must be an RFC 3339 timestamp, e.g. 2025-01-31T09:00:00Z"},
		{"given twice", "page_size=1&page_size=2", []string{"page_size"}, "must be given once"},
		{"given under both names", "page_size=1&pageSize=2", []string{"page_size"}, "must be given once"},
		{"several", "page_size=abc&created_after=yesterday&status=queued", []string{"created_after", "page_size"}, "must be an RFC 3339 timestamp, e.g. 2025-01-31T09:00:00Z"},
		{"not a map", "tag[x]=y", []string{`tag["x"]`}, "is not a map"},
		// Parsed fine; the service refuses the value.
		{"page_size negative", "page_size=-1", []string{"page_size"}, "must not be negative"},
		{"unknown status", "status=queued,lost", []string{"statuses[1]"}, "must be one of scheduled, queued, sending, deferred, delivered, bounced, failed, canceled, partially_delivered"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, http.MethodGet, "/v1/messages?"+tc.query, nil)
			if r.code != http.StatusBadRequest {
				t.Fatalf("HTTP %d %s, want 400", r.code, r.body)
			}
			re := decodeError(t, r)
			if re.Error.Status != "INVALID_ARGUMENT" || !slices.Equal(re.fields(), tc.fields) {
				t.Fatalf("%s, want fields %q", r.body, tc.fields)
			}
			if d := re.Error.FieldViolations[0].Description; d != tc.description {
				t.Errorf("description %q, want %q", d, tc.description)
			}
		})
	}

	// Parameters that name no field are ignored, as grpc-gateway ignores
	// them; good ones still work.
	r := e.do(t, http.MethodGet, "/v1/messages?utm_source=x&page_size=5&created_after=2025-01-31T09:00:00Z", nil)
	if r.code != http.StatusOK {
		t.Errorf("valid query: HTTP %d %s", r.code, r.body)
	}
	// A query that is not well-formed is refused as a whole.
	r = e.do(t, http.MethodGet, "/v1/messages?page_size=%zz", nil)
	if r.code != http.StatusBadRequest || decodeError(t, r).Error.Status != "INVALID_ARGUMENT" {
		t.Errorf("malformed query: HTTP %d %s", r.code, r.body)
	}
}
