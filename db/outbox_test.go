package db_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
)

// listen runs ListenOutbox until the test ends and returns a channel that
// receives once per notification.
func listen(t *testing.T, d *db.DB) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan struct{}, 100)
	done := make(chan error, 1)
	go func() {
		done <- d.ListenOutbox(ctx, func() {
			select {
			case got <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ListenOutbox after cancel: %v", err)
		}
	})
	return got
}

// until calls poke every 20ms until got receives, failing after 10s. The
// listener may not be listening yet when the first poke goes out.
func until(t *testing.T, got <-chan struct{}, poke func()) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	poke()
	for {
		select {
		case <-got:
			return
		case <-tick.C:
			poke()
		case <-deadline:
			t.Fatal("no notification arrived")
		}
	}
}

func TestListenOutboxReceivesNotify(t *testing.T) {
	t.Parallel()
	b := setup(t)
	got := listen(t, b.db)
	until(t, got, func() {
		if err := b.db.NotifyOutbox(context.Background()); err != nil {
			t.Errorf("NotifyOutbox: %v", err)
		}
	})
}

func TestListenOutboxReportsBrokenConnection(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	listening := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- b.db.ListenOutbox(ctx, func() {
			select {
			case listening <- struct{}{}:
			default:
			}
		})
	}()
	until(t, listening, func() {
		if err := b.db.NotifyOutbox(ctx); err != nil {
			t.Errorf("NotifyOutbox: %v", err)
		}
	})
	if _, err := b.raw.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND query LIKE 'LISTEN%'`); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, db.ErrUnavailable) {
			t.Errorf("ListenOutbox after its connection was killed: err = %v, want ErrUnavailable", err)
		}
	case <-ctx.Done():
		t.Fatal("ListenOutbox did not return after its connection was killed")
	}
}

func TestOutboxNotifierWakesListener(t *testing.T) {
	t.Parallel()
	b := setup(t)
	got := listen(t, b.db)
	n := db.NewOutboxNotifier(b.db, 0, nil)
	n.Start(context.Background())
	until(t, got, n.Kick)
	n.Stop()
	n.Stop()
	n.Kick() // after Stop: must not block or panic
}
