package db

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// ErrOverloaded is returned by Committer.Insert when its queue is full: the
// database is not keeping up, and the caller should retry later rather than
// wait in an unbounded line.
var ErrOverloaded = errors.New("intake queue full")

// Defaults for CommitterConfig.
const (
	DefaultCommitterMaxBatch      = 256
	DefaultCommitterMaxWait       = time.Millisecond
	DefaultCommitterQueue         = 2048
	DefaultCommitterWorkers       = 4
	DefaultCommitterCommitTimeout = 10 * time.Second
)

// CommitterConfig configures a Committer.
type CommitterConfig struct {
	// MaxBatch is how many messages one commit gathers at most; a single
	// Insert of more is committed alone, whole. Defaults to 256.
	MaxBatch int
	// MaxWait is how long a worker waits for more messages before it
	// commits a group that is not full, and only while another worker is
	// committing: an idle committer never waits. Negative never waits.
	// Defaults to 1ms.
	MaxWait time.Duration
	// Queue is how many Insert calls may wait for a worker; beyond it Insert
	// fails with ErrOverloaded at once. Defaults to 2048.
	Queue int
	// Workers is how many groups are committed at once, each on a
	// connection of its own. Defaults to 4.
	Workers int
	// CommitTimeout bounds one group's transaction. Defaults to 10s.
	CommitTimeout time.Duration
}

// WithDefaults returns c with zero fields set to their defaults.
func (c CommitterConfig) WithDefaults() CommitterConfig {
	if c.MaxBatch == 0 {
		c.MaxBatch = DefaultCommitterMaxBatch
	}
	if c.MaxWait == 0 {
		c.MaxWait = DefaultCommitterMaxWait
	}
	if c.Queue == 0 {
		c.Queue = DefaultCommitterQueue
	}
	if c.Workers == 0 {
		c.Workers = DefaultCommitterWorkers
	}
	if c.CommitTimeout == 0 {
		c.CommitTimeout = DefaultCommitterCommitTimeout
	}
	return c
}

// Validate reports the first problem with c after defaults are applied.
// The error starts with the field's name.
func (c CommitterConfig) Validate() error {
	c = c.WithDefaults()
	switch {
	case c.MaxBatch < 1:
		return fmt.Errorf("MaxBatch: must be at least 1, got %d", c.MaxBatch)
	case c.Queue < 1:
		return fmt.Errorf("Queue: must be at least 1, got %d", c.Queue)
	case c.Workers < 1:
		return fmt.Errorf("Workers: must be at least 1, got %d", c.Workers)
	case c.CommitTimeout < 0:
		return fmt.Errorf("CommitTimeout: must not be negative, got %s", c.CommitTimeout)
	}
	return nil
}

// CommitterStats counts a Committer's work since it was made.
type CommitterStats struct {
	// Commits is the number of transactions run (a group that had to be
	// split after an error counts each part).
	Commits int64
	// Messages is the number of messages handed to those transactions.
	Messages int64
	// Queued is the number of Insert calls waiting for a worker now.
	Queued int
}

// Committer is the intake's group commit: concurrent Insert calls share one
// transaction (InsertMessages), so that many messages cost one commit, one
// WAL flush and a few multi-row statements instead of a commit each.
//
// Workers take what is queued. A worker that finds the queue empty after
// its first request commits at once when no other worker is committing, so
// a lone request is not delayed; under load, while other commits are in
// flight, it waits up to MaxWait for more, since the database is busy
// anyway. Each caller is answered after its group committed, never before.
//
// A failure of one message (invalid, an idempotency conflict) is that
// message's alone. A database that is unreachable fails the whole group
// with ErrUnavailable and nothing of it is stored. Any other error of a
// group of several calls is retried one call at a time, so one call whose
// data the database refuses fails alone.
type Committer struct {
	db  *DB
	cfg CommitterConfig

	mu      sync.RWMutex // guards queue against Insert after close
	queue   chan *commitRequest
	started bool
	stopped bool

	busy     atomic.Int32 // workers committing now
	commits  atomic.Int64
	messages atomic.Int64

	ctx      context.Context
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// commitRequest is one Insert call waiting for its group's commit.
type commitRequest struct {
	ctx  context.Context
	msgs []NewMessage
	out  []InsertOutcome
	err  error
	done chan struct{}
}

// NewCommitter returns a Committer writing to d. It accepts nothing until
// Start.
func NewCommitter(d *DB, cfg CommitterConfig) (*Committer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("committer config: %w", err)
	}
	cfg = cfg.WithDefaults()
	return &Committer{db: d, cfg: cfg, queue: make(chan *commitRequest, cfg.Queue)}, nil
}

// Start starts the workers and returns at once. Transactions run under
// ctx's values, not its cancellation: Stop ends the workers after the
// queue is drained.
func (c *Committer) Start(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started || c.stopped {
		return
	}
	c.started = true
	c.ctx = context.WithoutCancel(ctx)
	for range c.cfg.Workers {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.work()
		}()
	}
}

// Stop refuses new calls, commits what is already queued and waits for the
// workers. It is idempotent.
func (c *Committer) Stop() {
	c.stopOnce.Do(func() {
		c.mu.Lock()
		c.stopped = true
		started := c.started
		close(c.queue)
		c.mu.Unlock()
		if !started {
			// No worker will drain the queue: answer what is in it.
			for r := range c.queue {
				r.finish(nil, fmt.Errorf("intake stopped: %w", ErrUnavailable))
			}
		}
		c.wg.Wait()
	})
}

// Stats returns the counts so far.
func (c *Committer) Stats() CommitterStats {
	return CommitterStats{Commits: c.commits.Load(), Messages: c.messages.Load(), Queued: len(c.queue)}
}

// Insert stores msgs in the next group commit and returns once that group
// committed (or failed), with one outcome per message, as InsertMessages
// does. The messages of one call are committed together, never split.
//
// It fails at once with ErrOverloaded when the queue is full, and with
// ErrUnavailable before Start or after Stop. When ctx ends first, Insert
// returns ctx's error; the messages may still be committed, as with any
// call whose answer is lost.
func (c *Committer) Insert(ctx context.Context, msgs []NewMessage) ([]InsertOutcome, error) {
	r := &commitRequest{ctx: ctx, msgs: msgs, done: make(chan struct{})}
	c.mu.RLock()
	switch {
	case !c.started || c.stopped:
		c.mu.RUnlock()
		return nil, fmt.Errorf("intake not running: %w", ErrUnavailable)
	}
	select {
	case c.queue <- r:
		c.mu.RUnlock()
	default:
		c.mu.RUnlock()
		return nil, ErrOverloaded
	}
	select {
	case <-r.done:
		return r.out, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (r *commitRequest) finish(out []InsertOutcome, err error) {
	r.out, r.err = out, err
	close(r.done)
}

// work gathers groups and commits them until the queue is closed and empty.
func (c *Committer) work() {
	var group []*commitRequest
	for {
		first, ok := <-c.queue
		if !ok {
			return
		}
		group = append(group[:0], first)
		n := len(first.msgs)
		n, open := c.gather(&group, n, false)
		if open && n < c.cfg.MaxBatch && c.cfg.MaxWait > 0 && c.busy.Load() > 0 {
			n, _ = c.gather(&group, n, true)
		}
		c.busy.Add(1)
		c.commit(group, n)
		c.busy.Add(-1)
		clear(group)
	}
}

// gather adds queued requests to group until it holds MaxBatch messages;
// with wait it waits up to MaxWait for them, else it takes only what is
// queued already. A request that would overfill the group is still taken,
// whole: the calls of one request are never split. It returns the message
// count and whether the queue is still open.
func (c *Committer) gather(group *[]*commitRequest, n int, wait bool) (int, bool) {
	var timeout <-chan time.Time
	if wait {
		t := time.NewTimer(c.cfg.MaxWait)
		defer t.Stop()
		timeout = t.C
	}
	for n < c.cfg.MaxBatch {
		if !wait {
			select {
			case r, ok := <-c.queue:
				if !ok {
					return n, false
				}
				*group = append(*group, r)
				n += len(r.msgs)
			default:
				return n, true
			}
			continue
		}
		select {
		case r, ok := <-c.queue:
			if !ok {
				return n, false
			}
			*group = append(*group, r)
			n += len(r.msgs)
		case <-timeout:
			return n, true
		}
	}
	return n, true
}

// commit runs one group's transaction and answers its callers.
func (c *Committer) commit(group []*commitRequest, n int) {
	// Callers that gave up are left out: nobody would learn the ids.
	live := group[:0:0]
	msgs := make([]NewMessage, 0, n)
	for _, r := range group {
		if err := r.ctx.Err(); err != nil {
			r.finish(nil, err)
			continue
		}
		live = append(live, r)
		msgs = append(msgs, r.msgs...)
	}
	if len(live) == 0 {
		return
	}
	out, err := c.insert(msgs)
	if err != nil && len(live) > 1 && !errors.Is(err, ErrUnavailable) {
		// Something in the group was refused by the database; find whose by
		// committing each call alone.
		for _, r := range live {
			o, err := c.insert(r.msgs)
			r.finish(o, err)
		}
		return
	}
	for _, r := range live {
		if err != nil {
			r.finish(nil, err)
			continue
		}
		r.finish(out[:len(r.msgs):len(r.msgs)], nil)
		out = out[len(r.msgs):]
	}
}

// insert runs InsertMessages under the commit timeout.
func (c *Committer) insert(msgs []NewMessage) ([]InsertOutcome, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.CommitTimeout)
	defer cancel()
	c.commits.Add(1)
	c.messages.Add(int64(len(msgs)))
	out, err := c.db.InsertMessages(ctx, msgs)
	if err != nil && errors.Is(err, context.DeadlineExceeded) {
		// The database did not answer in time: the caller should retry,
		// like with one that cannot be reached.
		err = fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return out, err
}
