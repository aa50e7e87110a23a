package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/posthaste/posthaste/db"
)

// Defaults for EventHubConfig.
const (
	// DefaultEventPollInterval is how often the hub looks at the feed's
	// head while streams are open.
	DefaultEventPollInterval = 250 * time.Millisecond
	// DefaultEventListenRetry is the longest pause between attempts to
	// listen again after the listening connection failed.
	DefaultEventListenRetry = 30 * time.Second
)

// EventHubConfig configures an EventHub.
type EventHubConfig struct {
	// PollInterval is how often the hub asks the database whether the feed
	// moved on, while at least one stream is open. It bounds how long an
	// event nobody announced (a delivery outcome written by any instance)
	// or one held back behind an older transaction waits before streams
	// see it. Defaults to 250ms.
	PollInterval time.Duration
	// ListenRetry is the longest pause between attempts to listen again
	// after the listening connection failed; the pause starts at a second
	// and doubles. Defaults to 30s.
	ListenRetry time.Duration
	// Logger receives failures of the listening connection and of the
	// head checks. Defaults to a logger that discards everything.
	Logger *slog.Logger
}

// WithDefaults returns c with zero fields set to their defaults.
func (c EventHubConfig) WithDefaults() EventHubConfig {
	if c.PollInterval == 0 {
		c.PollInterval = DefaultEventPollInterval
	}
	if c.ListenRetry == 0 {
		c.ListenRetry = DefaultEventListenRetry
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

func (c EventHubConfig) validate() error {
	if c.PollInterval < 10*time.Millisecond {
		return fmt.Errorf("PollInterval: must be at least 10ms, got %s", c.PollInterval)
	}
	if c.ListenRetry < time.Second {
		return fmt.Errorf("ListenRetry: must be at least 1s, got %s", c.ListenRetry)
	}
	return nil
}

// errShuttingDown ends streams when the hub stops, so that a graceful stop
// of the gRPC server does not wait on them; clients resume elsewhere from
// their last cursor.
var errShuttingDown = errors.New("server shutting down")

// EventHub wakes the open event streams of one process when the feed may
// have moved on. Streams do not poll the database each: the hub holds the
// process's one LISTEN connection (on db.OutboxChannel, which every
// instance already notifies, coalesced, after accepting messages), takes
// Wake calls from this process's own commits, and looks at the feed's head
// every PollInterval while streams are open. On each of those it reads the
// head, one index entry, and wakes every stream only when the head moved,
// so an idle stream costs nothing and an idle process one tiny query per
// interval. Writers never NOTIFY on its behalf.
type EventHub struct {
	store *db.DB
	cfg   EventHubConfig
	log   *slog.Logger

	wake     chan struct{}
	stopping chan struct{} // closed by Stop: streams end
	done     chan struct{} // closed when run returns

	mu      sync.Mutex
	subs    map[*subscription]struct{}
	cancel  context.CancelFunc // set by Start
	stopped bool
}

// subscription is one open stream's wake-up: a buffered signal, so a wake
// that comes while the stream is reading is kept for its next wait.
type subscription struct {
	c chan struct{}
}

// NewEventHub returns a hub reading from store, not started yet.
func NewEventHub(store *db.DB, cfg EventHubConfig) (*EventHub, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("event hub config: %w", err)
	}
	if store == nil {
		return nil, errors.New("event hub: store is required")
	}
	return &EventHub{
		store:    store,
		cfg:      cfg,
		log:      cfg.Logger,
		wake:     make(chan struct{}, 1),
		stopping: make(chan struct{}),
		done:     make(chan struct{}),
		subs:     make(map[*subscription]struct{}),
	}, nil
}

// Start starts listening and looking at the feed and returns at once. It
// runs until Stop is called or ctx ends. Calling it again, or after Stop,
// does nothing.
func (h *EventHub) Start(ctx context.Context) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cancel != nil || h.stopped {
		return
	}
	ctx, h.cancel = context.WithCancel(ctx)
	go h.run(ctx)
}

// Stop ends every open stream (they return Unavailable), refuses new ones
// and waits for the hub to finish. It may be called more than once, and
// before Start.
func (h *EventHub) Stop() {
	h.mu.Lock()
	if !h.stopped {
		h.stopped = true
		close(h.stopping)
	}
	cancel := h.cancel
	h.mu.Unlock()
	if cancel != nil {
		cancel()
		<-h.done
	}
}

// Wake says events may have been committed, such as this process's own
// accepted or canceled messages: the hub looks at the feed now rather than
// at its next poll. It never blocks.
func (h *EventHub) Wake() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// subscribe registers a stream. It fails once the hub is stopping.
func (h *EventHub) subscribe() (*subscription, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return nil, errShuttingDown
	}
	s := &subscription{c: make(chan struct{}, 1)}
	h.subs[s] = struct{}{}
	return s, nil
}

func (h *EventHub) unsubscribe(s *subscription) {
	h.mu.Lock()
	delete(h.subs, s)
	h.mu.Unlock()
}

// wait blocks until s is woken (nil), ctx ends (its error) or the hub
// stops (errShuttingDown).
func (h *EventHub) wait(ctx context.Context, s *subscription) error {
	select {
	case <-s.c:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-h.stopping:
		return errShuttingDown
	}
}

func (h *EventHub) subscribers() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}

func (h *EventHub) broadcast() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		select {
		case s.c <- struct{}{}:
		default:
		}
	}
}

func (h *EventHub) run(ctx context.Context) {
	defer close(h.done)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		h.listen(ctx)
	}()
	defer wg.Wait()

	poll := time.NewTicker(h.cfg.PollInterval)
	defer poll.Stop()
	var (
		head    db.EventCursor
		failing bool
	)
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.wake:
		case <-poll.C:
		}
		if h.subscribers() == 0 {
			continue
		}
		next, err := h.store.EventHead(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// Once per outage, not once per interval.
			if !failing {
				h.log.Warn("event hub: read the feed head", "err", err)
			}
			failing = true
			continue
		}
		failing = false
		if next != head {
			head = next
			h.broadcast()
		}
	}
}

// listen keeps a LISTEN connection open, waking the hub on every
// notification. Notifications sent while it was away are lost, so it wakes
// the hub after each reconnection too; the poll covers the gap meanwhile.
func (h *EventHub) listen(ctx context.Context) {
	pause := time.Second
	for {
		began := time.Now()
		err := h.store.ListenOutbox(ctx, h.Wake)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > h.cfg.ListenRetry {
			// It had been listening fine: a new outage starts short.
			pause = time.Second
		}
		h.log.Warn("event hub: listen for notifications", "err", err, "retry_in", pause)
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		pause = min(2*pause, h.cfg.ListenRetry)
		h.Wake()
	}
}
