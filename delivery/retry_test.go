package delivery

import (
	"testing"
	"time"
)

func TestBackoffGrowsAndCaps(t *testing.T) {
	t.Parallel()
	p := newRetryPolicy(RetryConfig{}.WithDefaults())
	p.rand = func() float64 { return 0.5 } // no jitter
	tests := []struct {
		attempts int
		want     time.Duration
	}{
		{0, time.Minute},
		{1, time.Minute},
		{2, 2 * time.Minute},
		{3, 4 * time.Minute},
		{6, 32 * time.Minute},
		{7, time.Hour},
		{1000, time.Hour}, // 2^999 overflows a Duration; the cap holds
	}
	for _, tt := range tests {
		if got := p.backoff(tt.attempts); got != tt.want {
			t.Errorf("backoff(%d) = %s, want %s", tt.attempts, got, tt.want)
		}
	}
}

func TestBackoffFractionalMultiplier(t *testing.T) {
	t.Parallel()
	// 1.5 truncated to a Duration-based integer factor would give 1m, 1m, 1m.
	p := newRetryPolicy(RetryConfig{InitialInterval: time.Minute, Multiplier: 1.5}.WithDefaults())
	p.rand = func() float64 { return 0.5 }
	if got, want := p.backoff(3), 135*time.Second; got != want {
		t.Fatalf("backoff(3) = %s, want %s", got, want)
	}
}

func TestBackoffJitter(t *testing.T) {
	t.Parallel()
	p := newRetryPolicy(RetryConfig{}.WithDefaults())
	p.rand = func() float64 { return 0 }
	if got, want := p.backoff(2), 96*time.Second; got != want {
		t.Fatalf("low jitter: %s, want %s", got, want)
	}
	p.rand = func() float64 { return 0.999999999 }
	if got := p.backoff(2); got < 143*time.Second || got > 144*time.Second {
		t.Fatalf("high jitter: %s, want about 144s", got)
	}
	// Jitter never pushes past the cap.
	if got := p.backoff(50); got > time.Hour {
		t.Fatalf("capped with jitter: %s", got)
	}
	// With real randomness, every value stays within ±20%.
	p = newRetryPolicy(RetryConfig{}.WithDefaults())
	for range 1000 {
		if got := p.backoff(1); got < 48*time.Second || got > 72*time.Second {
			t.Fatalf("backoff(1) = %s, outside 48s..72s", got)
		}
	}
}

func TestRetryNextExpiresPastMaxAge(t *testing.T) {
	t.Parallel()
	p := newRetryPolicy(RetryConfig{}.WithDefaults())
	p.rand = func() float64 { return 0.5 }
	due := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

	at, expired := p.next(due.Add(10*time.Minute), 1, due)
	if expired || !at.Equal(due.Add(11*time.Minute)) {
		t.Fatalf("next = %s, %v", at, expired)
	}
	// 47h30m + 1h lands past 48h.
	if _, expired := p.next(due.Add(47*time.Hour+30*time.Minute), 20, due); !expired {
		t.Fatal("a retry past the maximum age was scheduled")
	}
	// Exactly at the limit is still allowed.
	if _, expired := p.next(due.Add(47*time.Hour), 20, due); expired {
		t.Fatal("a retry at the maximum age expired")
	}
}

func TestRetryConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		mod     func(*RetryConfig)
		wantErr string
	}{
		{"defaults", func(*RetryConfig) {}, ""},
		{"negative initial", func(c *RetryConfig) { c.InitialInterval = -1 }, "InitialInterval:"},
		{"shrinking", func(c *RetryConfig) { c.Multiplier = 0.5 }, "Multiplier:"},
		{"cap below initial", func(c *RetryConfig) { c.MaxInterval = time.Second }, "MaxInterval:"},
		{"jitter too large", func(c *RetryConfig) { c.Jitter = 1 }, "Jitter:"},
		{"negative jitter", func(c *RetryConfig) { c.Jitter = -0.1 }, "Jitter:"},
		{"negative max age", func(c *RetryConfig) { c.MaxAge = -time.Hour }, "MaxAge:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := RetryConfig{}.WithDefaults()
			tt.mod(&c)
			checkValidateErr(t, c.validate(), tt.wantErr)
		})
	}
}
