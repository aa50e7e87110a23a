package bench_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/bench"
)

// TestRunBatchCountsRefusedItems drives a stand-in REST server that
// refuses the second message of every batch: each refusal counts under its
// reason, the accepted messages as sent, and the last call is the shorter
// remainder.
func TestRunBatchCountsRefusedItems(t *testing.T) {
	t.Parallel()
	var sizes []int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			http.NotFound(w, r)
			return
		}
		if r.URL.Path != "/v1/messages:batchSend" {
			t.Errorf("call to %s, want the batch call", r.URL.Path)
			http.NotFound(w, r)
			return
		}
		var req struct {
			Messages []json.RawMessage `json:"messages"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			t.Errorf("decode batch: %v", err)
		}
		sizes = append(sizes, len(req.Messages))
		results := make([]map[string]any, len(req.Messages))
		for i := range results {
			results[i] = map[string]any{"accepted": map[string]any{"id": "x"}}
			if i == 1 {
				results[i] = map[string]any{"error": map[string]any{"code": 400, "status": "INVALID_ARGUMENT", "reason": "FIELD_INVALID", "message": "no"}}
			}
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"results": results})
	}))
	defer srv.Close()

	rep, err := bench.Run(context.Background(), bench.Config{
		RESTURL:     srv.URL,
		APIKey:      "k",
		SinkAddr:    "127.0.0.1:0",
		Messages:    12,
		Batch:       5,
		Concurrency: 1,
		Timeout:     time.Millisecond,
		StatsSettle: -1,
	})
	if err == nil || rep == nil {
		t.Fatalf("Run = %v, %v: want a report and an error", rep, err)
	}
	if want := []int{5, 5, 2}; len(sizes) != 3 || sizes[0] != 5 || sizes[2] != 2 {
		t.Errorf("batches of %v, want %v", sizes, want)
	}
	if rep.Accepted != 9 || rep.Failed != 3 || rep.Errors["item_FIELD_INVALID"] != 3 || len(rep.Errors) != 1 {
		t.Errorf("accepted %d, failed %d, errors %v; want 9, 3, item_FIELD_INVALID: 3", rep.Accepted, rep.Failed, rep.Errors)
	}
	if rep.APILatency.Count != 3 {
		t.Errorf("%d call latencies, want 3: a call with a refused item was still answered", rep.APILatency.Count)
	}
	var text strings.Builder
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "api latency (per call of 5)") || !strings.Contains(text.String(), "--batch 5") {
		t.Errorf("report does not say latency is per call:\n%s", text.String())
	}
}
