package delivery

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/posthaste/posthaste/db"
)

// Observer is told what delivery does, for metrics. Its methods are called
// from many goroutines on the delivery path and must be quick. Every value
// passed is from a small fixed set, except mxHost, which the observer must
// reduce to a bounded set itself.
type Observer interface {
	// SMTPAttempt counts one try of one host, or of the attempt when no
	// host was tried: result is one of 2xx, 4xx, 5xx, network, timeout,
	// ambiguous, local.
	SMTPAttempt(result string)
	// RecipientFinal counts a recipient reaching a final status
	// (delivered, bounced, failed, or canceled when a cancel requested
	// while it was leased ended it) with its bounce class ("" for none);
	// accepted is when its message was accepted, zero when not known.
	RecipientFinal(status, class string, accepted time.Time)
	// SessionStep times one step of an SMTP session: connect, ehlo (the
	// greeting and EHLO, read together), starttls (the handshake and the
	// EHLO after it) or pipeline (a pipelined MAIL, RCPT and DATA).
	SessionStep(step string, elapsed time.Duration)
	// ConnectionOpened counts an open SMTP connection to a host of
	// provider (a name from the traffic-shaping table, or "other"); the
	// returned function is called once when it closes.
	ConnectionOpened(provider string) (closed func())
	// Claim times one claim round trip: the query that leases due
	// recipients and returns their messages. Claims that found nothing
	// count too, as do failed ones: a slow empty claim still delays the
	// next batch.
	Claim(elapsed time.Duration)
}

// observer returns c's observer, or one that does nothing.
func (c *connector) observer() Observer {
	if c.obs == nil {
		return nopObserver{}
	}
	return c.obs
}

type nopObserver struct{}

func (nopObserver) SMTPAttempt(string)                       {}
func (nopObserver) RecipientFinal(string, string, time.Time) {}
func (nopObserver) SessionStep(string, time.Duration)        {}
func (nopObserver) ConnectionOpened(string) func()           { return func() {} }
func (nopObserver) Claim(time.Duration)                      {}

// countedConn tells the observer once when it is closed, whichever of the
// session's paths closes it.
type countedConn struct {
	net.Conn
	once   sync.Once
	closed func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.closed)
	return c.Conn.Close()
}

// observeAttempt reports an attempt's tries of hosts and its final
// outcomes. Only outcomes the database applied count, so a recipient
// fenced off after a lost lease is counted by the dispatcher that has it.
func (d *Dispatcher) observeAttempt(res attemptResult) {
	obs := d.cfg.Observer
	if obs == nil {
		return
	}
	for _, h := range res.Hosts {
		if h.Err != nil {
			obs.SMTPAttempt(attemptResultOf(h.Err))
			continue
		}
		// The host that took the transaction: its result is the first
		// recipient's, or 2xx when any was accepted.
		result := ""
		for _, r := range res.Rcpts {
			if r.Err == nil {
				result = "2xx"
				break
			}
			if result == "" {
				result = attemptResultOf(r.Err)
			}
		}
		if result == "" {
			result = "2xx"
		}
		obs.SMTPAttempt(result)
	}
	if len(res.Hosts) == 0 && len(res.Rcpts) > 0 && res.Rcpts[0].Err != nil {
		obs.SMTPAttempt(attemptResultOf(res.Rcpts[0].Err))
	}
}

// observeFinal reports the applied outcomes that end a recipient, by the
// status each was stored with: an outcome that a cancel requested during
// the attempt turned into canceled counts as canceled, with no class.
// accepted is when the outcomes' message was accepted, zero if unknown.
func (d *Dispatcher) observeFinal(accepted time.Time, outs []db.Outcome, applied []db.Applied) {
	obs := d.cfg.Observer
	if obs == nil {
		return
	}
	done := appliedByID(applied)
	for _, o := range outs {
		a, ok := done[o.RecipientID]
		if !ok || !a.Final() {
			continue
		}
		class := o.Class
		if a.Status != o.Status {
			class = ""
		}
		obs.RecipientFinal(a.Status, class, accepted)
	}
}

// observeCanceled reports n recipients ended canceled without an outcome
// of theirs: leases given back after a cancel was requested.
func (d *Dispatcher) observeCanceled(n int, accepted time.Time) {
	obs := d.cfg.Observer
	if obs == nil {
		return
	}
	for range n {
		obs.RecipientFinal(db.StatusCanceled, "", accepted)
	}
}

// attemptResultOf sorts e into the result label of SMTPAttempt.
func attemptResultOf(e *SMTPError) string {
	switch {
	case e.Ambiguous:
		return "ambiguous"
	case e.Remote && e.Code >= 500:
		return "5xx"
	case e.Remote && e.Code >= 400:
		return "4xx"
	case e.Remote:
		return "2xx"
	case e.Err == nil:
		return "local"
	}
	var ne net.Error
	if errors.Is(e.Err, context.DeadlineExceeded) || errors.Is(e.Err, os.ErrDeadlineExceeded) ||
		(errors.As(e.Err, &ne) && ne.Timeout()) {
		return "timeout"
	}
	var oe *net.OpError
	if errors.As(e.Err, &oe) || errors.Is(e.Err, net.ErrClosed) {
		return "network"
	}
	return "local"
}

// tracer is the dispatcher's tracer; a no-op one unless configured.
func (d *Dispatcher) tracer() trace.Tracer {
	tp := d.cfg.TracerProvider
	if tp == nil {
		tp = noop.NewTracerProvider()
	}
	return tp.Tracer("github.com/posthaste/posthaste/delivery")
}

// startAttemptSpan starts the span of one SMTP attempt; endAttemptSpan
// ends it with what the attempt found. Addresses stay out of it: traces
// are kept by other systems, for longer.
func (d *Dispatcher) startAttemptSpan(ctx context.Context, j *job) (context.Context, trace.Span) {
	return d.tracer().Start(ctx, "smtp attempt", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.String("posthaste.message_id", j.msg.ID.String()),
			attribute.String("smtp.domain", j.domain), attribute.Int("smtp.recipients", len(j.rcpts))))
}

func endAttemptSpan(span trace.Span, res attemptResult) {
	hosts := make([]string, 0, len(res.Hosts))
	for _, h := range res.Hosts {
		hosts = append(hosts, h.MXHost)
	}
	result := "2xx"
	for _, r := range res.Rcpts {
		if r.Err != nil {
			result = attemptResultOf(r.Err)
			break
		}
	}
	span.SetAttributes(attribute.StringSlice("smtp.hosts", hosts), attribute.String("smtp.result", result))
	if n := len(res.Hosts); n > 0 {
		span.SetAttributes(attribute.String("smtp.host", res.Hosts[n-1].MXHost))
	}
	if result != "2xx" {
		span.SetStatus(codes.Error, result)
	}
	span.End()
}
