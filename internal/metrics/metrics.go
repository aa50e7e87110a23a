// Package metrics holds the Prometheus metrics of one Posthaste process, on
// a registry of its own: nothing is registered globally, so two processes
// in one test binary do not share counters. Components are told nothing
// about Prometheus; they report through small observer hooks (delivery's
// Observer, service's CallObserver, plain funcs), which Metrics implements,
// and what the database knows is read at scrape time (Sources).
package metrics

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics is the process's metrics. The zero value is not usable; a nil
// *Metrics is, and records nothing, so components can hold one without
// checking.
type Metrics struct {
	reg *prometheus.Registry

	recipientsFinal *prometheus.CounterVec
	smtpAttempts    *prometheus.CounterVec
	latency         prometheus.Histogram
	sessionStep     *prometheus.HistogramVec
	claim           prometheus.Histogram
	openConns       *prometheus.GaugeVec
	bounceReports   *prometheus.CounterVec
	webhooks        *prometheus.CounterVec
	apiRequests     *prometheus.CounterVec
	apiDuration     *prometheus.HistogramVec
	methods         methodSet

	mu      sync.Mutex
	sources Sources
}

// Sources are what a scrape reads from the rest of the process. Each may be
// nil until the part it reads from has started; its metric is then left out
// of the scrape.
type Sources struct {
	// Accepted counts the messages accepted so far.
	Accepted func() int64
	// Queue counts the recipients by status and the age of the oldest due
	// one; see db.DB.QueueDepth.
	Queue func(ctx context.Context, now time.Time) (map[string]int64, time.Duration, error)
	// Pool reads the database pool's counters.
	Pool func() *pgxpool.Stat
	// Retention returns the rows the retention janitor purged (bodies
	// removed) and deleted so far.
	Retention func() (purged, deleted int64)
	// Ready reports whether the process is ready to serve.
	Ready func(ctx context.Context) bool
}

// Label values. Outcomes are the recipient's final statuses; suppressed
// and canceled recipients are counted by whoever ends them that way.
var (
	outcomes       = []string{"delivered", "bounced", "failed", "suppressed", "canceled"}
	attemptResults = []string{"2xx", "4xx", "5xx", "network", "timeout", "ambiguous", "local"}
	sessionSteps   = []string{"connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "dot", "pipeline"}
	bounceKinds    = []string{"dsn", "complaint", "auto_reply", "unstructured_bounce", "unknown", "refused"}
	webhookResults = []string{"delivered", "retried", "failed"}
	queueStates    = []string{"scheduled", "queued", "sending", "deferred"}
)

// New returns metrics registered on a new registry, with Go runtime and
// process collectors alongside.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		recipientsFinal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "posthaste_recipients_final_total",
			Help: "Recipients that reached a final status, by outcome and bounce class (none when not bounced).",
		}, []string{"outcome", "class"}),
		smtpAttempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "posthaste_smtp_attempts_total",
			Help: "SMTP tries of one host, by result: the reply class, or network, timeout, ambiguous (no answer after the data), local (refused before sending).",
		}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "posthaste_delivery_latency_seconds",
			Help:    "Time from a message's acceptance to a recipient's delivery.",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600},
		}),
		sessionStep: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "posthaste_smtp_session_step_seconds",
			Help:    "Duration of SMTP session steps: connect, ehlo (greeting and EHLO), starttls (handshake and EHLO), pipeline (MAIL, RCPT and DATA pipelined).",
			Buckets: []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"step"}),
		claim: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "posthaste_delivery_claim_seconds",
			Help: "Duration of the delivery claim transaction (lease due recipients, mark their messages sending, load them), empty claims included.",
			// Fine below 50ms, where a healthy queue's claims are; 0.02
			// is a bound of its own so a 20ms target can be checked.
			Buckets: []float64{0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5},
		}),
		openConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "posthaste_smtp_open_connections",
			Help: "Open outbound SMTP connections, by provider of the MX host (other when unknown).",
		}, []string{"provider"}),
		bounceReports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "posthaste_bounce_reports_total",
			Help: "Messages received by the bounce listener, by kind; refused counts recipients refused.",
		}, []string{"kind"}),
		webhooks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "posthaste_webhook_deliveries_total",
			Help: "Webhook delivery attempts recorded, by result.",
		}, []string{"result"}),
		apiRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "posthaste_api_requests_total",
			Help: "API requests, by protocol, method (gRPC method or REST route) and code (gRPC code or HTTP status).",
		}, []string{"protocol", "method", "code"}),
		apiDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "posthaste_api_request_duration_seconds",
			Help:    "API request duration, by protocol and method.",
			Buckets: prometheus.DefBuckets,
		}, []string{"protocol", "method"}),
	}
	m.methods = methodSet{seen: map[string]bool{}}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.recipientsFinal, m.smtpAttempts, m.latency, m.sessionStep, m.claim, m.openConns,
		m.bounceReports, m.webhooks, m.apiRequests, m.apiDuration,
		&scrapeCollector{m: m},
	)
	// Series that exist from the start, so rate() and absent() work before
	// the first event.
	for _, v := range attemptResults {
		m.smtpAttempts.WithLabelValues(v)
	}
	for _, v := range bounceKinds {
		m.bounceReports.WithLabelValues(v)
	}
	for _, v := range webhookResults {
		m.webhooks.WithLabelValues(v)
	}
	for _, v := range []string{"delivered", "failed"} {
		m.recipientsFinal.WithLabelValues(v, "none")
	}
	return m
}

// Registry is where the metrics are registered, for tests and for adding
// collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, MaxRequestsInFlight: 4})
}

// SetSources sets what scrapes read; called once the process's parts have
// started.
func (m *Metrics) SetSources(s Sources) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sources = s
}

// ObserveCall counts one API call (service.CallObserver).
func (m *Metrics) ObserveCall(protocol, method, code string, elapsed time.Duration) {
	if m == nil {
		return
	}
	method = m.methods.bound(method)
	m.apiRequests.WithLabelValues(protocol, method, code).Inc()
	m.apiDuration.WithLabelValues(protocol, method).Observe(elapsed.Seconds())
}

// SMTPAttempt counts one try of one host (delivery.Observer).
func (m *Metrics) SMTPAttempt(result string) {
	if m == nil {
		return
	}
	m.smtpAttempts.WithLabelValues(oneOf(result, attemptResults, "local")).Inc()
}

// RecipientFinal counts a recipient's final outcome and, for a delivery,
// its latency from acceptance (delivery.Observer).
func (m *Metrics) RecipientFinal(status, class string, accepted time.Time) {
	if m == nil {
		return
	}
	if class == "" {
		class = "none"
	}
	m.recipientsFinal.WithLabelValues(oneOf(status, outcomes, "failed"), boundedClass(class)).Inc()
	if status == "delivered" && !accepted.IsZero() {
		m.latency.Observe(time.Since(accepted).Seconds())
	}
}

// RecipientsEnded counts n recipients ended without an SMTP attempt, as
// suppressed or canceled.
func (m *Metrics) RecipientsEnded(outcome string, n int) {
	if m == nil || n <= 0 {
		return
	}
	m.recipientsFinal.WithLabelValues(oneOf(outcome, outcomes, "failed"), "none").Add(float64(n))
}

// SessionStep times one SMTP session step (delivery.Observer).
func (m *Metrics) SessionStep(step string, elapsed time.Duration) {
	if m == nil {
		return
	}
	m.sessionStep.WithLabelValues(oneOf(step, sessionSteps, "pipeline")).Observe(elapsed.Seconds())
}

// Claim times one delivery claim round trip (delivery.Observer).
func (m *Metrics) Claim(elapsed time.Duration) {
	if m == nil {
		return
	}
	m.claim.Observe(elapsed.Seconds())
}

// ConnectionOpened counts an open SMTP connection under its provider, a
// name from delivery's traffic-shaping table (delivery.Observer). The
// table is configuration, so the label stays bounded.
func (m *Metrics) ConnectionOpened(provider string) func() {
	if m == nil {
		return func() {}
	}
	if provider == "" {
		provider = "other"
	}
	g := m.openConns.WithLabelValues(provider)
	g.Inc()
	return g.Dec
}

// BounceReport counts a report the bounce listener received, or a refusal.
func (m *Metrics) BounceReport(kind string) {
	if m == nil {
		return
	}
	m.bounceReports.WithLabelValues(oneOf(kind, bounceKinds, "unknown")).Inc()
}

// WebhookDelivery counts a webhook delivery attempt's result.
func (m *Metrics) WebhookDelivery(result string) {
	if m == nil {
		return
	}
	m.webhooks.WithLabelValues(oneOf(result, webhookResults, "failed")).Inc()
}

// oneOf returns v when it is one of allowed, else fallback: a label value
// outside the documented set would be a bug, and must not grow the series.
func oneOf(v string, allowed []string, fallback string) string {
	for _, a := range allowed {
		if v == a {
			return v
		}
	}
	return fallback
}

// boundedClass keeps bounce classes to the shape delivery's classifier
// gives them (a short lowercase word); anything else is "other".
func boundedClass(c string) string {
	if len(c) > 32 {
		return "other"
	}
	for _, r := range c {
		if (r < 'a' || r > 'z') && r != '_' && r != '-' {
			return "other"
		}
	}
	return c
}

// methodSet bounds the method label. gRPC methods and REST routes are
// finite sets, but a method name comes from the caller for unknown gRPC
// methods ("/any/thing" answered Unimplemented); past maxMethods distinct
// names the rest are "other".
type methodSet struct {
	mu   sync.Mutex
	seen map[string]bool
}

const maxMethods = 200

func (s *methodSet) bound(method string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seen[method] {
		return method
	}
	if len(s.seen) >= maxMethods || len(method) > 128 {
		return "other"
	}
	s.seen[method] = true
	return method
}
