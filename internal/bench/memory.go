package bench

import "time"

// RSSSample is the server's resident set size at one moment of the run.
type RSSSample struct {
	// Seconds is the time since the first call.
	Seconds float64 `json:"t"`
	Bytes   int64   `json:"rss_bytes"`
}

// MemoryReport says whether the server's memory stays flat over a run. The
// first tenth of the run is warm-up (pools fill, caches grow), so the
// baseline is the RSS once it has passed; against it stands the highest
// RSS of the last tenth, where a leak would be largest.
type MemoryReport struct {
	// IntervalSeconds is the time between samples (the progress interval).
	IntervalSeconds float64 `json:"interval_seconds"`
	// EarlyRSSBytes is the first sample at or after a tenth of the sampled
	// span, taken at EarlyAtSeconds.
	EarlyAtSeconds float64 `json:"early_at_seconds"`
	EarlyRSSBytes  int64   `json:"early_rss_bytes"`
	// LatePeakRSSBytes is the highest sample from LateFromSeconds (nine
	// tenths of the span) to the end.
	LateFromSeconds  float64 `json:"late_from_seconds"`
	LatePeakRSSBytes int64   `json:"late_peak_rss_bytes"`
	// GrowthBytes is LatePeakRSSBytes - EarlyRSSBytes; GrowthPercent the
	// same relative to EarlyRSSBytes.
	GrowthBytes   int64   `json:"growth_bytes"`
	GrowthPercent float64 `json:"growth_percent"`
	// Samples are every reading, the first at the start of the run and the
	// last after the last delivery.
	Samples []RSSSample `json:"samples"`
}

// minMemorySamples is how many samples a summary needs: fewer cannot tell
// the early point from the late ones.
const minMemorySamples = 3

// summarizeMemory summarizes samples taken in time order every interval. It
// returns nil when there are too few to compare early and late.
func summarizeMemory(samples []RSSSample, interval time.Duration) *MemoryReport {
	if len(samples) < minMemorySamples {
		return nil
	}
	first, span := samples[0].Seconds, samples[len(samples)-1].Seconds-samples[0].Seconds
	m := &MemoryReport{
		IntervalSeconds: interval.Seconds(),
		LateFromSeconds: first + 0.9*span,
		Samples:         samples,
	}
	early := first + 0.1*span
	found := false
	for _, s := range samples {
		if !found && s.Seconds >= early {
			m.EarlyAtSeconds, m.EarlyRSSBytes, found = s.Seconds, s.Bytes, true
		}
		if s.Seconds >= m.LateFromSeconds {
			m.LatePeakRSSBytes = max(m.LatePeakRSSBytes, s.Bytes)
		}
	}
	m.GrowthBytes = m.LatePeakRSSBytes - m.EarlyRSSBytes
	if m.EarlyRSSBytes > 0 {
		m.GrowthPercent = 100 * float64(m.GrowthBytes) / float64(m.EarlyRSSBytes)
	}
	return m
}
