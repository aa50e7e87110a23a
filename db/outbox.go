package db

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// OutboxChannel is the LISTEN/NOTIFY channel that says new recipients are
// due.
const OutboxChannel = "posthaste_outbox"

const (
	notifyOutboxSQL = `SELECT pg_notify('` + OutboxChannel + `', '')`
	listenOutboxSQL = `LISTEN ` + OutboxChannel
)

// NotifyOutbox wakes every listener on OutboxChannel. Inside InTx the
// notification goes out when the transaction commits, and not at all if it
// rolls back.
func (d *DB) NotifyOutbox(ctx context.Context) error {
	if _, err := d.pool.Exec(ctx, notifyOutboxSQL); err != nil {
		return fmt.Errorf("notify outbox: %w", mapError(err))
	}
	return nil
}

// ListenOutbox listens on OutboxChannel over a connection of its own (not
// one of the pool's) and calls onNotify for every notification, from this
// goroutine. It returns nil when ctx ends and the error when the connection
// fails; the caller reconnects, and should look for due work then, since
// notifications sent while it was away are lost.
func (d *DB) ListenOutbox(ctx context.Context, onNotify func()) error {
	conn, err := pgx.ConnectConfig(ctx, d.root.Config().ConnConfig.Copy())
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("listen outbox: connect: %w", mapError(err))
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = conn.Close(closeCtx)
	}()
	if _, err := conn.Exec(ctx, listenOutboxSQL); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("listen outbox: %w", mapError(err))
	}
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("listen outbox: %w", mapError(err))
		}
		onNotify()
	}
}

// DefaultNotifyInterval is the OutboxNotifier's minimum interval when none
// is given.
const DefaultNotifyInterval = 20 * time.Millisecond

// OutboxNotifier coalesces wake-ups of the outbox: any number of Kicks
// within one interval turn into at most one NOTIFY. A burst of accepted
// messages thus costs one notification per interval rather than one each,
// and the listeners wake once and claim them together.
type OutboxNotifier struct {
	notify      func(context.Context) error
	minInterval time.Duration
	logger      *slog.Logger

	kick chan struct{}
	done chan struct{}

	mu      sync.Mutex
	cancel  context.CancelFunc // set by Start
	stopped bool
}

// NewOutboxNotifier returns a notifier that sends NOTIFYs through d, at most
// one per minInterval (DefaultNotifyInterval when zero or less), logging
// failures to logger (discarded when nil).
func NewOutboxNotifier(d *DB, minInterval time.Duration, logger *slog.Logger) *OutboxNotifier {
	return newOutboxNotifier(d.NotifyOutbox, minInterval, logger)
}

func newOutboxNotifier(notify func(context.Context) error, minInterval time.Duration, logger *slog.Logger) *OutboxNotifier {
	if minInterval <= 0 {
		minInterval = DefaultNotifyInterval
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &OutboxNotifier{
		notify:      notify,
		minInterval: minInterval,
		logger:      logger,
		kick:        make(chan struct{}, 1),
		done:        make(chan struct{}),
	}
}

// Start starts sending notifications and returns at once. It runs until
// Stop is called or ctx ends. Calling it again, or after Stop, does nothing.
func (n *OutboxNotifier) Start(ctx context.Context) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cancel != nil || n.stopped {
		return
	}
	ctx, n.cancel = context.WithCancel(ctx)
	go n.run(ctx)
}

// Kick asks for a notification. It never blocks; kicks made while one is
// already pending are merged into it.
func (n *OutboxNotifier) Kick() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// Stop stops the notifier and waits for it to finish. A kick still pending
// is dropped: listeners poll for due work as well. Stop may be called more
// than once, and before Start.
func (n *OutboxNotifier) Stop() {
	n.mu.Lock()
	n.stopped = true
	cancel := n.cancel
	n.mu.Unlock()
	if cancel != nil {
		cancel()
		<-n.done
	}
}

func (n *OutboxNotifier) run(ctx context.Context) {
	defer close(n.done)
	timer := time.NewTimer(n.minInterval)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.kick:
		}
		sendCtx, cancelSend := context.WithTimeout(ctx, 5*time.Second)
		if err := n.notify(sendCtx); err != nil && ctx.Err() == nil {
			n.logger.Warn("outbox notify failed", "err", err)
		}
		cancelSend()
		// Hold back until the interval is over; kicks arriving meanwhile wait
		// in the channel as one.
		timer.Reset(n.minInterval)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
	}
}
