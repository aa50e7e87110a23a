package delivery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

// gatedWrite is a recorder write function whose first call waits for open,
// so that a test can queue requests behind a commit in flight.
type gatedWrite struct {
	next    func(context.Context, []db.Outcome) ([]db.Applied, error)
	started chan struct{} // closed when the first call begins
	open    chan struct{} // the first call goes on once this is closed

	mu    sync.Mutex
	calls [][]db.Outcome
}

func newGatedWrite(next func(context.Context, []db.Outcome) ([]db.Applied, error)) *gatedWrite {
	return &gatedWrite{next: next, started: make(chan struct{}), open: make(chan struct{})}
}

func (g *gatedWrite) write(ctx context.Context, outs []db.Outcome) ([]db.Applied, error) {
	g.mu.Lock()
	g.calls = append(g.calls, slices.Clone(outs))
	first := len(g.calls) == 1
	g.mu.Unlock()
	if first {
		close(g.started)
		<-g.open
	}
	return g.next(ctx, outs)
}

func (g *gatedWrite) callSizes() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	var sizes []int
	for _, c := range g.calls {
		sizes = append(sizes, len(c))
	}
	return sizes
}

// startRecorder runs a recorder over write until the test ends.
func startRecorder(t *testing.T, write func(context.Context, []db.Outcome) ([]db.Applied, error)) *recorder {
	t.Helper()
	r := newRecorder(context.Background(), write)
	var wg sync.WaitGroup
	wg.Go(r.run)
	t.Cleanup(func() {
		r.close()
		wg.Wait()
	})
	return r
}

// recordAsync starts r.record(outs) and returns where its result arrives.
func recordAsync(r *recorder, outs []db.Outcome) <-chan recordResult {
	ch := make(chan recordResult, 1)
	go func() {
		applied, err := r.record(context.Background(), outs)
		ch <- recordResult{applied: applied, err: err}
	}()
	return ch
}

// waitQueued waits until n requests wait for the recorder's writer.
func waitQueued(t *testing.T, r *recorder, n int) {
	t.Helper()
	waitFor(t, 10*time.Second, fmt.Sprintf("%d queued requests", n), func() bool { return len(r.reqs) == n })
}

// fakeOutcomes returns n delivered outcomes of owner with fresh ids.
func fakeOutcomes(owner string, n int) []db.Outcome {
	outs := make([]db.Outcome, n)
	for i := range outs {
		outs[i] = db.Outcome{RecipientID: uuid.New(), LeaseOwner: owner, Status: db.StatusDelivered, Code: 250}
	}
	return outs
}

func TestRecorderCommitsConcurrentOutcomesTogether(t *testing.T) {
	t.Parallel()
	g := newGatedWrite(func(_ context.Context, outs []db.Outcome) ([]db.Applied, error) {
		applied := make([]db.Applied, len(outs))
		for i, o := range outs {
			applied[i] = db.Applied{RecipientID: o.RecipientID, Status: o.Status}
		}
		return applied, nil
	})
	r := startRecorder(t, g.write)

	// Idle: the first request is written at once, alone.
	first := recordAsync(r, fakeOutcomes("a", 1))
	<-g.started
	// Five jobs finish while it is being committed.
	var outs [][]db.Outcome
	var results []<-chan recordResult
	for i := range 5 {
		o := fakeOutcomes(fmt.Sprintf("job-%d", i), i+1)
		outs = append(outs, o)
		results = append(results, recordAsync(r, o))
	}
	waitQueued(t, r, 5)
	close(g.open)

	if res := <-first; res.err != nil || len(res.applied) != 1 {
		t.Fatalf("first request: %+v", res)
	}
	for i, ch := range results {
		res := <-ch
		if res.err != nil {
			t.Fatalf("request %d: %v", i, res.err)
		}
		// Each job is told about its own recipients only.
		want := make([]db.Applied, len(outs[i]))
		for k, o := range outs[i] {
			want[k] = db.Applied{RecipientID: o.RecipientID, Status: o.Status}
		}
		if !slices.Equal(res.applied, want) {
			t.Fatalf("request %d applied %v, want %v", i, res.applied, want)
		}
	}
	if got, want := g.callSizes(), []int{1, 1 + 2 + 3 + 4 + 5}; !slices.Equal(got, want) {
		t.Fatalf("commits of %v outcomes, want %v", got, want)
	}
	if got := r.txs.Load(); got != 2 {
		t.Fatalf("%d transactions, want 2", got)
	}
}

// TestRecorderKeepsEachOutcomesFence commits outcomes of two claims in one
// transaction against the database, one of them fenced off because its
// recipient was taken over: only that one is skipped.
func TestRecorderKeepsEachOutcomesFence(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	ctx := t.Context()
	e.insert(t, time.Time{}, "a@fence.test")
	e.insert(t, time.Time{}, "b@fence.test")
	claimed, err := e.store.ClaimRecipients(ctx, db.ClaimParams{Owner: "owner-1", Limit: 10, LeaseFor: time.Minute})
	if err != nil || len(claimed) != 2 {
		t.Fatalf("claim: %v, %d rows", err, len(claimed))
	}
	g := newGatedWrite(e.store.RecordOutcomes)
	r := startRecorder(t, g.write)

	// A third message holds the writer while the two outcomes queue.
	blocker := recordAsync(r, fakeOutcomes("nobody", 1))
	<-g.started
	good := db.Outcome{RecipientID: claimed[0].ID, LeaseOwner: "owner-1", Status: db.StatusDelivered,
		Code: 250, EnhancedCode: "2.0.0", Text: "ok"}
	// The second outcome carries an owner that no longer holds its row,
	// as after a rescue and a claim elsewhere.
	stale := db.Outcome{RecipientID: claimed[1].ID, LeaseOwner: "owner-0", Status: db.StatusDelivered,
		Code: 250, EnhancedCode: "2.0.0", Text: "ok"}
	goodRes := recordAsync(r, []db.Outcome{good})
	staleRes := recordAsync(r, []db.Outcome{stale})
	waitQueued(t, r, 2)
	close(g.open)

	if res := <-blocker; res.err != nil || len(res.applied) != 0 {
		t.Fatalf("blocker: %+v", res)
	}
	if res := <-goodRes; res.err != nil || !slices.Equal(res.applied, []db.Applied{{RecipientID: good.RecipientID, Status: good.Status}}) {
		t.Fatalf("good outcome: %+v", res)
	}
	if res := <-staleRes; res.err != nil || len(res.applied) != 0 {
		t.Fatalf("fenced outcome: %+v", res)
	}
	if got := g.callSizes(); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("commits of %v outcomes, want [1 2]", got)
	}
	m0 := e.get(t, claimed[0].MessageID)
	m1 := e.get(t, claimed[1].MessageID)
	if s := m0.Recipients[0].Status; s != db.StatusDelivered {
		t.Fatalf("applied recipient is %s", s)
	}
	if s := m1.Recipients[0].Status; s != db.StatusSending {
		t.Fatalf("fenced recipient is %s, want it left sending", s)
	}
	if len(m1.Attempts) != 0 {
		t.Fatalf("fenced recipient got attempt rows: %+v", m1.Attempts)
	}
}

// TestRecorderWritesRefusedBatchOneByOne checks that an outcome the
// database refuses fails alone, not the outcomes committed with it.
func TestRecorderWritesRefusedBatchOneByOne(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	ctx := t.Context()
	e.insert(t, time.Time{}, "a@split.test")
	claimed, err := e.store.ClaimRecipients(ctx, db.ClaimParams{Owner: "owner-1", Limit: 10, LeaseFor: time.Minute})
	if err != nil || len(claimed) != 1 {
		t.Fatalf("claim: %v, %d rows", err, len(claimed))
	}
	g := newGatedWrite(e.store.RecordOutcomes)
	r := startRecorder(t, g.write)
	blocker := recordAsync(r, fakeOutcomes("nobody", 1))
	<-g.started
	good := db.Outcome{RecipientID: claimed[0].ID, LeaseOwner: "owner-1", Status: db.StatusDelivered, Code: 250}
	// A deferral without a due time is refused.
	bad := db.Outcome{RecipientID: uuid.New(), LeaseOwner: "owner-1", Status: db.StatusDeferred, Code: 451}
	goodRes := recordAsync(r, []db.Outcome{good})
	badRes := recordAsync(r, []db.Outcome{bad})
	waitQueued(t, r, 2)
	close(g.open)
	<-blocker
	if res := <-goodRes; res.err != nil || len(res.applied) != 1 {
		t.Fatalf("good outcome: %+v", res)
	}
	if res := <-badRes; res.err == nil {
		t.Fatal("refused outcome reported written")
	}
}

func TestRecorderCancelledWaitLeavesCommitToOthers(t *testing.T) {
	t.Parallel()
	g := newGatedWrite(func(ctx context.Context, outs []db.Outcome) ([]db.Applied, error) {
		return nil, ctx.Err()
	})
	r := startRecorder(t, g.write)
	blocker := recordAsync(r, fakeOutcomes("nobody", 1))
	<-g.started
	ctx, cancel := context.WithCancelCause(context.Background())
	lost := errors.New("lease expiring")
	res := make(chan error, 1)
	go func() {
		_, err := r.record(ctx, fakeOutcomes("a", 1))
		res <- err
	}()
	waitQueued(t, r, 1)
	cancel(lost)
	close(g.open)
	<-blocker
	// The request whose time ran out is answered without being written.
	if err := <-res; !errors.Is(err, lost) {
		t.Fatalf("error %v, want the cause %v", err, lost)
	}
	if got := g.callSizes(); !slices.Equal(got, []int{1}) {
		t.Fatalf("commits of %v outcomes, want [1]", got)
	}
}

func TestRecorderAfterClose(t *testing.T) {
	t.Parallel()
	r := newRecorder(context.Background(), func(context.Context, []db.Outcome) ([]db.Applied, error) {
		return nil, nil
	})
	var wg sync.WaitGroup
	wg.Go(r.run)
	r.close()
	wg.Wait()
	if _, err := r.record(context.Background(), fakeOutcomes("a", 1)); !errors.Is(err, errRecorderStopped) {
		t.Fatalf("record after close: %v", err)
	}
}
