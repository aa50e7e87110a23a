package delivery

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// maxOutcomesPerCommit bounds one group commit. Outcomes beyond it wait for
// the next one, which starts as soon as this one ends.
const maxOutcomesPerCommit = 1000

// recordQueue is how many requests may wait for the writer without
// blocking their jobs' sends.
const recordQueue = 256

// errRecorderStopped is returned to a write asked for after the recorder
// stopped.
var errRecorderStopped = errors.New("outcome recorder stopped")

// recorder commits the outcomes of concurrent SMTP transactions together
// (group commit). A commit costs a disk flush whatever it holds, and with
// one commit per transaction the flushes, not SMTP, bound the delivery
// rate. One goroutine writes: an outcome that arrives while nothing is
// being written is written at once, with no window to wait for company;
// outcomes that arrive while a commit is in flight are gathered and go out
// together in the next one. Under load the batches grow by themselves, as
// fast as outcomes arrive during one commit, and an outcome waits at most
// for the commit in flight before its own starts.
//
// Each outcome keeps its own lease fence (db.RecordOutcomes applies a row
// only while it is sending under the owner it was claimed with), so
// gathering changes which transaction writes an outcome, never whether it
// applies.
type recorder struct {
	write func(context.Context, []db.Outcome) ([]db.Applied, error)
	// dbCtx ends when the dispatcher's database calls must stop.
	dbCtx context.Context

	reqs chan *recordRequest
	stop chan struct{} // closed by close
	done chan struct{} // closed when run returns
	// txs counts the transactions written, for benchmarks.
	txs atomic.Int64
}

// recordRequest is one job's outcomes waiting to be written.
type recordRequest struct {
	// ctx ends the wait for this request. While the request is being
	// written it cancels the whole commit: the job then keeps its outcomes
	// for later (see Dispatcher.recordOutcomes), which it may only do once
	// they can no longer be committed behind its back.
	ctx  context.Context
	outs []db.Outcome
	res  chan recordResult // buffered: run never blocks answering
}

type recordResult struct {
	applied []db.Applied
	err     error
}

func newRecorder(dbCtx context.Context, write func(context.Context, []db.Outcome) ([]db.Applied, error)) *recorder {
	return &recorder{write: write, dbCtx: dbCtx, reqs: make(chan *recordRequest, recordQueue),
		stop: make(chan struct{}), done: make(chan struct{})}
}

// record writes outs in the next commit and returns the recipients it
// applied, or why it could not, once that commit ended or ctx did.
func (r *recorder) record(ctx context.Context, outs []db.Outcome) ([]db.Applied, error) {
	req := &recordRequest{ctx: ctx, outs: outs, res: make(chan recordResult, 1)}
	select {
	case r.reqs <- req:
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting to write outcomes: %w", context.Cause(ctx))
	case <-r.done:
		return nil, errRecorderStopped
	}
	select {
	case res := <-req.res:
		return res.applied, res.err
	case <-r.done:
		// run answers every request it takes before it returns; one
		// still unanswered was queued too late to be taken.
		select {
		case res := <-req.res:
			return res.applied, res.err
		default:
			return nil, errRecorderStopped
		}
	}
}

// run writes requests until close. It must be started once.
func (r *recorder) run() {
	defer close(r.done)
	for {
		var first *recordRequest
		select {
		case first = <-r.reqs:
		case <-r.stop:
			// Requests queued before close still get their commit.
			select {
			case first = <-r.reqs:
			default:
				return
			}
		}
		batch := []*recordRequest{first}
		n := len(first.outs)
	gather:
		// Take what is already waiting (the jobs that finished during
		// the last commit), but never wait for more.
		for n < maxOutcomesPerCommit {
			select {
			case req := <-r.reqs:
				batch = append(batch, req)
				n += len(req.outs)
			default:
				break gather
			}
		}
		r.commit(batch)
	}
}

// close stops run once the requests it took are answered. Jobs must have
// finished: the dispatcher's Stop calls it after they have.
func (r *recorder) close() {
	close(r.stop)
	<-r.done
}

// commit writes batch in one transaction and answers every request. A
// batch that fails for a reason other than the database being unreachable
// or out of time (an outcome the database refuses) is written again one
// request at a time, so that one bad outcome does not hold back the others.
func (r *recorder) commit(batch []*recordRequest) {
	live := batch[:0]
	for _, req := range batch {
		if err := req.ctx.Err(); err != nil {
			req.res <- recordResult{err: fmt.Errorf("waiting to write outcomes: %w", context.Cause(req.ctx))}
			continue
		}
		live = append(live, req)
	}
	if len(live) == 0 {
		return
	}
	err := r.try(live)
	if err == nil || len(live) == 1 || errors.Is(err, db.ErrUnavailable) || r.dbCtx.Err() != nil ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		for _, req := range live {
			if err != nil {
				req.res <- recordResult{err: err}
			}
		}
		return
	}
	for _, req := range live {
		if err := r.try([]*recordRequest{req}); err != nil {
			req.res <- recordResult{err: err}
		}
	}
}

// try writes the requests in one transaction. On success it answers them;
// on error it answers none and returns the error.
func (r *recorder) try(batch []*recordRequest) error {
	ctx, cancel := context.WithCancelCause(r.dbCtx)
	defer cancel(nil)
	ctx, cancelTimeout := context.WithTimeout(ctx, dbTimeout)
	defer cancelTimeout()
	var outs []db.Outcome
	if len(batch) == 1 {
		outs = batch[0].outs
	} else {
		n := 0
		for _, req := range batch {
			n += len(req.outs)
		}
		outs = make([]db.Outcome, 0, n)
	}
	for _, req := range batch {
		if len(batch) > 1 {
			outs = append(outs, req.outs...)
		}
		stop := context.AfterFunc(req.ctx, func() {
			cancel(fmt.Errorf("an outcome of the commit ran out of time: %w", context.Cause(req.ctx)))
		})
		defer stop()
	}
	r.txs.Add(1)
	applied, err := r.write(ctx, outs)
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w: %w", err, cause)
		}
		return err
	}
	if len(batch) == 1 {
		batch[0].res <- recordResult{applied: applied}
		return nil
	}
	done := appliedByID(applied)
	for _, req := range batch {
		var mine []db.Applied
		for _, o := range req.outs {
			if a, ok := done[o.RecipientID]; ok {
				mine = append(mine, a)
			}
		}
		req.res <- recordResult{applied: mine}
	}
	return nil
}

// appliedByID indexes what RecordOutcomes applied by recipient.
func appliedByID(applied []db.Applied) map[uuid.UUID]db.Applied {
	m := make(map[uuid.UUID]db.Applied, len(applied))
	for _, a := range applied {
		m[a.RecipientID] = a
	}
	return m
}
