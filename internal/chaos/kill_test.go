//go:build chaos && linux

package chaos

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"
)

// TestKillService kills `posthaste serve` with SIGKILL at random moments
// under steady load and starts it again: every message that got a 2xx
// must reach the sink, and duplicates may only come from SMTP sessions
// that were open when a kill hit.
func TestKillService(t *testing.T) {
	kills := 50
	if testing.Short() {
		kills = 10
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	cl := startCluster(t)
	databaseURL, err := cl.newDatabase(ctx, "posthaste")
	if err != nil {
		t.Fatal(err)
	}
	sk := startSink(t, 50*time.Millisecond)
	svc := newService(t, buildPosthaste(t), serviceConfig{databaseURL: databaseURL, sinkAddr: sk.addr})
	if err := svc.start(ctx); err != nil {
		t.Fatal(err)
	}
	ld, err := startLoad(ctx, svc, loadConfig{senders: 4, every: 40 * time.Millisecond, prefix: "k"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ld.stop)

	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	t.Logf("kill moments seeded with %d", seed)

	var (
		inFlight   int // SMTP sessions open at the kills: the duplicate bound
		restarts   []time.Duration
		recoveries []time.Duration
	)
	for i := range kills {
		// A random moment, between a fifth of a second and two seconds
		// after the service answered.
		if err := pause(ctx, 200*time.Millisecond+time.Duration(rng.Int64N(int64(1800*time.Millisecond)))); err != nil {
			t.Fatal(err)
		}
		open := sk.openSessions()
		killedAt := time.Now()
		if err := svc.kill(); err != nil {
			t.Fatal(err)
		}
		inFlight += open
		if err := svc.start(ctx); err != nil {
			t.Fatalf("kill %d: restart: %v", i+1, err)
		}
		restarts = append(restarts, time.Since(killedAt))

		// Everything accepted before the kill must come through, the
		// killed instance's leases included: that is the recovery.
		pending := acceptedBefore(ld.ledger.all(), killedAt)
		wctx, wcancel := context.WithTimeout(ctx, 10*lease)
		missing := waitDelivered(wctx, sk, pending)
		wcancel()
		if len(missing) > 0 {
			t.Fatalf("kill %d: %d of %d messages accepted before it not delivered %s later, e.g. %v",
				i+1, len(missing), len(pending), 10*lease, firstN(missing, 5))
		}
		recoveries = append(recoveries, time.Since(killedAt))
	}
	ld.stop()

	sends := ld.ledger.all()
	all := acceptedBefore(sends, time.Now())
	wctx, wcancel := context.WithTimeout(ctx, 10*lease)
	missing := waitDelivered(wctx, sk, all)
	wcancel()
	received, _ := sk.snapshot()
	c := tally(sends, received)
	t.Logf("kill -9 x%d: %s; sessions open at the kills: %d", kills, c, inFlight)
	t.Logf("restart (kill to /healthz 200): median %s, max %s; recovery (kill to every earlier 2xx delivered): median %s, p90 %s, max %s (lease %s)",
		percentile(restarts, 0.5).Round(time.Millisecond), percentile(restarts, 1).Round(time.Millisecond),
		percentile(recoveries, 0.5).Round(time.Millisecond), percentile(recoveries, 0.9).Round(time.Millisecond),
		percentile(recoveries, 1).Round(time.Millisecond), lease)

	t.Logf("service log: %d rescues of expired leases, %d outcomes dropped or skipped for a lost lease",
		svc.logCount("rescued expired leases"),
		svc.logCount("outcomes dropped, lease lost")+svc.logCount("outcomes skipped, lease lost"))
	lostIDs := svc.leaseLostMessages()
	once, more := leaseLostCopies(lostIDs, sends, received)
	t.Logf("lease lost warnings: %d; their recipients reached the sink once: %d, more than once: %d",
		len(lostIDs), once, more)
	if len(missing) > 0 {
		t.Errorf("lost: %d accepted messages never delivered, e.g. %v", len(missing), firstN(missing, 5))
	}
	if c.duplicated > inFlight {
		t.Errorf("%d duplicates, more than the %d SMTP sessions open at the kills", c.duplicated, inFlight)
	}
	if c.other > 0 {
		t.Errorf("%d requests got an answer other than 2xx or 503: %v", c.other, otherAnswers(sends, 5))
	}
	fctx, fcancel := context.WithTimeout(ctx, 10*lease)
	absent, undelivered, err := waitFinal(fctx, databaseURL, sends)
	fcancel()
	if err != nil {
		t.Fatal(err)
	}
	if len(absent) > 0 {
		t.Errorf("%d messages answered 2xx are not in the database, e.g. %v", len(absent), firstN(absent, 5))
	}
	if len(undelivered) > 0 {
		t.Errorf("%d accepted messages are not delivered in the database, e.g. %v", len(undelivered), firstN(undelivered, 5))
	}
}

// pause waits d, or less if ctx ends. Only the random moments of faults
// are waited for this way; async work is polled for.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// otherAnswers lists up to n answers that were neither 2xx nor 503.
func otherAnswers(sends []send, n int) []string {
	var out []string
	for _, s := range sends {
		if s.outcome == otherStatus && len(out) < n {
			out = append(out, s.detail)
		}
	}
	return out
}
