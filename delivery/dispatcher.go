package delivery

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/internal/netguard"
)

// dbTimeout bounds one database call made by the dispatcher.
const dbTimeout = 30 * time.Second

// Dispatcher delivers due recipients: it claims them from the database,
// sends them over SMTP under global and per-domain limits, and records the
// outcomes. Several dispatchers, in one process or many, can share a
// database; SKIP LOCKED claims keep them apart and lease fencing keeps a
// dispatcher that lost its lease from overwriting another's outcome.
//
// Delivery is at least once; see the package documentation for the window
// in which a crash causes a duplicate.
type Dispatcher struct {
	cfg    Config
	store  *db.DB
	log    *slog.Logger
	sender *sender
	pool   *pool
	retry  retryPolicy
	limits *limiter
	leases *leaseSet
	// rec commits the outcomes of concurrent transactions together.
	rec *recorder

	// unwritten holds outcomes that could not be written before their
	// lease may have run out (see recordOutcomes); flushMu serializes the
	// calls that write them.
	unwrittenMu sync.Mutex
	unwritten   []unwrittenOutcomes
	flushMu     sync.Mutex

	wake   chan struct{}
	freed  chan struct{}
	owners atomic.Uint64

	// pending counts claimed jobs not finished; waiting counts those still
	// waiting for their domain's slot.
	pending atomic.Int64
	waiting atomic.Int64
	// claims counts finished claim queries, for tests that must know the
	// dispatcher has looked at the queue.
	claims atomic.Int64

	// dbCtx is the context of the database calls that outlive claiming
	// (claims in flight, outcomes, released leases): they are not cut off
	// when Stop begins, only when its ShutdownTimeout is up.
	dbCtx    context.Context
	cancelDB context.CancelFunc

	mu             sync.Mutex
	started        bool
	stopping       chan struct{} // closed when Stop begins
	stopOnce       sync.Once
	cancelClaims   context.CancelFunc
	cancelSessions context.CancelFunc
	cancelBeat     context.CancelFunc
	loops          sync.WaitGroup // claim loop, listener, rescuer
	jobs           sync.WaitGroup
	beat           sync.WaitGroup // heartbeat: runs until the jobs are done
	recording      sync.WaitGroup // the recorder: runs until the jobs are done
}

// NewDispatcher checks cfg (after WithDefaults) and returns a dispatcher
// that is not running yet.
func NewDispatcher(cfg Config, store *db.DB) (*Dispatcher, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("delivery config: %w", err)
	}
	if store == nil {
		return nil, errors.New("delivery config: store must not be nil")
	}
	routes, err := parseRoutes(cfg.Routes)
	if err != nil {
		return nil, fmt.Errorf("delivery config: %w", err)
	}
	policies, err := parseTLSPolicies(cfg.TLSPolicies)
	if err != nil {
		return nil, fmt.Errorf("delivery config: %w", err)
	}
	res := newDNSResolver(cfg.DNSServer, systemResolvConf, min(cfg.DNSTimeout, 5*time.Second), newDNSCache(cfg.DNSCacheSize))
	if _, err := res.nameservers(); err != nil {
		// Not fatal: static routes and sandbox mode need no DNS server,
		// and the file may appear later.
		cfg.Logger.Warn("delivery: DNS lookups will fail until this is fixed", "err", err)
	}
	dialer := cfg.Dialer
	if dialer == nil {
		dialer = &net.Dialer{}
	}
	smtpCfg := cfg.SMTP
	p := newPool(smtpCfg.IdleTimeout, smtpCfg.MaxReuse)
	rt := newRouter(res, routes, smtpCfg.Port, smtpCfg.MaxHosts)
	rt.guard = netguard.New(cfg.AllowDestinations...)
	rt.families = familiesOf(cfg.IPVersion)
	var sts *mtaSTS
	if !cfg.MTASTS.Disabled {
		sts = newMTASTS(cfg.MTASTS, res, rt.families, rt.guard, dialer, smtpCfg.RootCAs, store, cfg.Logger)
	}
	shaper, err := newProviderShaper(cfg.Shaping, p.evictIdle)
	if err != nil {
		return nil, fmt.Errorf("delivery config: Shaping.%w", err)
	}
	dbCtx, cancelDB := context.WithCancel(context.Background())
	d := &Dispatcher{
		cfg:   cfg,
		store: store,
		log:   cfg.Logger,
		pool:  p,
		sender: &sender{
			router:     rt,
			connector:  &connector{dialer: slotDialer{inner: dialer}, cfg: &smtpCfg, obs: cfg.Observer, provider: shaper.providerName},
			pool:       p,
			dnsTimeout: cfg.DNSTimeout,
			policies:   policies,
			sts:        sts,
			shaper:     shaper,
		},
		retry:    newRetryPolicy(cfg.Retry),
		limits:   newLimiter(cfg.Concurrency, cfg.PerDomainConcurrency),
		leases:   newLeaseSet(cfg.LeaseDuration),
		wake:     make(chan struct{}, 1),
		freed:    make(chan struct{}, 1),
		stopping: make(chan struct{}),
		dbCtx:    dbCtx,
		cancelDB: cancelDB,
	}
	d.rec = newRecorder(dbCtx, store.RecordOutcomes)
	return d, nil
}

// Start begins claiming and delivering in the background and returns at
// once. When ctx ends the dispatcher stops claiming; Stop must still be
// called to wait for it. Start after Stop does nothing.
func (d *Dispatcher) Start(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.stopping:
		return
	default:
	}
	if d.started {
		return
	}
	d.started = true
	claimCtx, cancelClaims := context.WithCancel(ctx)
	// Transactions in flight outlive ctx: Stop gives them time to finish
	// rather than cutting them off when claiming stops.
	sessionCtx, cancelSessions := context.WithCancel(context.WithoutCancel(ctx))
	d.cancelClaims, d.cancelSessions = cancelClaims, cancelSessions
	// The heartbeat outlives ctx as the sessions do: leases of jobs in
	// flight must be renewed until they are done.
	beatCtx, cancelBeat := context.WithCancel(d.dbCtx)
	d.cancelBeat = cancelBeat
	d.beat.Go(func() { d.heartbeat(beatCtx) })
	d.recording.Go(d.rec.run)
	d.loops.Go(func() { d.claimLoop(claimCtx, sessionCtx) })
	d.loops.Go(func() { d.listen(claimCtx) })
	d.loops.Go(func() { d.rescue(claimCtx) })
}

// Stop stops claiming, lets transactions in flight finish, gives back the
// leases of claimed recipients that were not attempted, closes pooled
// connections, and returns when all of that is done, within ShutdownTimeout.
// Transactions still in flight when only the last part of ShutdownTimeout
// is left (see Config.ShutdownTimeout) are interrupted and their recipients
// deferred; outcomes kept while the database was unreachable are written if
// it is back; database calls and QUITs still running when it is up are cut
// off, and recipients whose outcome was not recorded go back to the queue
// when their lease runs out. Leases stay renewed until the transactions in
// flight are done. It may be called more than once.
func (d *Dispatcher) Stop() {
	d.stopOnce.Do(func() {
		deadline := time.Now().Add(d.cfg.ShutdownTimeout)
		cutOff := time.AfterFunc(d.cfg.ShutdownTimeout, d.cancelDB)
		defer func() {
			cutOff.Stop()
			d.cancelDB()
		}()
		d.mu.Lock()
		started := d.started
		if started {
			// Claims stop first, so that nothing is claimed only to be
			// given back.
			d.cancelClaims()
		}
		close(d.stopping)
		d.mu.Unlock()
		if !started {
			d.pool.close(deadline)
			return
		}

		done := make(chan struct{})
		go func() {
			// A claim in flight may still start jobs; they see stopping
			// and give their leases back.
			d.loops.Wait()
			d.jobs.Wait()
			close(done)
		}()
		timer := time.NewTimer(d.cfg.ShutdownTimeout - d.cfg.stopReserve())
		select {
		case <-done:
			timer.Stop()
		case <-timer.C:
			d.log.Warn("delivery: shutdown timeout, interrupting transactions in flight")
			d.cancelSessions()
			<-done
		}
		d.cancelSessions()
		// Outcomes kept for the database get a last chance while there is
		// time; the heartbeat renews their leases meanwhile.
		if err := d.flushPending(d.dbCtx); err != nil {
			d.dropPending(err)
		}
		// Every job has had its outcomes answered by now.
		d.rec.close()
		d.recording.Wait()
		d.cancelBeat()
		d.beat.Wait()
		d.pool.close(deadline)
	})
}

// Wake makes the dispatcher look for due recipients now. It never blocks;
// wake-ups that arrive while one is pending are merged.
func (d *Dispatcher) Wake() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// claimLoop claims whenever woken, on every PollInterval (which is what
// finds scheduled messages and retries coming due), and when a job finishes
// while the dispatcher was full.
func (d *Dispatcher) claimLoop(ctx, sessionCtx context.Context) {
	ticker := time.NewTicker(d.cfg.PollInterval)
	defer ticker.Stop()
	for {
		full := false
		for ctx.Err() == nil {
			if !d.hasRoom() {
				full = true
				break
			}
			var n int
			err := d.guard("claim", func() (err error) {
				n, err = d.claim(sessionCtx)
				return err
			})
			if err != nil {
				d.log.Error("delivery: claim", "err", err)
				break
			}
			if n < d.cfg.BatchSize {
				break
			}
		}
		var freed <-chan struct{}
		if full {
			freed = d.freed
		}
		select {
		case <-ctx.Done():
			return
		case <-d.wake:
		case <-ticker.C:
		case <-freed:
		}
	}
}

// hasRoom reports whether another batch may be claimed: while fewer jobs
// than Concurrency are running or waiting for a global slot. Jobs waiting
// for a busy domain do not hold up other domains, but the backlog as a
// whole is bounded so that a blocked domain cannot pull the queue into
// memory.
func (d *Dispatcher) hasRoom() bool {
	pending := d.pending.Load()
	active := pending - d.waiting.Load()
	return active < int64(d.cfg.Concurrency) && pending < int64(4*d.cfg.Concurrency)
}

// job is one SMTP transaction to make: recipients of one message and one
// domain, all claimed under one lease owner.
type job struct {
	owner  string
	domain string
	msg    db.MessageContent
	rcpts  []db.ClaimedRecipient
}

// accepted is when j's message was accepted, zero for a job without
// recipients.
func (j *job) accepted() time.Time {
	if len(j.rcpts) == 0 {
		return time.Time{}
	}
	return j.rcpts[0].MessageCreatedAt
}

func (j *job) ids() []uuid.UUID {
	ids := make([]uuid.UUID, len(j.rcpts))
	for i, r := range j.rcpts {
		ids[i] = r.ID
	}
	return ids
}

// claim claims one batch, loads each message once, and starts its jobs. It
// returns how many recipients it claimed.
func (d *Dispatcher) claim(sessionCtx context.Context) (int, error) {
	owner := fmt.Sprintf("%s-%d", d.cfg.InstanceID, d.owners.Add(1))
	// The queries are not cancelled when claiming stops: a claim whose
	// reply was lost would leave rows leased to nobody until the rescuer.
	qctx, cancel := context.WithTimeout(d.dbCtx, dbTimeout)
	defer cancel()
	// The lease is measured on the local clock from before the query, so
	// it ends no later than the database's, whatever the clocks say.
	leaseEnd := time.Now().Add(d.cfg.LeaseDuration)
	// The messages' bytes come back with the claim, in its transaction:
	// each message once, however many of its recipients were taken.
	began := time.Now()
	c, err := d.store.ClaimWithContents(qctx, db.ClaimParams{
		Owner: owner, Limit: d.cfg.BatchSize, LeaseFor: d.cfg.LeaseDuration,
	})
	if obs := d.cfg.Observer; obs != nil {
		obs.Claim(time.Since(began))
	}
	d.claims.Add(1)
	if err != nil {
		return 0, err
	}
	claimed := c.Recipients
	if len(claimed) == 0 {
		return 0, nil
	}

	jobs, missing := groupJobs(claimed, c.Messages, owner, d.cfg.MaxRecipientsPerTransaction)
	if len(missing) > 0 {
		d.failMissing(owner, missing)
	}
	// From here the heartbeat renews the lease, until the last job lets go.
	d.leases.add(owner, leaseEnd, len(jobs))
	for _, j := range jobs {
		d.pending.Add(1)
		d.waiting.Add(1)
		d.jobs.Add(1)
		go d.run(sessionCtx, j)
	}
	d.log.Debug("delivery: claimed", "owner", owner, "recipients", len(claimed), "jobs", len(jobs))
	return len(claimed), nil
}

// groupJobs puts the recipients of one message and domain into one job,
// at most maxRcpt per job, keeping the claim order.
func groupJobs(claimed []db.ClaimedRecipient, contents map[uuid.UUID]db.MessageContent,
	owner string, maxRcpt int) (jobs []*job, missing []db.ClaimedRecipient) {
	type key struct {
		msg    uuid.UUID
		domain string
	}
	// RCPT commands go in the order the caller gave the recipients, whatever
	// order the claim's plan returned the rows in.
	claimed = slices.Clone(claimed)
	slices.SortStableFunc(claimed, func(a, b db.ClaimedRecipient) int {
		if c := bytes.Compare(a.MessageID[:], b.MessageID[:]); c != 0 {
			return c
		}
		return cmp.Compare(a.Position, b.Position)
	})
	open := make(map[key]*job)
	for _, r := range claimed {
		msg, ok := contents[r.MessageID]
		if !ok {
			missing = append(missing, r)
			continue
		}
		k := key{r.MessageID, strings.ToLower(r.Domain)}
		j := open[k]
		if j == nil || len(j.rcpts) >= maxRcpt {
			j = &job{owner: owner, domain: k.domain, msg: msg}
			open[k] = j
			jobs = append(jobs, j)
		}
		j.rcpts = append(j.rcpts, r)
	}
	return jobs, missing
}

// run waits for a slot, makes the attempt and records the outcomes. A job
// whose lease is no longer known to be held while it waits, or that is
// still waiting when Stop begins, gives its lease back without an attempt.
// A panic is contained to the job: see attempt.
func (d *Dispatcher) run(sessionCtx context.Context, j *job) {
	lease := d.leases.watch(j.owner)
	keep := false // an outcome waiting for the database holds the lease
	defer func() {
		lease.stop()
		if !keep {
			d.leases.release(j.owner)
		}
		d.pending.Add(-1)
		d.jobs.Done()
		select {
		case d.freed <- struct{}{}:
		default:
		}
	}()
	defer func() {
		// The attempt recovers its own panics and defers the recipients;
		// one elsewhere leaves them leased without renewal, so they go back
		// to the queue within a lease.
		if r := recover(); r != nil {
			d.log.Error("delivery: panic while handling a job", "owner", j.owner, "message_id", j.msg.ID,
				"panic", r, "stack", string(debug.Stack()))
		}
	}()
	ok := d.limits.acquireDomain(j.domain, lease.ctx.Done(), d.stopping)
	d.waiting.Add(-1)
	if !ok {
		d.releaseLeases(j)
		return
	}
	defer d.limits.releaseDomain(j.domain)
	if !d.limits.acquireGlobal(lease.ctx.Done(), d.stopping) {
		d.releaseLeases(j)
		return
	}
	defer d.limits.releaseGlobal()
	select {
	case <-d.stopping:
		d.releaseLeases(j)
		return
	case <-lease.ctx.Done():
		d.releaseLeases(j)
		return
	default:
	}
	outs, held := d.attempt(sessionCtx, j, lease)
	if held != nil {
		d.hold(j, held)
		return
	}
	keep = d.recordOutcomes(j, lease, outs)
}

// hold gives back the leases of a job that a provider's limits kept from
// starting, due again after the wait the limits asked for. No attempt is
// counted: nothing was sent, and counting would bring the recipient closer
// to MaxAge's failure for a limit of our own.
func (d *Dispatcher) hold(j *job, held *heldError) {
	d.log.Debug("delivery: held back by provider limits", "owner", j.owner, "message_id", j.msg.ID,
		"domain", j.domain, "provider", held.Provider, "why", held.Why, "for", held.After)
	ctx, cancel := context.WithTimeout(d.dbCtx, dbTimeout)
	defer cancel()
	canceled, err := d.store.ReleaseLeasesUntil(ctx, j.owner, j.ids(), time.Now().Add(held.After))
	if err != nil {
		// The rescuer returns them once the lease runs out.
		d.log.Error("delivery: release held leases", "owner", j.owner, "err", err)
	}
	d.observeCanceled(canceled, j.accepted())
}

// attempt makes the SMTP attempt of j and returns its outcomes. The attempt
// ends at MaxAttemptDuration, when Stop interrupts it, or when the lease is
// no longer known to be held: past that point another dispatcher may be
// sending the same message, so the attempt stops short of the end of the
// data (see sender.attempt). A panic during the attempt is recovered and
// defers the recipients with a local reply.
//
// A transaction the provider's limits kept from starting returns no
// outcomes but the hold.
func (d *Dispatcher) attempt(sessionCtx context.Context, j *job, lease *leaseWatch) (outs []db.Outcome, held *heldError) {
	started := time.Now()
	d.leases.attempting(j, started.Add(d.cfg.MaxAttemptDuration+stuckGrace))
	defer d.leases.attempted(j)
	defer func() {
		if r := recover(); r != nil {
			d.log.Error("delivery: panic while delivering, recipients deferred", "owner", j.owner,
				"message_id", j.msg.ID, "domain", j.domain, "panic", r, "stack", string(debug.Stack()))
			outs, held = d.internalErrorOutcomes(j, started, time.Now()), nil
		}
	}()

	rcpts := make([]string, len(j.rcpts))
	for i, r := range j.rcpts {
		rcpts[i] = r.Address
	}
	capped, cancelCap := context.WithDeadlineCause(sessionCtx, started.Add(d.cfg.MaxAttemptDuration),
		fmt.Errorf("attempt cut off after MaxAttemptDuration (%s): %w", d.cfg.MaxAttemptDuration, context.DeadlineExceeded))
	defer cancelCap()
	actx, cancel := context.WithCancelCause(capped)
	defer cancel(nil)
	stop := context.AfterFunc(lease.ctx, func() { cancel(context.Cause(lease.ctx)) })
	defer stop()
	actx, span := d.startAttemptSpan(actx, j)
	res := d.sender.attempt(actx, envelope{Domain: j.domain, From: d.returnPath(j), To: rcpts, Data: j.msg.Raw})
	endAttemptSpan(span, res)
	d.observeAttempt(res)
	if res.Held != nil {
		return nil, res.Held
	}
	return d.outcomes(j, res, time.Now()), nil
}

// returnPath is the envelope sender (RFC 5321 section 4.1.1.2) of j's
// transaction. With a VERP codec configured it is a VERP address at the
// bounce domain naming the message, and the recipient when the transaction
// carries only one, so that whatever comes back to it says what it is
// about; it costs an HMAC and no database work. Without one it is the
// message's own envelope sender, and bounces go to that mailbox. A null
// reverse-path stays null: mail sent with one must not cause bounces
// (RFC 5321 section 4.5.5).
func (d *Dispatcher) returnPath(j *job) string {
	if d.cfg.VERP == nil || j.msg.EnvelopeFrom == "" {
		return j.msg.EnvelopeFrom
	}
	var rcpt bounce.RecipientRef
	if len(j.rcpts) == 1 && j.rcpts[0].Position >= 0 {
		rcpt = bounce.RecipientAt(uint32(j.rcpts[0].Position))
	}
	return d.cfg.VERP.Address(j.msg.ID, rcpt)
}

// outcomes turns an attempt's results into the rows to record: each
// recipient's outcome, with one attempt row per host tried, or a single row
// without a host when none was (DNS failures, null MX).
func (d *Dispatcher) outcomes(j *job, res attemptResult, now time.Time) []db.Outcome {
	out := make([]db.Outcome, len(j.rcpts))
	for i, r := range j.rcpts {
		o := db.Outcome{RecipientID: r.ID, LeaseOwner: j.owner}
		rr := res.Rcpts[i]
		source := db.AttemptSourceRemote
		switch {
		case rr.Err == nil:
			o.Status = db.StatusDelivered
			o.Code, o.EnhancedCode, o.Text = rr.Reply.Code, rr.Reply.EnhancedCode, rr.Reply.Text
		case !rr.Err.Temporary():
			d.classify(&o, rr.Err)
			o.Status = db.StatusBounced
			o.Code, o.EnhancedCode, o.Text = errorReply(rr.Err)
			source = errorSource(rr.Err)
		default:
			o.Code, o.EnhancedCode, o.Text = errorReply(rr.Err)
			source = errorSource(rr.Err)
			o.Ambiguous = rr.Err.Ambiguous
			next, expired := d.retry.next(now, r.Attempts+1, r.DueSince)
			switch {
			case expired:
				o.Status = db.StatusFailed
			case o.Ambiguous && d.cfg.MaxAmbiguousRetries > 0 && r.AmbiguousAttempts+1 > d.cfg.MaxAmbiguousRetries:
				// The recipient's last reply stays the attempt's (the
				// ambiguous row below); the recipient's says why it
				// ends here.
				o.Status = db.StatusFailed
				o.Code, o.EnhancedCode = codeTransactionNo, "5.4.2" // RFC 3463 X.4.2: bad connection
				o.Text = fmt.Sprintf("outcome stayed unknown: %d attempts lost the connection after end of data, "+
					"more than the %d retries allowed (MaxAmbiguousRetries); the receiver may have the message",
					r.AmbiguousAttempts+1, d.cfg.MaxAmbiguousRetries)
			default:
				o.Status, o.NextAttemptAt = db.StatusDeferred, next
			}
		}
		if len(res.Hosts) == 0 {
			if rr.Err != nil {
				// No host was tried (NXDOMAIN, null MX, a DNS failure or
				// timeout, an attempt cut off before it could connect):
				// one row without a host keeps the attempt visible.
				code, enhanced, text := errorReply(rr.Err)
				o.Attempts = []db.NewAttempt{{StartedAt: res.Started, Duration: res.Elapsed,
					Code: code, EnhancedCode: enhanced, Text: text, Source: errorSource(rr.Err)}}
			}
		} else {
			o.Attempts = make([]db.NewAttempt, len(res.Hosts))
			for k, h := range res.Hosts {
				a := db.NewAttempt{StartedAt: h.Started, Duration: h.Elapsed,
					MXHost: h.MXHost, IP: h.IP, TLS: h.TLS, TLSVersion: h.TLSVersion,
					TLSCipher: h.TLSCipher, TLSVerified: h.TLSVerified,
					TLSPolicy: string(h.TLSPolicy), TLSPolicyFailure: h.TLSPolicyFailure}
				if h.Err == nil {
					// The host that took the transaction: its reply is
					// the recipient's, unless the recipient failed for
					// the number of ambiguous attempts.
					if rr.Err != nil {
						a.Code, a.EnhancedCode, a.Text = errorReply(rr.Err)
					} else {
						a.Code, a.EnhancedCode, a.Text = o.Code, o.EnhancedCode, o.Text
					}
					a.Source, a.Ambiguous = source, o.Ambiguous
				} else {
					a.Code, a.EnhancedCode, a.Text = hostReply(h)
					a.Source = errorSource(h.Err)
				}
				o.Attempts[k] = a
			}
		}
		out[i] = o
	}
	return out
}

// classify sets o's bounce class from e, a 5yz refusal, and whether the
// refusal suppresses the address. It runs only for refusals, so deliveries
// never pay for the rule table. A 5yz reply is a bounce whatever its class
// (RFC 5321 section 4.2.1: the same command will not be accepted), but a
// 5yz that is about a rate ("too many messages", Gmail's 5.4.5 quota) says
// nothing about the address: it is classified as not permanent, and never
// suppresses it, so the next message to it goes out as usual.
func (d *Dispatcher) classify(o *db.Outcome, e *SMTPError) {
	c := ClassifySMTPError(e)
	o.Class, o.Permanent = string(c.Class), c.Permanent
	if c.Permanent && BounceSuppression(c.Class, c.Permanent) != SuppressionNone {
		o.Suppress = db.SuppressionHardBounce
	}
}

// errorSource says whose words the reply stored of e is.
func errorSource(e *SMTPError) string {
	if e.Remote {
		return db.AttemptSourceRemote
	}
	return db.AttemptSourceLocal
}

// errorReply is what is stored of an error: the reply, with the cause of a
// failure that was not a reply appended to the text.
func errorReply(e *SMTPError) (int, string, string) {
	text := e.Message
	if e.Err != nil {
		text += ": " + e.Err.Error()
	}
	return e.Code, e.EnhancedCode, text
}

// hostReply is what is stored of a host left for the next: its reply, or,
// when it gave none, code 0 and what went wrong. The code made up for the
// recipient (4.4.1 for a refused connection, say) is not the host's.
func hostReply(h hostTry) (int, string, string) {
	code, enhanced, text := errorReply(h.Err)
	if !h.Replied {
		return 0, "", text
	}
	return code, enhanced, text
}

// recordOutcomes writes the outcomes right after the reply, retrying at
// least every maxRecordWait while the lease is known to be held (the
// heartbeat keeps renewing it as soon as the database answers). An outcome
// that still could not be written is kept in memory and written when the
// database is back (see flushPending), and recordOutcomes reports that it
// kept the job's lease for it. The write is fenced on the lease owner and
// the sending status, not on the lease's expiry: it applies as long as no
// rescuer took the recipients back, and never overwrites another
// dispatcher's outcome.
func (d *Dispatcher) recordOutcomes(j *job, lease *leaseWatch, outs []db.Outcome) (kept bool) {
	if err := assignAttemptIDs(outs); err != nil {
		d.logUnwritten(j.owner, outs, err)
		return false
	}
	d.leases.recordingStarted(j.owner)
	defer d.leases.recordingEnded(j.owner)
	wait := 50 * time.Millisecond
	for {
		applied, err := d.tryRecord(lease, outs)
		if err == nil {
			d.logOutcomes(j.owner, j.msg.ID, outs, applied)
			d.observeFinal(j.accepted(), outs, applied)
			return false
		}
		switch {
		case d.dbCtx.Err() != nil:
			d.logUnwritten(j.owner, outs, err)
			return false
		case lease.lost():
			// Another dispatcher has the recipients: the outcome would be
			// fenced off.
			d.log.Warn("delivery: outcomes dropped, lease lost", "owner", j.owner, "message_id", j.msg.ID,
				"recipients", len(outs), "err", err)
			return false
		case lease.ctx.Err() != nil:
			d.keepUnwritten(j, outs, err)
			return true
		}
		timer := time.NewTimer(wait)
		select {
		case <-lease.ctx.Done():
		case <-d.dbCtx.Done():
		case <-timer.C:
		}
		timer.Stop()
		wait = min(2*wait, maxRecordWait)
	}
}

// tryRecord makes one try at writing outs, in the recorder's next group
// commit. A try that outlasts the lease is given up (the commit it is part
// of is cancelled), so the outcome can be kept for later; one that starts
// past it (an attempt cut off by the lease) still gets a short try of its
// own.
func (d *Dispatcher) tryRecord(lease *leaseWatch, outs []db.Outcome) ([]db.Applied, error) {
	if lease.ctx.Err() != nil {
		ctx, cancel := context.WithTimeout(d.dbCtx, maxRecordWait)
		defer cancel()
		return d.rec.record(ctx, outs)
	}
	return d.rec.record(lease.ctx, outs)
}

// assignAttemptIDs gives every attempt row of outs its id before the first
// write, so that a write repeated after an unknown commit result finds the
// rows of the first and counts it as applied rather than fenced off.
func assignAttemptIDs(outs []db.Outcome) error {
	for i := range outs {
		for k := range outs[i].Attempts {
			if outs[i].Attempts[k].ID != uuid.Nil {
				continue
			}
			id, err := db.NewAttemptID()
			if err != nil {
				return err
			}
			outs[i].Attempts[k].ID = id
		}
	}
	return nil
}

// releaseLeases gives back a job's leases without an attempt.
func (d *Dispatcher) releaseLeases(j *job) {
	ctx, cancel := context.WithTimeout(d.dbCtx, dbTimeout)
	defer cancel()
	canceled, err := d.store.ReleaseLeases(ctx, j.owner, j.ids())
	if err != nil {
		// The rescuer returns them once the lease runs out.
		d.log.Error("delivery: release leases", "owner", j.owner, "err", err)
	}
	d.observeCanceled(canceled, j.accepted())
}

// failMissing fails recipients whose message could not be loaded, which
// only happens if the message row is gone.
func (d *Dispatcher) failMissing(owner string, rcpts []db.ClaimedRecipient) {
	outs := make([]db.Outcome, len(rcpts))
	for i, r := range rcpts {
		outs[i] = db.Outcome{RecipientID: r.ID, LeaseOwner: owner, Status: db.StatusFailed,
			Code: codePermFailure, EnhancedCode: "5.3.0", Text: "message content missing"}
	}
	ctx, cancel := context.WithTimeout(d.dbCtx, dbTimeout)
	defer cancel()
	applied, err := d.store.RecordOutcomes(ctx, outs)
	if err != nil {
		d.log.Error("delivery: record outcomes", "owner", owner, "err", err)
	}
	d.observeFinal(time.Time{}, outs, applied)
}

// listen wakes the claim loop on every outbox notification, reconnecting
// with a backoff when the listening connection fails.
func (d *Dispatcher) listen(ctx context.Context) {
	const minWait, maxWait = 100 * time.Millisecond, 30 * time.Second
	wait := minWait
	for {
		began := time.Now()
		err := d.guard("outbox listener", func() error { return d.store.ListenOutbox(ctx, d.Wake) })
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > time.Minute {
			wait = minWait
		}
		d.log.Warn("delivery: outbox listener failed, reconnecting", "err", err, "in", wait)
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
		wait = min(wait*2, maxWait)
		// Notifications sent while disconnected are lost; look now.
		d.Wake()
	}
}

// rescue returns expired leases to the queue at start and every
// RescueInterval. Many dispatchers may run it; the statement skips rows
// another one is handling. Outcomes this dispatcher kept while the database
// was unreachable are written first: their leases may have run out, and
// rescuing them would send those recipients again.
func (d *Dispatcher) rescue(ctx context.Context) {
	ticker := time.NewTicker(d.cfg.RescueInterval)
	defer ticker.Stop()
	for {
		var res db.Rescued
		err := d.guard("rescue", func() error {
			if err := d.flushPending(ctx); err != nil {
				return fmt.Errorf("before rescuing: %w", err)
			}
			qctx, cancel := context.WithTimeout(ctx, dbTimeout)
			defer cancel()
			var err error
			res, err = d.store.RescueExpiredLeases(qctx, time.Time{})
			return err
		})
		// The rescue does not say when the messages were accepted; the
		// observer needs that only for deliveries.
		d.observeCanceled(res.Canceled, time.Time{})
		switch {
		case err != nil && ctx.Err() == nil:
			d.log.Error("delivery: rescue expired leases", "err", err)
		case res.Recipients > 0:
			d.log.Warn("delivery: rescued expired leases", "recipients", res.Recipients, "canceled", res.Canceled)
			d.Wake()
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// limiter bounds transactions in flight, overall and per domain.
type limiter struct {
	global    chan struct{}
	perDomain int

	mu      sync.Mutex
	domains map[string]*domainSlots
}

type domainSlots struct {
	ch   chan struct{}
	refs int // holders and waiters
}

func newLimiter(global, perDomain int) *limiter {
	return &limiter{global: make(chan struct{}, global), perDomain: perDomain, domains: make(map[string]*domainSlots)}
}

// acquire takes a slot of ch unless lost or stop closes first.
func acquire(ch chan struct{}, lost, stop <-chan struct{}) bool {
	select {
	case <-lost:
		return false
	default:
	}
	select {
	case ch <- struct{}{}:
		return true
	case <-lost:
		return false
	case <-stop:
		return false
	}
}

func (l *limiter) acquireGlobal(lost, stop <-chan struct{}) bool {
	return acquire(l.global, lost, stop)
}

func (l *limiter) releaseGlobal() { <-l.global }

func (l *limiter) acquireDomain(domain string, lost, stop <-chan struct{}) bool {
	l.mu.Lock()
	s := l.domains[domain]
	if s == nil {
		s = &domainSlots{ch: make(chan struct{}, l.perDomain)}
		l.domains[domain] = s
	}
	s.refs++
	l.mu.Unlock()
	if acquire(s.ch, lost, stop) {
		return true
	}
	l.unref(domain, s)
	return false
}

func (l *limiter) releaseDomain(domain string) {
	l.mu.Lock()
	s := l.domains[domain]
	l.mu.Unlock()
	<-s.ch
	l.unref(domain, s)
}

func (l *limiter) unref(domain string, s *domainSlots) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s.refs--
	if s.refs == 0 {
		delete(l.domains, domain)
	}
}
