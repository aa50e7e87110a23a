package bench

import (
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	t.Parallel()
	ms := func(vs ...int) []time.Duration {
		ds := make([]time.Duration, len(vs))
		for i, v := range vs {
			ds[i] = time.Duration(v) * time.Millisecond
		}
		return ds
	}
	hundred := make([]int, 100)
	for i := range hundred {
		hundred[i] = i + 1
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one value is every percentile", ms(7), 99, 7 * time.Millisecond},
		{"median of an odd count", ms(1, 2, 3, 4, 5), 50, 3 * time.Millisecond},
		{"median of an even count is the lower middle", ms(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{"p90 of 1..100", ms(hundred...), 90, 90 * time.Millisecond},
		{"p99 of 1..100", ms(hundred...), 99, 99 * time.Millisecond},
		{"p99 of ten values is the maximum", ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 99, 10 * time.Millisecond},
		{"p100 is the maximum", ms(1, 5, 9), 100, 9 * time.Millisecond},
		{"a tiny p is the minimum", ms(4, 5, 6), 0.1, 4 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := Percentile(tt.sorted, tt.p); got != tt.want {
				t.Errorf("Percentile(%v, %g) = %v, want %v", tt.sorted, tt.p, got, tt.want)
			}
		})
	}
}

func TestSummarizeSorts(t *testing.T) {
	t.Parallel()
	got := summarize([]time.Duration{30 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond})
	want := Latency{Count: 3, P50Ms: 20, P90Ms: 30, P99Ms: 30, MaxMs: 30}
	if got != want {
		t.Errorf("summarize = %+v, want %+v", got, want)
	}
}

func TestTrackerMatchesArrivalsByRecipient(t *testing.T) {
	t.Parallel()
	tr := newTracker("brun", 3, 2)
	at := time.Now()
	tr.accepted(0, at)
	tr.accepted(1, at)
	// Message 2's call failed, but it arrives anyway.
	arrive := func(addrs ...string) { tr.arrived(Arrival{At: at.Add(time.Second), To: addrs}) }
	arrive(tr.recipient(0, 0, 1), tr.recipient(0, 1, 1))
	arrive(tr.recipient(1, 0, 1))
	arrive(tr.recipient(1, 0, 1)) // a duplicate
	arrive(tr.recipient(2, 0, 1), tr.recipient(2, 1, 1))
	arrive("someone@else.test", "brun-9-0@d0.bench.test")

	if out, _ := tr.state(); out != 1 {
		t.Errorf("outstanding = %d, want 1 (message 1's second recipient)", out)
	}
	c := tr.tally()
	if c.accepted != 2 || c.delivered != 1 || c.deliveredUnaccepted != 1 || c.duplicates != 1 || c.foreign != 2 || c.recipientsArrived != 5 {
		t.Errorf("tally = %+v", c)
	}
	if len(c.toSink) != 1 || c.toSink[0] != time.Second {
		t.Errorf("toSink = %v, want [1s]", c.toSink)
	}
}
