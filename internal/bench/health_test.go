package bench

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/metrics"
)

// TestClaimLatency reads the claim histogram the way an external run does,
// by scraping /metrics, and checks the window between two readings.
func TestClaimLatency(t *testing.T) {
	t.Parallel()
	m := metrics.New()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	read := scrapeClaims(srv.URL, 5*time.Second)
	ctx := context.Background()

	// Before the window: slow claims that must not count.
	for range 50 {
		m.Claim(3 * time.Second)
	}
	from, err := read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// In it: 90 claims of 4ms, 8 of 18ms, 2 of 40ms.
	for range 90 {
		m.Claim(4 * time.Millisecond)
	}
	for range 8 {
		m.Claim(18 * time.Millisecond)
	}
	for range 2 {
		m.Claim(40 * time.Millisecond)
	}
	to, err := read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := claimLatency(from, to)
	if err != nil {
		t.Fatal(err)
	}
	if c.Count != 100 {
		t.Errorf("count %d, want 100", c.Count)
	}
	want := func(name string, got *float64, ms float64) {
		if got == nil || *got != ms {
			t.Errorf("%s ≤ %v, want ≤ %gms", name, got, ms)
		}
	}
	want("p50", c.P50LeMs, 5)
	want("p95", c.P95LeMs, 20)
	want("p99", c.P99LeMs, 50)
	if c.MeanMs < 5.83 || c.MeanMs > 5.85 {
		t.Errorf("mean %gms, want 5.84", c.MeanMs)
	}
	if c.HighestBoundMs != 5000 {
		t.Errorf("highest bound %gms", c.HighestBoundMs)
	}

	// Above the highest bound there is no bound to give.
	m.Claim(time.Minute)
	last, err := read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := claimLatency(to, last); err != nil || c.P50LeMs != nil || c.Count != 1 {
		t.Errorf("one slow claim: %+v, %v; want no bound", c, err)
	}
	if _, err := claimLatency(last, from); err == nil {
		t.Error("a histogram that went back was accepted")
	}

	notFound := httptest.NewServer(http.NotFoundHandler())
	defer notFound.Close()
	if _, err := scrapeClaims(notFound.URL, time.Second)(ctx); err == nil {
		t.Error("a 404 scrape: no error")
	}
	if _, err := gatherClaims(nil); err == nil {
		t.Error("no metric families: no error")
	}
}
