//go:build chaos && linux

package chaos

import (
	"context"
	"math/rand/v2"
	"net/http"
	"testing"
	"time"
)

// TestDatabaseCrash stops PostgreSQL in immediate mode under load, keeps it
// down for a random while (sometimes longer than the lease), and starts it
// again, without touching the service: while it is down the API answers
// 503 / Unavailable, every 2xx is a committed message, the service recovers
// by itself, nothing is lost, and nothing is sent twice (an outcome the
// database could not take is kept and written when it is back).
func TestDatabaseCrash(t *testing.T) {
	crashes := 10
	if testing.Short() {
		crashes = 3
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
	pid := svc.pid()
	ld, err := startLoad(ctx, svc, loadConfig{senders: 4, every: 40 * time.Millisecond, prefix: "p"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ld.stop)
	health := &http.Client{Timeout: time.Second}
	defer health.CloseIdleConnections()

	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	t.Logf("crash moments seeded with %d", seed)

	// An outage runs from the postmaster's exit to the start of the
	// restart: a request that ended before that cannot have committed.
	type outage struct{ down, up time.Time }
	var (
		outages    []outage
		healthy    []time.Duration // database back to /healthz 200
		recoveries []time.Duration // database back to every earlier 2xx delivered
	)
	for i := range crashes {
		if err := pause(ctx, 300*time.Millisecond+time.Duration(rng.Int64N(int64(1200*time.Millisecond)))); err != nil {
			t.Fatal(err)
		}
		if err := cl.crash(ctx); err != nil {
			t.Fatal(err)
		}
		downAt := time.Now()
		// Down for half a second to one and a half leases: past the
		// lease, outcomes of sessions in flight must be kept in memory.
		downFor := lease/6 + time.Duration(rng.Int64N(int64(lease*4/3)))
		dctx, dcancel := context.WithTimeout(ctx, downFor)
		err := poll(dctx, 50*time.Millisecond, func() (bool, error) { return !svc.healthy(dctx, health), nil })
		dcancel()
		if err != nil {
			t.Errorf("crash %d: /healthz did not turn 503 within the %s the database was down", i+1, downFor.Round(time.Millisecond))
		}
		if err := pause(ctx, time.Until(downAt.Add(downFor))); err != nil {
			t.Fatal(err)
		}
		restartAt := time.Now()
		if err := cl.restart(ctx); err != nil {
			t.Fatalf("crash %d: %v", i+1, err)
		}
		upAt := time.Now()
		outages = append(outages, outage{downAt, restartAt})

		hctx, hcancel := context.WithTimeout(ctx, 30*time.Second)
		err = poll(hctx, 50*time.Millisecond, func() (bool, error) { return svc.healthy(hctx, health), nil })
		hcancel()
		if err != nil {
			t.Fatalf("crash %d: /healthz not 200 within 30s of the database's return", i+1)
		}
		healthy = append(healthy, time.Since(upAt))

		pending := acceptedBefore(ld.ledger.all(), downAt)
		wctx, wcancel := context.WithTimeout(ctx, 10*lease)
		missing := waitDelivered(wctx, sk, pending)
		wcancel()
		if len(missing) > 0 {
			t.Fatalf("crash %d: %d of %d messages accepted before it not delivered %s after the database's return, e.g. %v",
				i+1, len(missing), len(pending), 10*lease, firstN(missing, 5))
		}
		recoveries = append(recoveries, time.Since(upAt))
		if !svc.running() || svc.pid() != pid {
			t.Fatalf("crash %d: the service did not survive the database's crash", i+1)
		}
	}
	ld.stop()

	sends := ld.ledger.all()
	wctx, wcancel := context.WithTimeout(ctx, 10*lease)
	missing := waitDelivered(wctx, sk, acceptedBefore(sends, time.Now()))
	wcancel()
	received, _ := sk.snapshot()
	c := tally(sends, received)
	var downTotal time.Duration
	for _, o := range outages {
		downTotal += o.up.Sub(o.down)
	}
	t.Logf("postgres immediate stop x%d (down %s in all): %s", crashes, downTotal.Round(time.Millisecond), c)
	t.Logf("database back to /healthz 200: median %s, max %s; to every earlier 2xx delivered: median %s, max %s",
		percentile(healthy, 0.5).Round(time.Millisecond), percentile(healthy, 1).Round(time.Millisecond),
		percentile(recoveries, 0.5).Round(time.Millisecond), percentile(recoveries, 1).Round(time.Millisecond))

	t.Logf("service log: %d times outcomes kept while the database was down, %d times kept outcomes written, %d outcomes dropped or skipped for a lost lease",
		svc.logCount("outcomes kept until it returns"), svc.logCount("kept outcomes written"),
		svc.logCount("outcomes dropped, lease lost")+svc.logCount("outcomes skipped, lease lost"))
	lostIDs := svc.leaseLostMessages()
	once, more := leaseLostCopies(lostIDs, sends, received)
	t.Logf("lease lost warnings: %d; their recipients reached the sink once: %d, more than once: %d",
		len(lostIDs), once, more)
	if len(missing) > 0 {
		t.Errorf("lost: %d accepted messages never delivered, e.g. %v", len(missing), firstN(missing, 5))
	}
	if c.duplicated > 0 {
		t.Errorf("%d duplicates: one instance must keep and write its outcomes, not send again", c.duplicated)
	}
	if c.other > 0 {
		t.Errorf("%d requests got an answer other than 2xx or 503: %v", c.other, otherAnswers(sends, 5))
	}
	// A request that began and ended while the database was down cannot
	// have been committed, so must not have been accepted; and the API
	// must have said 503 to some.
	var duringDown, unavailableDuringDown int
	for _, s := range sends {
		for _, o := range outages {
			if s.began.After(o.down) && s.ended.Before(o.up) {
				duringDown++
				switch s.outcome {
				case accepted:
					t.Errorf("request for %s was accepted while the database was down", s.rcpt)
				case unavailable:
					unavailableDuringDown++
				}
			}
		}
	}
	t.Logf("requests made entirely while the database was down: %d, answered 503/Unavailable: %d", duringDown, unavailableDuringDown)
	if duringDown > 0 && unavailableDuringDown == 0 {
		t.Errorf("no request made while the database was down was answered 503 / Unavailable")
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
