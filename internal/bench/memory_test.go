package bench

import (
	"testing"
	"time"
)

func TestSummarizeMemory(t *testing.T) {
	t.Parallel()
	const mib = 1 << 20
	// 0..100s: a warm-up spike in the first tenth that must not be the
	// baseline, then 50 MiB, then a climb in the last tenth.
	var samples []RSSSample
	for i := 0; i <= 100; i++ {
		b := int64(50 * mib)
		switch {
		case i < 5:
			b = 80 * mib
		case i >= 95:
			b = int64(50+i-94) * mib
		}
		samples = append(samples, RSSSample{Seconds: float64(i), Bytes: b})
	}
	m := summarizeMemory(samples, time.Second)
	if m == nil {
		t.Fatal("no summary of 101 samples")
	}
	if m.EarlyAtSeconds != 10 || m.EarlyRSSBytes != 50*mib {
		t.Errorf("early %d bytes at %gs, want 50 MiB at 10s", m.EarlyRSSBytes, m.EarlyAtSeconds)
	}
	if m.LateFromSeconds != 90 || m.LatePeakRSSBytes != 56*mib {
		t.Errorf("late peak %d bytes from %gs, want 56 MiB from 90s", m.LatePeakRSSBytes, m.LateFromSeconds)
	}
	if m.GrowthBytes != 6*mib || m.GrowthPercent != 12 {
		t.Errorf("growth %d bytes, %g%%; want 6 MiB, 12%%", m.GrowthBytes, m.GrowthPercent)
	}
	if m.IntervalSeconds != 1 || len(m.Samples) != 101 {
		t.Errorf("interval %g, %d samples", m.IntervalSeconds, len(m.Samples))
	}

	// Samples need not start at 0 nor be evenly spaced: the points are
	// fractions of the sampled span.
	m = summarizeMemory([]RSSSample{{2, 10}, {4, 20}, {12, 15}}, time.Second)
	if m == nil || m.EarlyAtSeconds != 4 || m.EarlyRSSBytes != 20 || m.LatePeakRSSBytes != 15 || m.GrowthBytes != -5 {
		t.Errorf("uneven samples: %+v", m)
	}

	if m := summarizeMemory(samples[:2], time.Second); m != nil {
		t.Errorf("two samples summarized: %+v", m)
	}
}
