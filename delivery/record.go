package delivery

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// maxRecordWait caps the wait between two tries at writing an outcome (and
// between heartbeats while they fail): the database is written to within
// about a second of its return.
const maxRecordWait = time.Second

// Local replies for what went wrong on this side.
const (
	codeInternal     = 451
	enhancedInternal = "4.3.0"
	textInternal     = "internal error while delivering; will retry"
)

// unwrittenOutcomes are a job's outcomes that could not be written before
// its lease may have run out. They hold the job's lease, so the heartbeat
// keeps renewing it whenever the database answers.
type unwrittenOutcomes struct {
	owner     string
	messageID uuid.UUID
	// accepted is when the message was accepted, for the observer.
	accepted time.Time
	outs     []db.Outcome
	since    time.Time
}

// keepUnwritten keeps j's outcomes for flushPending.
func (d *Dispatcher) keepUnwritten(j *job, outs []db.Outcome, err error) {
	d.log.Warn("delivery: database unreachable, outcomes kept until it returns", "owner", j.owner,
		"message_id", j.msg.ID, "recipients", len(outs), "err", err)
	d.unwrittenMu.Lock()
	defer d.unwrittenMu.Unlock()
	d.unwritten = append(d.unwritten, unwrittenOutcomes{owner: j.owner, messageID: j.msg.ID, accepted: j.accepted(),
		outs: outs, since: time.Now()})
}

// pendingOutcomes counts the outcomes kept for the database, for tests.
func (d *Dispatcher) pendingOutcomes() int {
	d.unwrittenMu.Lock()
	defer d.unwrittenMu.Unlock()
	n := 0
	for _, u := range d.unwritten {
		n += len(u.outs)
	}
	return n
}

// flushPending writes the outcomes kept while the database was unreachable,
// in one transaction, and lets go of their leases. The heartbeat calls it
// after each renewal, the rescuer before each rescue (so that this process
// never takes back, and sends again, a recipient whose outcome it holds),
// and Stop once more at the end. On error the outcomes stay kept.
func (d *Dispatcher) flushPending(ctx context.Context) error {
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	d.unwrittenMu.Lock()
	batch := d.unwritten
	d.unwritten = nil
	d.unwrittenMu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	var outs []db.Outcome
	for _, u := range batch {
		outs = append(outs, u.outs...)
	}
	qctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	applied, err := d.store.RecordOutcomes(qctx, outs)
	if err != nil {
		d.unwrittenMu.Lock()
		d.unwritten = append(batch, d.unwritten...)
		d.unwrittenMu.Unlock()
		return fmt.Errorf("write %d kept outcomes: %w", len(outs), err)
	}
	for _, u := range batch {
		d.log.Info("delivery: kept outcomes written", "owner", u.owner, "message_id", u.messageID,
			"recipients", len(u.outs), "kept_for", time.Since(u.since).Round(time.Millisecond))
		d.logOutcomes(u.owner, u.messageID, u.outs, applied)
		d.observeFinal(u.accepted, u.outs, applied)
		d.leases.release(u.owner)
	}
	return nil
}

// dropPending gives up the kept outcomes when Stop could not write them.
func (d *Dispatcher) dropPending(err error) {
	d.unwrittenMu.Lock()
	batch := d.unwritten
	d.unwritten = nil
	d.unwrittenMu.Unlock()
	for _, u := range batch {
		d.logUnwritten(u.owner, u.outs, err)
		d.leases.release(u.owner)
	}
}

// logUnwritten reports outcomes given up for good: each of these recipients
// is attempted again once its lease runs out, and a delivered one is sent
// twice.
func (d *Dispatcher) logUnwritten(owner string, outs []db.Outcome, err error) {
	for _, o := range outs {
		d.log.Error("delivery: outcome not recorded, the recipient will be attempted again", "owner", owner,
			"recipient_id", o.RecipientID, "status", o.Status, "code", o.Code, "err", err)
	}
}

// logOutcomes logs each applied outcome at info level, final or deferred, so
// that the default log level shows what became of every attempt, under the
// status it was stored with (canceled for an outcome a cancel overrode);
// outcomes fenced off because the lease was lost are reported as such.
func (d *Dispatcher) logOutcomes(owner string, messageID uuid.UUID, outs []db.Outcome, applied []db.Applied) {
	done := appliedByID(applied)
	skipped := 0
	for _, o := range outs {
		a, ok := done[o.RecipientID]
		if !ok {
			skipped++
			continue
		}
		mxHost := ""
		if n := len(o.Attempts); n > 0 {
			mxHost = o.Attempts[n-1].MXHost
		}
		status := a.Status
		if status == "" {
			// Applied earlier, to a status no longer known: the outcome's
			// own is the best there is.
			status = o.Status
		}
		attrs := []any{"message_id", messageID, "recipient_id", o.RecipientID, "status", status,
			"mx_host", mxHost, "code", o.Code, "enhanced_code", o.EnhancedCode, "text", o.Text}
		if status == db.StatusDeferred {
			attrs = append(attrs, "next_attempt_at", o.NextAttemptAt)
		}
		if a.Earlier {
			attrs = append(attrs, "applied_earlier", true)
		}
		d.log.Info("delivery: "+status, attrs...)
	}
	if skipped > 0 {
		// The lease was lost (rescued and claimed elsewhere): that
		// dispatcher will attempt these recipients again.
		d.log.Warn("delivery: outcomes skipped, lease lost", "owner", owner, "message_id", messageID,
			"skipped", skipped)
	}
}

// internalErrorOutcomes defers every recipient of j after a failure of ours
// (a panic), with a local reply that says so and one attempt row carrying
// it.
func (d *Dispatcher) internalErrorOutcomes(j *job, started, now time.Time) []db.Outcome {
	out := make([]db.Outcome, len(j.rcpts))
	for i, r := range j.rcpts {
		o := db.Outcome{RecipientID: r.ID, LeaseOwner: j.owner,
			Code: codeInternal, EnhancedCode: enhancedInternal, Text: textInternal}
		next, expired := d.retry.next(now, r.Attempts+1, r.DueSince)
		if expired {
			o.Status = db.StatusFailed
		} else {
			o.Status, o.NextAttemptAt = db.StatusDeferred, next
		}
		o.Attempts = []db.NewAttempt{{StartedAt: started, Duration: now.Sub(started), Source: db.AttemptSourceLocal,
			Code: o.Code, EnhancedCode: o.EnhancedCode, Text: o.Text}}
		out[i] = o
	}
	return out
}

// guard runs one round of a background loop (claim, heartbeat, rescue,
// listen), turning a panic into an error logged with its stack, so that the
// loop goes on.
func (d *Dispatcher) guard(what string, f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			d.log.Error("delivery: panic in "+what, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%s: panic: %v", what, r)
		}
	}()
	return f()
}
