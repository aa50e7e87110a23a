package bench

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// QueueReport is the health of the outbox under churn: how much its hot
// tables grew after the mark, and how long claims took.
type QueueReport struct {
	// MarkMessages is the number of delivered messages at which the first
	// sizes were read (Config.HealthMark), MarkAtSeconds when, from the
	// first call. Zero when the mark was not reached.
	MarkMessages  int     `json:"mark_messages"`
	MarkAtSeconds float64 `json:"mark_at_seconds,omitempty"`
	// MarkBytes and EndBytes are pg_total_relation_size (table, indexes
	// and TOAST) of each hot table at the mark and after the last
	// delivery; the totals sum them.
	MarkBytes      map[string]int64 `json:"mark_bytes,omitempty"`
	MarkTotalBytes int64            `json:"mark_total_bytes,omitempty"`
	EndBytes       map[string]int64 `json:"end_bytes,omitempty"`
	EndTotalBytes  int64            `json:"end_total_bytes,omitempty"`
	// GrowthRatio is EndTotalBytes / MarkTotalBytes.
	GrowthRatio *float64 `json:"growth_ratio,omitempty"`
	// Claim is the claim round trip's latency after the mark (from the
	// start when the mark was not reached).
	Claim *ClaimLatency `json:"claim,omitempty"`
}

// ClaimLatency is read from the server's posthaste_delivery_claim_seconds
// histogram: the difference of two readings, so only claims in between
// count. Quantiles are the upper bound of the bucket they fall in ("p95 ≤
// 20 ms"); nil means above the highest bound, HighestBoundMs.
type ClaimLatency struct {
	// Source is "in-process" or the scraped URL.
	Source string `json:"source"`
	// FromSeconds and ToSeconds delimit the window, from the first call.
	FromSeconds    float64  `json:"from_seconds"`
	ToSeconds      float64  `json:"to_seconds"`
	Count          uint64   `json:"count"`
	MeanMs         float64  `json:"mean_ms"`
	P50LeMs        *float64 `json:"p50_le_ms"`
	P95LeMs        *float64 `json:"p95_le_ms"`
	P99LeMs        *float64 `json:"p99_le_ms"`
	HighestBoundMs float64  `json:"highest_bound_ms"`
}

// hotTables are the tables every message writes to and the claim reads.
var hotTables = []string{"messages", "recipients", "attempts", "events"}

// DefaultHealthMark is Config.HealthMark's default for runs of at least
// 20 times as many messages.
const DefaultHealthMark = 10000

// tableSizes reads the hot tables' sizes, including indexes and TOAST.
// Tables the schema does not have are left out.
func (p *pgStats) tableSizes(ctx context.Context) (map[string]int64, int64, error) {
	rows, err := p.conn.Query(ctx, benchTag+`
		SELECT t, pg_total_relation_size(to_regclass(t))
		FROM unnest($1::text[]) AS t
		WHERE to_regclass(t) IS NOT NULL`, hotTables)
	if err != nil {
		return nil, 0, fmt.Errorf("read table sizes: %w", err)
	}
	defer rows.Close()
	sizes := make(map[string]int64, len(hotTables))
	var total int64
	for rows.Next() {
		var name string
		var size int64
		if err := rows.Scan(&name, &size); err != nil {
			return nil, 0, fmt.Errorf("read table sizes: %w", err)
		}
		sizes[name] = size
		total += size
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("read table sizes: %w", err)
	}
	return sizes, total, nil
}

// autovacuum returns the server's autovacuum setting.
func (p *pgStats) autovacuum(ctx context.Context) (string, error) {
	var v string
	if err := p.conn.QueryRow(ctx, benchTag+"SELECT current_setting('autovacuum')").Scan(&v); err != nil {
		return "", fmt.Errorf("read autovacuum setting: %w", err)
	}
	return v, nil
}

// claimMetric is the server's histogram of claim round trips.
const claimMetric = "posthaste_delivery_claim_seconds"

// histogram is one reading of a cumulative Prometheus histogram.
type histogram struct {
	bounds []float64 // upper bounds in seconds, ascending, without +Inf
	cum    []uint64  // cumulative counts per bound
	count  uint64
	sum    float64
}

// claimReader reads the claim histogram.
type claimReader func(ctx context.Context) (histogram, error)

// gatherClaims reads the claim histogram from metric families.
func gatherClaims(families []*dto.MetricFamily) (histogram, error) {
	for _, f := range families {
		if f.GetName() != claimMetric || len(f.GetMetric()) == 0 {
			continue
		}
		h := f.GetMetric()[0].GetHistogram()
		if h == nil {
			return histogram{}, fmt.Errorf("%s is not a histogram", claimMetric)
		}
		var out histogram
		for _, b := range h.GetBucket() {
			if math.IsInf(b.GetUpperBound(), +1) {
				continue
			}
			out.bounds = append(out.bounds, b.GetUpperBound())
			out.cum = append(out.cum, b.GetCumulativeCount())
		}
		out.count, out.sum = h.GetSampleCount(), h.GetSampleSum()
		return out, nil
	}
	return histogram{}, fmt.Errorf("the server exports no %s (a version from before it was added?)", claimMetric)
}

// scrapeClaims returns a claimReader that fetches url, a server's /metrics.
func scrapeClaims(url string, timeout time.Duration) claimReader {
	client := &http.Client{Timeout: timeout}
	return func(ctx context.Context) (histogram, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return histogram{}, fmt.Errorf("scrape %s: %w", url, err)
		}
		// Ask for the text format: the parser below reads only that.
		req.Header.Set("Accept", "text/plain;version=0.0.4")
		resp, err := client.Do(req)
		if err != nil {
			return histogram{}, fmt.Errorf("scrape %s: %w", url, err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
			return histogram{}, fmt.Errorf("scrape %s: %s", url, resp.Status)
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		families, err := parser.TextToMetricFamilies(resp.Body)
		if err != nil {
			return histogram{}, fmt.Errorf("scrape %s: %w", url, err)
		}
		if f, ok := families[claimMetric]; ok {
			return gatherClaims([]*dto.MetricFamily{f})
		}
		return gatherClaims(nil)
	}
}

// claimLatency summarizes the claims between two readings of the same
// histogram.
func claimLatency(from, to histogram) (*ClaimLatency, error) {
	if !slices.Equal(from.bounds, to.bounds) {
		return nil, fmt.Errorf("the claim histogram's buckets changed during the run (server restarted?)")
	}
	if to.count < from.count {
		return nil, fmt.Errorf("the claim histogram went back (server restarted?)")
	}
	c := &ClaimLatency{Count: to.count - from.count}
	if len(to.bounds) > 0 {
		c.HighestBoundMs = 1e3 * to.bounds[len(to.bounds)-1]
	}
	if c.Count == 0 {
		return c, nil
	}
	c.MeanMs = 1e3 * (to.sum - from.sum) / float64(c.Count)
	quantile := func(q float64) *float64 {
		// The rank of the q-quantile among the window's claims, rounded up.
		rank := uint64(math.Ceil(q * float64(c.Count)))
		for i, b := range to.bounds {
			if to.cum[i]-from.cum[i] >= rank {
				ms := 1e3 * b
				return &ms
			}
		}
		return nil
	}
	c.P50LeMs, c.P95LeMs, c.P99LeMs = quantile(0.50), quantile(0.95), quantile(0.99)
	return c, nil
}
