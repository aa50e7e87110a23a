package service

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// ReasonRateLimited is the google.rpc.ErrorInfo reason of the
// ResourceExhausted error returned when a key's request rate or a
// project's recipients per day are used up. Its RetryInfo says when to try
// again; REST sends it as 429 with Retry-After.
const ReasonRateLimited = "RATE_LIMITED"

// rateLimitedError is a call refused by a rate limit; nothing was stored.
type rateLimitedError struct {
	limit      string // which limit, for the caller
	retryAfter time.Duration
}

func (e *rateLimitedError) Error() string {
	return fmt.Sprintf("rate limit exceeded: %s; retry in %s", e.limit, e.retryAfter.Round(time.Second))
}

// senderDeniedError is a send from a domain the key may not send from.
type senderDeniedError struct {
	field, domain string
}

func (e *senderDeniedError) Error() string {
	return fmt.Sprintf("%s: the API key may not send from %s", e.field, e.domain)
}

// checkSender refuses addr, the value of field, when its domain is not one
// of the key's sender domains.
func checkSender(caller principal, field, addr string) error {
	at := strings.LastIndexByte(addr, '@')
	domain := strings.ToLower(strings.TrimSuffix(addr[at+1:], "."))
	if !caller.key.AllowsSender(domain) {
		return &senderDeniedError{field: field, domain: domain}
	}
	return nil
}

// maxBuckets bounds the request rate buckets kept; past it, buckets that
// are full again (idle for a second or more) are dropped.
const maxBuckets = 10000

// requestLimiter is the request rate limit of API keys: a token bucket per
// key, in this process. It is per instance on purpose: a shared counter
// would cost a database round trip on every call to save what a load
// balancer spreading calls over N instances gives anyway, a limit N times
// the configured one at most.
type requestLimiter struct {
	defaultRate int
	now         func() time.Time

	mu      sync.Mutex
	buckets map[uuid.UUID]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newRequestLimiter(defaultRate int) *requestLimiter {
	return &requestLimiter{defaultRate: defaultRate, now: time.Now, buckets: make(map[uuid.UUID]*bucket)}
}

// rateOf is the requests per second allowed to k: its own override, else
// its project's, else the default; 0 is no limit.
func (l *requestLimiter) rateOf(k db.APIKey) int {
	switch {
	case k.RequestsPerSecond != nil:
		return *k.RequestsPerSecond
	case k.Limits.RequestsPerSecond != nil:
		return *k.Limits.RequestsPerSecond
	}
	return l.defaultRate
}

// allow takes a token of k's bucket, which holds one second's worth, or
// says how long until there is one.
func (l *requestLimiter) allow(k db.APIKey) error {
	rate := l.rateOf(k)
	if rate <= 0 {
		return nil
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[k.ID]
	if b == nil {
		if len(l.buckets) >= maxBuckets {
			l.sweep(now)
		}
		b = &bucket{tokens: float64(rate), at: now}
		l.buckets[k.ID] = b
	}
	b.tokens = min(float64(rate), b.tokens+now.Sub(b.at).Seconds()*float64(rate))
	b.at = now
	if b.tokens >= 1 {
		b.tokens--
		return nil
	}
	wait := time.Duration((1 - b.tokens) / float64(rate) * float64(time.Second))
	return &rateLimitedError{limit: fmt.Sprintf("%d requests per second for this API key", rate), retryAfter: wait}
}

// sweep drops the buckets idle for a second, which are full anyway. l.mu
// is held.
func (l *requestLimiter) sweep(now time.Time) {
	for id, b := range l.buckets {
		if now.Sub(b.at) >= time.Second {
			delete(l.buckets, id)
		}
	}
}

// recipientsPerDay is the daily recipient limit of the caller's project;
// 0 is no limit.
func (s *Server) recipientsPerDay(caller principal) int64 {
	if l := caller.key.Limits.RecipientsPerDay; l != nil {
		return *l
	}
	return s.cfg.RecipientsPerDay
}

// reserveRecipients counts n recipients against the caller's project's
// daily limit before they are stored, and returns the function that takes
// back any that end up not stored (refused, replayed). With no limit it
// costs nothing.
func (s *Server) reserveRecipients(ctx context.Context, caller principal, n int, now time.Time) (refund func(int), err error) {
	limit := s.recipientsPerDay(caller)
	if limit <= 0 || n == 0 {
		return func(int) {}, nil
	}
	_, err = s.store.AddProjectRecipients(ctx, caller.projectID, now, n, limit)
	if errors.Is(err, db.ErrLimitExceeded) {
		return nil, &rateLimitedError{limit: fmt.Sprintf("%d recipients per day (UTC) for this project", limit),
			retryAfter: db.UsageDay(now).Add(24 * time.Hour).Sub(now)}
	}
	if err != nil {
		return nil, fmt.Errorf("count recipients: %w", err)
	}
	return func(k int) {
		if k <= 0 {
			return
		}
		// A refund lost here only makes the limit stricter for the day.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := s.store.RefundProjectRecipients(rctx, caller.projectID, now, k); err != nil {
			s.log.WarnContext(ctx, "refund recipients not stored", "project", caller.projectID, "recipients", k, "error", err)
		}
	}, nil
}
