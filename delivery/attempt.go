package delivery

import (
	"context"
	"errors"
	"time"
)

// sender makes delivery attempts: it resolves the domain, then tries its
// addresses in order until one takes the transaction.
type sender struct {
	router     *router
	connector  *connector
	pool       *pool
	dnsTimeout time.Duration
	// shaper applies the limits of destination providers; nil applies
	// none.
	shaper shaper
}

// envelope is one SMTP transaction to make: a message for recipients of one
// domain.
type envelope struct {
	Domain string
	From   string
	To     []string
	Data   []byte
}

// attemptResult is what an attempt did: one result per recipient, in order,
// and the addresses tried, in order (none when no connection was tried, as
// with a null MX or NXDOMAIN). When a host took the transaction it is the
// last one.
type attemptResult struct {
	Rcpts []rcptResult
	Hosts []hostTry
	// Started and Elapsed time the whole attempt, DNS included: they are
	// what is recorded of an attempt that tried no host.
	Started time.Time
	Elapsed time.Duration
	// Held is set when the provider's limits kept the transaction from
	// starting: Rcpts is then empty, and the attempt does not count.
	Held *heldError
}

// hostTry is one address tried in an attempt.
type hostTry struct {
	MXHost     string
	IP         string
	TLS        bool
	TLSVersion string
	Started    time.Time
	Elapsed    time.Duration
	// Err is why the host was left for the next: a refusal (the greeting,
	// EHLO, STARTTLS) or a failure to talk at all. It is nil for the host
	// that took the transaction, whose outcome Rcpts hold.
	Err *SMTPError
	// Replied reports whether Err is the host's reply rather than a failure
	// to get one (refused connection, timeout, reset).
	Replied bool
}

// attempt delivers env. ctx carries the deadline of the whole attempt
// (Config.MaxAttemptDuration); within it DNS gets at most dnsTimeout, and
// every step of a session its own timeout from SMTPConfig.
//
// Only a transaction decides a bounce: a host that fails before MAIL FROM,
// even with a 5yz reply to the greeting or to EHLO, is skipped, and when no
// host is left the recipients are deferred with the last host's error. The
// exception is a host whose EHLO rules the message out (larger than its
// SIZE, or 8-bit content that cannot be converted for a host without
// 8BITMIME): its recipients fail permanently before MAIL, as if it had
// refused the message after DATA.
func (s *sender) attempt(ctx context.Context, env envelope) (res attemptResult) {
	res = attemptResult{Started: time.Now()}
	defer func() { res.Elapsed = time.Since(res.Started) }()
	dctx, cancel := context.WithTimeout(ctx, s.dnsTimeout)
	targets, serr := s.router.targets(dctx, env.Domain)
	cancel()
	if serr != nil {
		res.Rcpts = failAll(len(env.To), serr)
		return res
	}
	targets = s.preferPooled(targets)
	var l *lane
	if s.shaper != nil {
		var err error
		if l, err = s.shaper.admit(ctx, targets); err != nil {
			return heldOrFailed(res, len(env.To), err)
		}
	}

	for _, t := range targets {
		if ctx.Err() != nil {
			break
		}
		h := hostTry{MXHost: t.Host, IP: t.IP.String(), Started: time.Now()}
		sc, rcpts, err := s.transact(ctx, l, t, env)
		if held, ok := errors.AsType[*heldError](err); ok {
			res.Rcpts, res.Held = nil, held
			return res
		}
		if err != nil {
			// RFC 5321 section 5.1: on a connection failure or a
			// greeting that is not 220, go on to the next address.
			h.Elapsed = time.Since(h.Started)
			h.Err, h.Replied = asGreetingError(err), isReply(err)
			res.Hosts = append(res.Hosts, h)
			s.observe(l, h.Err)
			continue
		}
		h.TLS, h.TLSVersion = sc.tls, sc.tlsVersion
		res.Rcpts = rcpts
		h.Elapsed = time.Since(h.Started)
		res.Hosts = append(res.Hosts, h)
		for _, r := range rcpts {
			s.observe(l, r.Err)
		}
		perConn := 0
		if l != nil {
			perConn = l.limit.PerConnection
			if l.overCap() {
				perConn = 1 // worn out: closed with QUIT
			}
		}
		s.pool.putLimited(sc, perConn)
		if l != nil {
			l.returned()
		}
		return res
	}
	lastErr := asSMTPError(context.Cause(ctx))
	if n := len(res.Hosts); n > 0 {
		lastErr = res.Hosts[n-1].Err
	}
	res.Rcpts = failAll(len(env.To), lastErr)
	return res
}

// transact makes env's transaction with t on a pooled connection or a new
// one. A pooled connection that turns out to have been dropped while idle
// (its pipelined RSET went unanswered) is closed and the next one tried;
// the error is the one of opening a new connection.
func (s *sender) transact(ctx context.Context, l *lane, t target, env envelope) (*smtpConn, []rcptResult, error) {
	for {
		sc, err := s.connect(ctx, l, t)
		if err != nil {
			return nil, nil, err
		}
		rcpts, err := sc.transaction(ctx, env.From, env.To, env.Data)
		if err == nil {
			return sc, rcpts, nil
		}
		// errStale: nothing was accepted on it; try the next one.
		sc.raw.Close()
	}
}

// connect returns a pooled connection to t, or a new one. A pooled
// connection is reset before it is used: with a server that pipelines, the
// RSET goes out with the transaction's commands (RFC 2920 section 3.1 lets
// it lead a group), otherwise it is sent here and a connection that does
// not answer it is closed.
//
// A new connection to a provider with a connection limit takes one of its
// slots first (see shaper.connect), held until the connection is closed.
func (s *sender) connect(ctx context.Context, l *lane, t target) (*smtpConn, error) {
	since := time.Now()
	for {
		sc := s.pooled(ctx, t)
		if sc != nil {
			return sc, nil
		}
		if l == nil {
			return s.connector.dial(ctx, t)
		}
		release, err := s.shaper.connect(ctx, l, since)
		if errors.Is(err, errLaneChanged) {
			continue
		}
		if err != nil {
			return nil, err
		}
		slot := newSlotToken(release)
		sc, err = s.connector.dial(withSlot(ctx, slot), t)
		slot.drop()
		return sc, err
	}
}

// pooled returns an idle connection to t, reset, or nil.
func (s *sender) pooled(ctx context.Context, t target) *smtpConn {
	for {
		sc := s.pool.get(keyOf(t))
		if sc == nil {
			return nil
		}
		if sc.pipelining() {
			sc.reused = true
			return sc
		}
		if err := sc.reset(ctx); err == nil {
			return sc
		}
		// The server dropped the idle connection; try the next one.
		sc.raw.Close()
	}
}

// observe passes a reply of l's provider to the shaper.
func (s *sender) observe(l *lane, e *SMTPError) {
	if l != nil && e != nil {
		s.shaper.observe(l, e)
	}
}

// heldOrFailed ends an attempt that could not start: held back by a
// provider's limits, or cut off while it waited.
func heldOrFailed(res attemptResult, n int, err error) attemptResult {
	if held, ok := errors.AsType[*heldError](err); ok {
		res.Held = held
		return res
	}
	res.Rcpts = failAll(n, asSMTPError(err))
	return res
}

// preferPooled moves an address that has an idle connection to the front,
// choosing only among the most preferred hosts, where the order was random
// anyway.
func (s *sender) preferPooled(targets []target) []target {
	for i, t := range targets {
		if t.Pref != targets[0].Pref {
			break
		}
		if !s.pool.has(keyOf(t)) {
			continue
		}
		if i == 0 {
			return targets
		}
		out := make([]target, 0, len(targets))
		out = append(out, t)
		out = append(out, targets[:i]...)
		return append(out, targets[i+1:]...)
	}
	return targets
}

func failAll(n int, err *SMTPError) []rcptResult {
	out := make([]rcptResult, n)
	for i := range out {
		out[i].Err = err
	}
	return out
}
