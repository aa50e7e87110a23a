// Package webhook sends a project's events to its webhook endpoints.
//
// Two parts, each with the Start/Stop lifecycle of every long-lived part:
// FanOut reads the event feed after its stored cursor and creates one
// delivery per event and matching endpoint, moving the cursor in the same
// transaction (db.FanOutWebhooks), so no event is lost or fanned out twice
// across restarts and instances. Sender claims due deliveries under a lease,
// posts them signed as the Standard Webhooks specification says
// (https://www.standardwebhooks.com), and retries failures on a schedule
// until they are delivered or given up; an endpoint that keeps failing is
// disabled. Every connection goes through a netguard.Guard, so an endpoint
// cannot point Posthaste at loopback, private or metadata addresses.
package webhook

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/posthaste/posthaste/internal/netguard"
)

// Defaults for Config.
const (
	DefaultConcurrency      = 10
	DefaultPollInterval     = time.Second
	DefaultFanOutBatch      = 500
	DefaultLeaseDuration    = time.Minute
	DefaultTimeout          = 10 * time.Second
	DefaultMaxResponseBytes = 64 << 10
	DefaultDisableAfter     = 5 * 24 * time.Hour
	DefaultUserAgent        = "Posthaste-Webhooks/1.0"
)

const (
	// jitter spreads each retry delay by this fraction either way, so
	// deliveries that failed together do not all retry together.
	jitter = 0.2
	// minLeaseOverTimeout is the least a lease outlasts an attempt: the
	// outcome must be written before anyone may rescue the delivery.
	minLeaseOverTimeout = 5 * time.Second
	// responseSnippet is how much of a failed response's body is kept in
	// the delivery log.
	responseSnippet = 200
	// recordTimeout bounds writing one outcome.
	recordTimeout = 10 * time.Second
)

// DefaultRetrySchedule is the delay before each retry after a failed
// attempt: eight attempts over about 27 hours, the schedule the Standard
// Webhooks reference implementation uses.
func DefaultRetrySchedule() []time.Duration {
	return []time.Duration{
		5 * time.Second, 5 * time.Minute, 30 * time.Minute,
		2 * time.Hour, 5 * time.Hour, 10 * time.Hour, 10 * time.Hour,
	}
}

// Config configures FanOut and Sender.
type Config struct {
	// Concurrency is how many requests are in flight at once. Defaults to
	// 10.
	Concurrency int
	// PollInterval is how often the fan-out reads the event feed, and how
	// often the sender looks for due retries without being woken. Defaults
	// to 1s.
	PollInterval time.Duration
	// FanOutBatch is how many events one fan-out transaction reads.
	// Defaults to 500.
	FanOutBatch int
	// LeaseDuration is how long a claimed delivery stays reserved; a
	// crashed sender's deliveries are sent again after about this long. It
	// must exceed Timeout by at least 5s, since an attempt is never
	// renewed. Defaults to 1m.
	LeaseDuration time.Duration
	// Timeout bounds one request: connecting, TLS, sending, and reading the
	// response. Defaults to 10s.
	Timeout time.Duration
	// MaxResponseBytes is how much of a response body is read; the rest is
	// discarded unread. Defaults to 64 KiB.
	MaxResponseBytes int64
	// RetrySchedule is the delay before each retry, in order; after the
	// last one a delivery has failed. Each delay gets ±20% jitter.
	// Defaults to DefaultRetrySchedule().
	RetrySchedule []time.Duration
	// DisableAfter disables an endpoint whose attempts have all failed for
	// this long. Negative never disables on time. Defaults to 5 days.
	DisableAfter time.Duration
	// DisableAfterFailures disables an endpoint after this many failed
	// attempts in a row. Defaults to 0, which leaves it to DisableAfter.
	DisableAfterFailures int
	// UserAgent is sent with every request. Defaults to
	// "Posthaste-Webhooks/1.0".
	UserAgent string
	// Guard decides which addresses may be connected to. Defaults to
	// netguard.New(): no loopback, private, link-local or metadata
	// addresses.
	Guard *netguard.Guard
	// Logger receives what happens. Defaults to a discarding logger.
	Logger *slog.Logger
	// Observe is told the result of every recorded delivery attempt:
	// "delivered", "retried" or "failed" (for good), for metrics. Defaults
	// to nil: nothing is told.
	Observe func(result string)
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.FanOutBatch == 0 {
		c.FanOutBatch = DefaultFanOutBatch
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.LeaseDuration == 0 {
		c.LeaseDuration = max(DefaultLeaseDuration, c.Timeout+minLeaseOverTimeout)
	}
	if c.MaxResponseBytes == 0 {
		c.MaxResponseBytes = DefaultMaxResponseBytes
	}
	if c.RetrySchedule == nil {
		c.RetrySchedule = DefaultRetrySchedule()
	}
	if c.DisableAfter == 0 {
		c.DisableAfter = DefaultDisableAfter
	}
	if c.UserAgent == "" {
		c.UserAgent = DefaultUserAgent
	}
	if c.Guard == nil {
		c.Guard = netguard.New()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports the first problem with c after defaults are applied.
// The error starts with the field's name.
func (c Config) Validate() error {
	return c.WithDefaults().validate()
}

func (c Config) validate() error {
	switch {
	case c.Concurrency < 1:
		return fmt.Errorf("Concurrency: must be at least 1, got %d", c.Concurrency)
	case c.PollInterval < 0:
		return fmt.Errorf("PollInterval: must not be negative, got %s", c.PollInterval)
	case c.FanOutBatch < 1:
		return fmt.Errorf("FanOutBatch: must be at least 1, got %d", c.FanOutBatch)
	case c.Timeout < 0:
		return fmt.Errorf("Timeout: must not be negative, got %s", c.Timeout)
	case c.LeaseDuration < c.Timeout+minLeaseOverTimeout:
		return fmt.Errorf("LeaseDuration: must be at least Timeout plus %s, got %s", minLeaseOverTimeout, c.LeaseDuration)
	case c.MaxResponseBytes < 0:
		return fmt.Errorf("MaxResponseBytes: must not be negative, got %d", c.MaxResponseBytes)
	case c.DisableAfterFailures < 0:
		return fmt.Errorf("DisableAfterFailures: must not be negative, got %d", c.DisableAfterFailures)
	}
	for i, d := range c.RetrySchedule {
		if d < 0 {
			return fmt.Errorf("RetrySchedule: delay %d must not be negative, got %s", i+1, d)
		}
	}
	return nil
}

var errNoStore = errors.New("webhook: store is required")
