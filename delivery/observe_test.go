package delivery

import (
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
)

// finalCounter is an Observer that counts RecipientFinal calls.
type finalCounter struct {
	nopObserver
	mu     sync.Mutex
	finals map[[2]string]int // by status and class
	// acceptedZero counts the calls that did not know the acceptance time.
	acceptedZero int
}

func (c *finalCounter) RecipientFinal(status, class string, accepted time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finals == nil {
		c.finals = map[[2]string]int{}
	}
	c.finals[[2]string{status, class}]++
	if accepted.IsZero() {
		c.acceptedZero++
	}
}

// counts returns a copy of the counts so far.
func (c *finalCounter) counts() (map[[2]string]int, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[[2]string]int, len(c.finals))
	for k, v := range c.finals {
		out[k] = v
	}
	return out, c.acceptedZero
}

// checkOnlyCanceled fails t unless every final counted is canceled, n in all.
func (c *finalCounter) checkOnlyCanceled(t *testing.T, n int) {
	t.Helper()
	got, _ := c.counts()
	want := map[[2]string]int{{db.StatusCanceled, ""}: n}
	if len(got) != len(want) || got[[2]string{db.StatusCanceled, ""}] != n {
		t.Fatalf("finals counted %v, want %v", got, want)
	}
}

// TestDispatchCanceledWhileSendingCountedCanceled cancels two messages
// while one is in its DATA and the other waits for the only slot. The
// first's 451 is stored canceled, the second's lease is given back canceled
// at Stop: each counts once as canceled, nothing as deferred or failed.
func TestDispatchCanceledWhileSendingCountedCanceled(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	entered := make(chan struct{}, 2)
	gate := make(chan struct{})
	srv := testenv.StartSMTP(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		entered <- struct{}{}
		<-gate
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
	}))
	released := false
	defer func() {
		if !released {
			close(gate)
		}
	}()
	e.mx("one.test", srv)
	e.mx("two.test", srv)
	ids := []uuid.UUID{e.insert(t, time.Time{}, "a@one.test"), e.insert(t, time.Time{}, "b@two.test")}

	obs := &finalCounter{}
	var logs logBuffer
	cfg := e.config()
	cfg.Observer = obs
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cfg.Concurrency = 1
	cfg.SMTP.DataTimeout = time.Minute
	d := e.start(t, cfg)
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatal("no DATA")
	}
	waitFor(t, 10*time.Second, "both jobs to be claimed", func() bool { return d.pending.Load() == 2 })
	for _, id := range ids {
		if _, n, err := e.store.CancelMessage(t.Context(), db.DefaultProjectID(), id); err != nil || n != 0 {
			t.Fatalf("cancel %v = %d canceled, %v; want it only marked", id, n, err)
		}
	}

	stopped := make(chan struct{})
	go func() {
		d.Stop()
		close(stopped)
	}()
	// The waiting job gives its lease back at Stop: canceled.
	waitFor(t, 10*time.Second, "the released recipient to be counted", func() bool {
		got, _ := obs.counts()
		return got[[2]string{db.StatusCanceled, ""}] == 1
	})
	// The one in DATA gets its 451, stored canceled.
	close(gate)
	released = true
	<-stopped
	obs.checkOnlyCanceled(t, 2)
	if _, zero := obs.counts(); zero != 0 {
		t.Errorf("%d finals without the acceptance time, want none", zero)
	}
	// The outcome's line says what became of the recipient.
	if l := logs.String(); !strings.Contains(l, `msg="delivery: canceled"`) || strings.Contains(l, `msg="delivery: deferred"`) {
		t.Errorf("outcome log lines do not say canceled:\n%s", l)
	}
	for _, id := range ids {
		if m := e.get(t, id); m.Status != db.StatusCanceled {
			t.Errorf("message %v is %s, want canceled", id, m.Status)
		}
	}
}

// TestDispatchRescuedCanceledCounted gives a dispatcher an expired lease of
// another, on a recipient whose message was canceled meanwhile: its rescuer
// ends it canceled and counts it once, with no acceptance time.
func TestDispatchRescuedCanceledCounted(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	id := e.insert(t, time.Time{}, "a@lost.test")
	ctx := t.Context()
	claimed, err := e.store.ClaimRecipients(ctx, db.ClaimParams{Owner: "lost-owner", Limit: 10,
		LeaseFor: time.Millisecond})
	if err != nil || len(claimed) != 1 {
		t.Fatalf("claim = %v, %v", claimed, err)
	}
	if _, n, err := e.store.CancelMessage(ctx, db.DefaultProjectID(), id); err != nil || n != 0 {
		t.Fatalf("cancel = %d canceled, %v; want it only marked", n, err)
	}

	obs := &finalCounter{}
	cfg := e.config()
	cfg.Observer = obs
	e.start(t, cfg)
	e.waitMessage(t, id, "the rescue", func(m db.Message) bool { return m.Status == db.StatusCanceled })
	waitFor(t, 10*time.Second, "the rescued recipient to be counted", func() bool {
		got, _ := obs.counts()
		return len(got) > 0
	})
	obs.checkOnlyCanceled(t, 1)
	if _, zero := obs.counts(); zero != 1 {
		t.Errorf("%d finals without the acceptance time, want 1", zero)
	}
}
