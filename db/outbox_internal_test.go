package db

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// waitFor polls cond until it holds, failing after 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestOutboxNotifierCoalesces(t *testing.T) {
	t.Parallel()
	var sent atomic.Int32
	// An interval far longer than the test: after the first NOTIFY, every
	// later kick must wait in the one pending slot.
	n := newOutboxNotifier(func(context.Context) error {
		sent.Add(1)
		return nil
	}, time.Hour, nil)
	n.Start(context.Background())
	n.Kick()
	waitFor(t, "the first notification", func() bool { return sent.Load() == 1 })
	for range 1000 {
		n.Kick()
	}
	n.Stop() // returns although the interval has not passed
	if got := sent.Load(); got != 1 {
		t.Errorf("sent %d notifications within one interval, want 1", got)
	}
}

func TestOutboxNotifierSendsAgainAfterInterval(t *testing.T) {
	t.Parallel()
	var sent atomic.Int32
	n := newOutboxNotifier(func(context.Context) error {
		sent.Add(1)
		return nil
	}, time.Millisecond, nil)
	n.Start(context.Background())
	defer n.Stop()
	for want := int32(1); want <= 3; want++ {
		n.Kick()
		waitFor(t, "another notification", func() bool { return sent.Load() >= want })
	}
}

func TestOutboxNotifierLifecycle(t *testing.T) {
	t.Parallel()
	notify := func(context.Context) error { return nil }

	// Stop before Start returns at once, and Start afterwards does nothing.
	n := newOutboxNotifier(notify, 0, nil)
	n.Stop()
	n.Start(context.Background())
	n.Kick()
	n.Stop()

	// The context ending stops it too; Stop still returns.
	ctx, cancel := context.WithCancel(context.Background())
	n = newOutboxNotifier(notify, 0, nil)
	n.Start(ctx)
	n.Start(ctx)
	cancel()
	n.Stop()
	n.Stop()
	if n.minInterval != DefaultNotifyInterval {
		t.Errorf("minInterval = %v, want %v", n.minInterval, DefaultNotifyInterval)
	}
}
