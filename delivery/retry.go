package delivery

import (
	"errors"
	"math"
	"math/rand/v2"
	"time"
)

// RetryConfig is the retry policy for temporary failures.
type RetryConfig struct {
	// InitialInterval is the wait after the first failed attempt. Defaults to 1m.
	InitialInterval time.Duration
	// Multiplier grows the interval after each further attempt. Defaults to 2.
	Multiplier float64
	// MaxInterval caps the interval, jitter included. Defaults to 1h.
	MaxInterval time.Duration
	// Jitter spreads each interval by up to this fraction either way, so
	// recipients that failed together do not retry together. Defaults to 0.2.
	Jitter float64
	// MaxAge is how long after a message became due (its creation, or its
	// send_at when it was scheduled) its recipients are still retried; a
	// recipient whose next attempt would fall later fails instead. Defaults
	// to 48h.
	MaxAge time.Duration
}

// WithDefaults returns the config with zero fields set to their defaults.
func (c RetryConfig) WithDefaults() RetryConfig {
	if c.InitialInterval == 0 {
		c.InitialInterval = time.Minute
	}
	if c.Multiplier == 0 {
		c.Multiplier = 2
	}
	if c.MaxInterval == 0 {
		c.MaxInterval = time.Hour
	}
	if c.Jitter == 0 {
		c.Jitter = 0.2
	}
	if c.MaxAge == 0 {
		c.MaxAge = 48 * time.Hour
	}
	return c
}

func (c RetryConfig) validate() error {
	switch {
	case c.InitialInterval <= 0:
		return errors.New("InitialInterval: must be positive")
	case c.Multiplier < 1 || math.IsInf(c.Multiplier, 0) || math.IsNaN(c.Multiplier):
		return errors.New("Multiplier: must be at least 1")
	case c.MaxInterval < c.InitialInterval:
		return errors.New("MaxInterval: must not be less than InitialInterval")
	case c.Jitter < 0 || c.Jitter >= 1 || math.IsNaN(c.Jitter):
		return errors.New("Jitter: must be in [0, 1)")
	case c.MaxAge <= 0:
		return errors.New("MaxAge: must be positive")
	}
	return nil
}

// retryPolicy computes when a deferred recipient is tried again.
type retryPolicy struct {
	cfg RetryConfig
	// rand returns a number in [0, 1); injected so tests can pin the jitter.
	rand func() float64
}

func newRetryPolicy(cfg RetryConfig) retryPolicy {
	return retryPolicy{cfg: cfg, rand: rand.Float64}
}

// backoff returns the wait after the given number of attempts (1 after the
// first). The arithmetic stays in float seconds until the end: converting the
// multiplier or the interval to a Duration first would truncate the growth
// factor and overflow on large attempt counts.
func (p retryPolicy) backoff(attempts int) time.Duration {
	if attempts < 1 {
		attempts = 1
	}
	secs := p.cfg.InitialInterval.Seconds() * math.Pow(p.cfg.Multiplier, float64(attempts-1))
	maxSecs := p.cfg.MaxInterval.Seconds()
	if secs > maxSecs || math.IsInf(secs, 0) || math.IsNaN(secs) {
		secs = maxSecs
	}
	secs *= 1 + p.cfg.Jitter*(2*p.rand()-1)
	secs = min(secs, maxSecs)
	return time.Duration(secs * float64(time.Second))
}

// next decides what follows a temporary failure: the time of the next
// attempt, or expired when that time falls more than MaxAge after dueSince,
// the time the message became due.
func (p retryPolicy) next(now time.Time, attempts int, dueSince time.Time) (at time.Time, expired bool) {
	at = now.Add(p.backoff(attempts))
	if at.After(dueSince.Add(p.cfg.MaxAge)) {
		return time.Time{}, true
	}
	return at, false
}
