package bench

import (
	"math"
	"slices"
	"time"
)

// Percentile returns the p-th percentile (0 < p <= 100) of sorted by the
// nearest-rank method: the smallest value such that at least p percent of
// the values are at most it. Nearest rank never invents a value that was not
// measured, which matters for small samples and for the maximum. It returns
// 0 for an empty slice.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = max(1, min(rank, len(sorted)))
	return sorted[rank-1]
}

// Latency summarizes a set of durations in milliseconds.
type Latency struct {
	// Count is how many durations were measured.
	Count int `json:"count"`
	// P50Ms, P90Ms, P99Ms and MaxMs are nearest-rank percentiles.
	P50Ms float64 `json:"p50_ms"`
	P90Ms float64 `json:"p90_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
}

// summarize sorts ds in place and returns its percentiles.
func summarize(ds []time.Duration) Latency {
	slices.Sort(ds)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	return Latency{
		Count: len(ds),
		P50Ms: ms(Percentile(ds, 50)),
		P90Ms: ms(Percentile(ds, 90)),
		P99Ms: ms(Percentile(ds, 99)),
		MaxMs: ms(Percentile(ds, 100)),
	}
}

// rate is n per second over d, 0 when d is not positive.
func rate(n int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}
