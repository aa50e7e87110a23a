package webhook

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/posthaste/posthaste/db"
)

// FanOut turns events into webhook deliveries. It reads the event feed
// rather than having every state change write webhook rows: the hot paths
// stay as they are for projects without webhooks, and the feed's
// commit-safe order with a cursor moved in the delivery rows' transaction
// gives exactly-once fan-out (see db.FanOutWebhooks).
type FanOut struct {
	cfg      Config
	store    *db.DB
	log      *slog.Logger
	onCreate func()

	wake     chan struct{}
	cancel   context.CancelFunc
	done     chan struct{}
	stopOnce sync.Once
}

// NewFanOut returns a fan-out reading from store. onCreate, if not nil, is
// called after deliveries were created, to wake a local Sender; it must
// not block.
func NewFanOut(cfg Config, store *db.DB, onCreate func()) (*FanOut, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("webhook config: %w", err)
	}
	if store == nil {
		return nil, errNoStore
	}
	if onCreate == nil {
		onCreate = func() {}
	}
	return &FanOut{
		cfg: cfg, store: store, log: cfg.Logger, onCreate: onCreate,
		wake: make(chan struct{}, 1),
	}, nil
}

// Start runs the fan-out until ctx ends or Stop is called. It returns at
// once; call it once.
func (f *FanOut) Start(ctx context.Context) {
	ctx, f.cancel = context.WithCancel(ctx)
	f.done = make(chan struct{})
	go func() {
		defer close(f.done)
		f.run(ctx)
	}()
}

// Stop ends the fan-out and waits for it. A transaction it had open is
// rolled back; its events are read again by the next fan-out. It is
// idempotent, and safe before Start.
func (f *FanOut) Stop() {
	f.stopOnce.Do(func() {
		if f.cancel == nil {
			return
		}
		f.cancel()
		<-f.done
	})
}

// Wake makes the fan-out read the feed now rather than at its next poll.
func (f *FanOut) Wake() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

func (f *FanOut) run(ctx context.Context) {
	poll(ctx, f.wake, f.cfg.PollInterval, f.once)
}

// poll runs step at once, then again at once while it reports that more
// work may be waiting, else after interval or when woken, until ctx ends.
func poll(ctx context.Context, wake <-chan struct{}, interval time.Duration, step func(context.Context) bool) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-wake:
		}
		if step(ctx) {
			t.Reset(0)
		} else {
			t.Reset(interval)
		}
	}
}

// once fans out one batch and reports whether the feed may hold more.
func (f *FanOut) once(ctx context.Context) bool {
	res, err := f.store.FanOutWebhooks(ctx, f.cfg.FanOutBatch)
	if err != nil {
		if ctx.Err() == nil {
			f.log.Warn("webhook fan-out", "err", err)
		}
		return false
	}
	if res.Deliveries > 0 {
		f.log.Debug("webhook fan-out", "events", res.Events, "deliveries", res.Deliveries)
		f.onCreate()
	}
	return res.Events == f.cfg.FanOutBatch
}
