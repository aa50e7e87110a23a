package delivery

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Leases are short and renewed. A claim leases its recipients for
// LeaseDuration; while the dispatcher holds them, its heartbeat extends all
// of its leases in one statement every third of that. A process that dies
// or freezes stops renewing, and its recipients go back to the queue within
// about one lease, whatever MaxAttemptDuration is.
//
// Each job watches its lease. The lease is known to be held until the
// local time at which the last renewal that found it began, plus
// LeaseDuration: the database measured the new expiry from a later instant,
// so no other dispatcher can have rescued the recipients before then. A job
// stops (before the end of DATA, the point of no return) once that time is
// less than leaseMargin away, and at once when a renewal finds that none of
// the owner's rows are left.

// errLeaseExpiring is the cause given to an attempt stopped because its
// lease was not renewed in time (the database could not be reached): past
// that point another dispatcher may be delivering the same recipients.
var errLeaseExpiring = fmt.Errorf("lease not renewed in time, another dispatcher may take the recipients: %w", context.Canceled)

// errLeaseLost is the cause given to an attempt whose recipients were taken
// back: a renewal found none of its owner's rows.
var errLeaseLost = fmt.Errorf("lease lost, the recipients were taken back: %w", context.Canceled)

// stuckGrace is how long an attempt may run past MaxAttemptDuration before
// it counts as stuck and its lease is no longer renewed. An attempt ends
// soon after its deadline (the connection is closed under it), so one still
// running is blocked somewhere that ignores its context; its recipients are
// better off with another dispatcher.
const stuckGrace = 5 * time.Second

// leaseSet tracks the lease owners this dispatcher holds and how long each
// is known to be held.
type leaseSet struct {
	length time.Duration // Config.LeaseDuration
	margin time.Duration // jobs stop this long before the lease may end

	mu     sync.Mutex
	owners map[string]*heldLease
}

// heldLease is one claim's lease, shared by the jobs made from the claim.
type heldLease struct {
	until time.Time // by the local clock
	refs  int       // jobs, and outcomes waiting to be written, that hold it
	// attempts maps the jobs of this owner that are attempting to when they
	// count as stuck; an owner whose holders are all stuck is not renewed.
	attempts map[*job]time.Time
	lost     bool // a renewal found none of its rows
	watches  map[*leaseWatch]struct{}
}

func newLeaseSet(length time.Duration) *leaseSet {
	return &leaseSet{length: length, margin: length / 6, owners: make(map[string]*heldLease)}
}

// add records a claim's lease, held by n jobs, that ends no earlier than
// until.
func (l *leaseSet) add(owner string, until time.Time, n int) {
	if n <= 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.owners[owner] = &heldLease{until: until, refs: n, attempts: make(map[*job]time.Time),
		watches: make(map[*leaseWatch]struct{})}
}

// release drops one holder of owner's lease; the last one stops its
// renewal.
func (l *leaseSet) release(owner string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.owners[owner]
	if h == nil {
		return
	}
	h.refs--
	if h.refs <= 0 {
		delete(l.owners, owner)
	}
}

// attempting marks j as attempting until it counts as stuck at stuckAt;
// attempted clears the mark.
func (l *leaseSet) attempting(j *job, stuckAt time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h := l.owners[j.owner]; h != nil {
		h.attempts[j] = stuckAt
	}
}

func (l *leaseSet) attempted(j *job) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h := l.owners[j.owner]; h != nil {
		delete(h.attempts, j)
	}
}

// toRenew lists the owners worth renewing at now: those with a holder
// that is not a stuck attempt.
func (l *leaseSet) toRenew(now time.Time) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	owners := make([]string, 0, len(l.owners))
	for owner, h := range l.owners {
		if h.lost {
			continue
		}
		live := h.refs > len(h.attempts)
		for _, stuckAt := range h.attempts {
			live = live || now.Before(stuckAt)
		}
		if live {
			owners = append(owners, owner)
		}
	}
	return owners
}

// renewed applies a renewal of owners that began at began: the owners in
// held keep their leases until began plus the lease length; the others hold
// nothing any more, and their jobs are stopped.
func (l *leaseSet) renewed(owners []string, held map[string]int, began time.Time) {
	until := began.Add(l.length)
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, owner := range owners {
		h := l.owners[owner]
		if h == nil {
			continue
		}
		if _, ok := held[owner]; !ok {
			h.lost = true
			for w := range h.watches {
				w.cancel(errLeaseLost)
			}
			continue
		}
		if until.After(h.until) {
			h.until = until
		}
	}
}

// count reports how many owners are held, for tests.
func (l *leaseSet) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.owners)
}

// leaseWatch follows one job's lease: its ctx ends, with errLeaseExpiring
// or errLeaseLost as the cause, once the lease is no longer known to be
// held with leaseMargin to spare.
type leaseWatch struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	set    *leaseSet
	owner  string

	// Guarded by set.mu.
	timer   *time.Timer
	stopped bool
}

// watch starts watching owner's lease. The caller must call stop.
func (l *leaseSet) watch(owner string) *leaseWatch {
	ctx, cancel := context.WithCancelCause(context.Background())
	w := &leaseWatch{ctx: ctx, cancel: cancel, set: l, owner: owner}
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.owners[owner]
	if h == nil || h.lost {
		w.cancel(errLeaseLost)
		return w
	}
	h.watches[w] = struct{}{}
	w.armLocked(h)
	return w
}

// armLocked cancels w if its lease is close to its end, else sets a timer
// for when it will be, unless a renewal comes first. Renewals do not touch
// the timer: when it fires it looks at the lease again.
func (w *leaseWatch) armLocked(h *heldLease) {
	left := time.Until(h.until.Add(-w.set.margin))
	if left <= 0 {
		w.cancel(errLeaseExpiring)
		return
	}
	w.timer = time.AfterFunc(left, w.check)
}

func (w *leaseWatch) check() {
	w.set.mu.Lock()
	defer w.set.mu.Unlock()
	if w.stopped {
		return
	}
	h := w.set.owners[w.owner]
	if h == nil {
		w.cancel(errLeaseLost)
		return
	}
	w.armLocked(h)
}

// stop ends the watch.
func (w *leaseWatch) stop() {
	w.set.mu.Lock()
	defer w.set.mu.Unlock()
	w.stopped = true
	if w.timer != nil {
		w.timer.Stop()
	}
	if h := w.set.owners[w.owner]; h != nil {
		delete(h.watches, w)
	}
	w.cancel(context.Canceled)
}

// lost reports whether the lease is known to be gone, as opposed to not
// renewed in time.
func (w *leaseWatch) lost() bool { return errors.Is(context.Cause(w.ctx), errLeaseLost) }

// heartbeat renews the leases this dispatcher holds every third of
// LeaseDuration, and about every second while renewals fail, so that leases
// are renewed, and outcomes waiting for the database written, soon after it
// returns. It ends when ctx does.
func (d *Dispatcher) heartbeat(ctx context.Context) {
	interval := d.cfg.renewInterval()
	retry := min(interval, maxRecordWait)
	timer := time.NewTimer(interval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		next := interval
		err := d.guard("heartbeat", func() error {
			if err := d.renewLeases(ctx); err != nil {
				return err
			}
			return d.flushPending(ctx)
		})
		if err != nil && ctx.Err() == nil {
			d.log.Warn("delivery: heartbeat", "err", err, "retry_in", retry)
			next = retry
		}
		timer.Reset(next)
	}
}

// renewLeases extends every lease worth renewing in one statement.
func (d *Dispatcher) renewLeases(ctx context.Context) error {
	began := time.Now()
	owners := d.leases.toRenew(began)
	if len(owners) == 0 {
		return nil
	}
	// A renewal that takes longer than the interval is as good as failed:
	// give up on it and try again rather than wait for the lease to run
	// out on one slow call.
	qctx, cancel := context.WithTimeout(ctx, d.cfg.renewInterval())
	defer cancel()
	held, err := d.store.RenewLeases(qctx, owners, d.cfg.LeaseDuration, time.Time{})
	if err != nil {
		return err
	}
	d.leases.renewed(owners, held, began)
	return nil
}
