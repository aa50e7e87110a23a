package webhook

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/netguard"
)

// Sender posts claimed deliveries to their endpoints.
type Sender struct {
	cfg    Config
	store  *db.DB
	log    *slog.Logger
	client *http.Client

	wake     chan struct{}
	slots    chan struct{}
	cancel   context.CancelFunc
	done     chan struct{}
	inflight sync.WaitGroup
	stopOnce sync.Once
}

// NewSender returns a sender for the deliveries in store.
func NewSender(cfg Config, store *db.DB) (*Sender, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("webhook config: %w", err)
	}
	if store == nil {
		return nil, errNoStore
	}
	return &Sender{
		cfg:    cfg,
		store:  store,
		log:    cfg.Logger,
		client: NewClient(cfg.Guard, cfg.Timeout),
		wake:   make(chan struct{}, 1),
		slots:  make(chan struct{}, cfg.Concurrency),
	}, nil
}

// NewClient returns the HTTP client webhooks are sent with: every
// connection dialed through guard (checked after resolution, so a name that
// resolves to a refused address at send time is refused), no proxy from
// the environment (the guard would only see the proxy), redirects not
// followed (a 3xx is a failed attempt, so an endpoint cannot redirect
// Posthaste elsewhere), and timeout over the whole request, the response
// body included.
func NewClient(guard *netguard.Guard, timeout time.Duration) *http.Client {
	transport := &http.Transport{
		Proxy:                 nil,
		DialContext:           guard.Dialer(timeout).DialContext,
		TLSHandshakeTimeout:   timeout,
		ResponseHeaderTimeout: timeout,
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   4,
		IdleConnTimeout:       90 * time.Second,
	}
	return &http.Client{
		Transport: transport,
		Timeout:   timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// Start runs the sender until ctx ends or Stop is called. It returns at
// once; call it once.
func (s *Sender) Start(ctx context.Context) {
	ctx, s.cancel = context.WithCancel(ctx)
	s.done = make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		s.run(ctx)
	}()
	go func() {
		defer wg.Done()
		s.rescue(ctx)
	}()
	go func() {
		wg.Wait()
		close(s.done)
	}()
}

// Stop stops claiming, waits for the requests in flight (each bounded by
// Timeout) and their outcomes, and returns. It is idempotent, and safe
// before Start.
func (s *Sender) Stop() {
	s.stopOnce.Do(func() {
		if s.cancel == nil {
			return
		}
		s.cancel()
		<-s.done
		s.inflight.Wait()
		s.client.CloseIdleConnections()
	})
}

// Wake makes the sender look for due deliveries now.
func (s *Sender) Wake() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Sender) run(ctx context.Context) {
	poll(ctx, s.wake, s.cfg.PollInterval, s.claimAndSend)
}

// claimAndSend claims as many deliveries as there are free slots (waiting
// for one at least) and starts them. It reports whether more may be due.
func (s *Sender) claimAndSend(ctx context.Context) bool {
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return false
	}
	free := 1
	for free < s.cfg.Concurrency {
		select {
		case s.slots <- struct{}{}:
			free++
			continue
		default:
		}
		break
	}
	owner := newOwner()
	jobs, err := s.store.ClaimWebhooks(ctx, db.ClaimWebhooksParams{Owner: owner, Limit: free, LeaseFor: s.cfg.LeaseDuration})
	if err != nil && ctx.Err() == nil {
		s.log.Warn("claim webhook deliveries", "err", err)
	}
	for range free - len(jobs) {
		<-s.slots
	}
	for _, j := range jobs {
		s.inflight.Add(1)
		go func() {
			defer s.inflight.Done()
			defer func() { <-s.slots }()
			s.deliver(ctx, j)
		}()
	}
	return err == nil && len(jobs) == free
}

// deliver makes one attempt and writes its outcome. The request is not cut
// by Stop: it is bounded by Timeout, and its outcome is worth writing.
func (s *Sender) deliver(ctx context.Context, j db.WebhookJob) {
	a := s.attempt(context.WithoutCancel(ctx), j)
	if !a.Delivered {
		if i := j.Attempts - 1; i < len(s.cfg.RetrySchedule) {
			a.NextAttemptAt = time.Now().Add(withJitter(s.cfg.RetrySchedule[i]))
		}
	}
	a.DisableAfter = s.cfg.DisableAfter
	if a.DisableAfter < 0 {
		a.DisableAfter = 0
	}
	a.DisableAfterFailures = s.cfg.DisableAfterFailures
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	res, err := s.store.RecordWebhookAttempt(rctx, a)
	log := s.log.With("delivery_id", j.ID, "endpoint_id", j.EndpointID, "event_id", j.EventID, "attempt", j.Attempts)
	switch {
	case err != nil:
		// The lease runs out and the delivery is sent again: at least once.
		log.Error("record webhook attempt", "err", err)
	case !res.Recorded:
		log.Warn("webhook outcome not recorded: the delivery was taken back or deleted")
	case a.Delivered:
		log.Debug("webhook delivered", "status", a.StatusCode, "latency", a.Latency)
		s.observe("delivered")
	case a.NextAttemptAt.IsZero():
		log.Warn("webhook delivery failed for good", "status", a.StatusCode, "error", a.Error)
		s.observe("failed")
	default:
		log.Info("webhook attempt failed, will retry", "status", a.StatusCode, "error", a.Error, "next_attempt_at", a.NextAttemptAt)
		s.observe("retried")
	}
	if res.Disabled {
		log.Warn("webhook endpoint disabled after failing too long", "url", j.URL)
	}
}

// attempt posts the delivery once.
func (s *Sender) attempt(ctx context.Context, j db.WebhookJob) db.WebhookAttempt {
	a := db.WebhookAttempt{ID: j.ID, LeaseOwner: j.LeaseOwner, At: time.Now()}
	sig, err := Sign(j.Secrets, j.EventID, a.At, j.Body)
	if err != nil {
		a.Error = err.Error()
		return a
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.URL, bytes.NewReader(j.Body))
	if err != nil {
		a.Error = "bad url: " + err.Error()
		return a
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", s.cfg.UserAgent)
	req.Header.Set("webhook-id", j.EventID)
	req.Header.Set("webhook-timestamp", strconv.FormatInt(a.At.Unix(), 10))
	req.Header.Set("webhook-signature", sig)
	resp, err := s.client.Do(req)
	if err != nil {
		a.Latency = time.Since(a.At)
		a.Error = describe(err)
		return a
	}
	defer resp.Body.Close()
	// The body is read, bounded, so the connection can be reused and a
	// failure can show what the endpoint said.
	body, readErr := io.ReadAll(io.LimitReader(resp.Body, s.cfg.MaxResponseBytes))
	a.Latency = time.Since(a.At)
	a.StatusCode = resp.StatusCode
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		a.Delivered = true
		return a
	}
	a.Error = "HTTP " + strconv.Itoa(resp.StatusCode)
	if resp.StatusCode >= 300 && resp.StatusCode < 400 {
		a.Error += " (redirects are not followed)"
	}
	if snippet := snippetOf(body); snippet != "" {
		a.Error += ": " + snippet
	} else if readErr != nil {
		a.Error += ": reading the response: " + describe(readErr)
	}
	return a
}

// describe says what went wrong with a request without repeating the URL,
// which the log entry already belongs to.
func describe(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var re *netguard.RefusedError
	if errors.As(err, &re) {
		return "refused by the address guard: " + re.Error()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout: " + err.Error()
	}
	return err.Error()
}

// snippetOf is the start of a response body as printable text.
func snippetOf(body []byte) string {
	s := strings.TrimSpace(strings.ToValidUTF8(string(body), "?"))
	if len(s) > responseSnippet {
		s = s[:responseSnippet]
		for !utf8.ValidString(s) {
			s = s[:len(s)-1]
		}
		s += "..."
	}
	return strings.Map(func(r rune) rune {
		if r < ' ' {
			return ' '
		}
		return r
	}, s)
}

// withJitter spreads d by ±jitter, computed in float seconds and converted
// last.
func withJitter(d time.Duration) time.Duration {
	f := d.Seconds() * (1 - jitter + 2*jitter*rand.Float64())
	return time.Duration(f * float64(time.Second))
}

// rescue returns deliveries of crashed senders every quarter lease.
func (s *Sender) rescue(ctx context.Context) {
	t := time.NewTicker(s.cfg.LeaseDuration / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := s.store.RescueWebhooks(ctx, time.Time{})
		switch {
		case err != nil && ctx.Err() == nil:
			s.log.Warn("rescue webhook deliveries", "err", err)
		case n > 0:
			s.log.Info("rescued webhook deliveries whose lease ran out", "count", n)
			s.Wake()
		}
	}
}

// newOwner names one claim.
func newOwner() string {
	return "wh-" + crand.Text()
}

// observe tells the configured observer a delivery attempt's result.
func (s *Sender) observe(result string) {
	if s.cfg.Observe != nil {
		s.cfg.Observe(result)
	}
}
