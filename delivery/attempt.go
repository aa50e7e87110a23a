package delivery

import (
	"context"
	"errors"
	"strings"
	"time"
)

// sender makes delivery attempts: it resolves the domain, then tries its
// addresses in order until one takes the transaction.
type sender struct {
	router     *router
	connector  *connector
	pool       *pool
	dnsTimeout time.Duration
	// policies are the configured TLS policies by domain.
	policies map[string]TLSPolicy
	// sts finds MTA-STS policies; nil when MTA-STS is off.
	sts *mtaSTS
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
	TLSCipher  string
	// TLSVerified reports that the certificate verified for MXHost.
	TLSVerified bool
	// TLSPolicy is the policy that applied, and TLSPolicyFailure why the
	// host did not meet it ("" when it did).
	TLSPolicy        TLSPolicy
	TLSPolicyFailure string
	Started          time.Time
	Elapsed          time.Duration
	// Err is why the host was left for the next: a refusal (the greeting,
	// EHLO, STARTTLS) or a failure to talk at all. It is nil for the host
	// that took the transaction, whose outcome Rcpts hold.
	Err *SMTPError
	// Replied reports whether Err is the host's reply rather than a failure
	// to get one (refused connection, timeout, reset).
	Replied bool
	// refused marks an address the destination guard refused.
	refused bool
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
	req := s.requirement(ctx, env.Domain)
	var l *lane
	if s.shaper != nil {
		var err error
		if l, err = s.shaper.admit(ctx, targets); err != nil {
			return heldOrFailed(res, len(env.To), err)
		}
	}

	refused := 0
	for _, t := range targets {
		if ctx.Err() != nil {
			break
		}
		h := hostTry{MXHost: t.Host, IP: t.IP.String(), Started: time.Now(), TLSPolicy: req.policy}
		if t.Refused != nil {
			// The destination guard refused the address: nothing is
			// connected to.
			h.Err, h.refused = t.Refused, true
			res.Hosts = append(res.Hosts, h)
			refused++
			continue
		}
		if reason := req.mxFailure(t.Host); reason != "" {
			h.TLSPolicyFailure = reason
			if req.policy == TLSMTASTSEnforce {
				// RFC 8461 section 4.1: a host the policy does not list
				// is not delivered to, or connected to.
				h.Err = req.refuse("4.7.5", reason).reply
				res.Hosts = append(res.Hosts, h)
				continue
			}
		}
		sc, rcpts, err := s.transact(ctx, l, t, env, req)
		if held, ok := errors.AsType[*heldError](err); ok {
			res.Rcpts, res.Held = nil, held
			return res
		}
		if err != nil {
			// RFC 5321 section 5.1: on a connection failure or a
			// greeting that is not 220, go on to the next address.
			h.Elapsed = time.Since(h.Started)
			h.Err, h.Replied = asGreetingError(err), isReply(err)
			if pe, ok := errors.AsType[*policyError](err); ok {
				h.TLSPolicyFailure = pe.reason
			}
			res.Hosts = append(res.Hosts, h)
			s.observe(l, h.Err)
			continue
		}
		h.TLS, h.TLSVersion, h.TLSCipher = sc.tls, sc.tlsVersion, sc.tlsCipher
		h.TLSVerified = sc.tls && sc.verifyErr == nil
		if h.TLSPolicyFailure == "" {
			// Only under TLSMTASTSTesting can a session that fails the
			// policy get here: the failure is recorded, and the message
			// delivered (RFC 8461 section 5).
			_, h.TLSPolicyFailure = req.check(sc)
		}
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
	for i := len(res.Hosts) - 1; i >= 0; i-- {
		// The last host's error decides, but a refused address only when
		// every address was refused: the failure of a host that was
		// tried may clear up, and defers the recipients instead.
		lastErr = res.Hosts[i].Err
		if refused == len(res.Hosts) || !res.Hosts[i].refused {
			break
		}
	}
	res.Rcpts = failAll(len(env.To), lastErr)
	return res
}

// requirement returns the TLS policy of domain: the configured one, else
// the domain's MTA-STS policy (not for routed domains, whose next hop the
// configuration names), else opportunistic TLS.
func (s *sender) requirement(ctx context.Context, domain string) tlsRequirement {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	req := tlsRequirement{policy: TLSOpportunistic, domain: domain}
	if p, ok := s.policies[domain]; ok {
		req.policy = p
	} else if _, routed := s.router.routes.lookup(domain); !routed && s.sts != nil {
		if p := s.sts.policy(ctx, domain); p != nil {
			switch p.mode {
			case stsEnforce:
				req.policy, req.sts = TLSMTASTSEnforce, p
			case stsTesting:
				req.policy, req.sts = TLSMTASTSTesting, p
			}
		}
	}
	req.verifyIfOffered = req.policy == TLSOpportunistic && s.connector.cfg.VerifyTLS
	return req
}

// transact makes env's transaction with t on a pooled connection or a new
// one. A pooled connection that turns out to have been dropped while idle
// (its pipelined RSET went unanswered) is closed and the next one tried;
// the error is the one of opening a new connection.
func (s *sender) transact(ctx context.Context, l *lane, t target, env envelope, req tlsRequirement) (*smtpConn, []rcptResult, error) {
	for {
		sc, err := s.connect(ctx, l, t, req)
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
func (s *sender) connect(ctx context.Context, l *lane, t target, req tlsRequirement) (*smtpConn, error) {
	since := time.Now()
	for {
		sc := s.pooled(ctx, t, req)
		if sc != nil {
			return sc, nil
		}
		if l == nil {
			return s.connector.dial(ctx, t, req)
		}
		release, err := s.shaper.connect(ctx, l, since)
		if errors.Is(err, errLaneChanged) {
			continue
		}
		if err != nil {
			return nil, err
		}
		slot := newSlotToken(release)
		sc, err = s.connector.dial(withSlot(ctx, slot), t, req)
		slot.drop()
		return sc, err
	}
}

// pooled returns an idle connection to t, reset, that meets req, or nil.
func (s *sender) pooled(ctx context.Context, t target, req tlsRequirement) *smtpConn {
	for {
		sc := s.pool.get(keyOf(t))
		if sc == nil {
			return nil
		}
		if !sc.suits(req) {
			// Opened under another domain's policy that asked less of
			// it; a new connection gets this one's.
			s.pool.discard(sc)
			continue
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
