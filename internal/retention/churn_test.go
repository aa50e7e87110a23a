package retention_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/retention"
)

// hotTables are the tables whose size the churn benchmark follows.
var hotTables = []string{"messages", "recipients", "attempts", "events"}

// BenchmarkChurn pushes 200,000 messages through insert, claim and outcome
// (batches of 500 inserted, claimed 100 at a time as the dispatcher does,
// all delivered) while the janitor runs in the background with retention
// times of a second, and reports the size of the hot tables (indexes and
// TOAST included) after the first 10,000 messages and at the end, and the
// claim latency over the last tenth of the run. The webhook fan-out reads
// the feed between batches, as it does in a running process, so that the
// janitor may delete events.
//
//	go test -run '^$' -bench BenchmarkChurn -benchtime 1x ./internal/retention/
func BenchmarkChurn(b *testing.B) {
	const (
		total      = 200_000
		early      = 10_000
		insertSize = 500
		claimSize  = 100
	)
	for _, janitor := range []bool{true, false} {
		b.Run(fmt.Sprintf("janitor=%t", janitor), func(b *testing.B) {
			for b.Loop() {
				churn(b, janitor, total, early, insertSize, claimSize)
			}
		})
	}
}

// churn is one run of BenchmarkChurn; without the janitor, retention is
// off and nothing is vacuumed, for comparison.
func churn(b *testing.B, janitor bool, total, early, insertSize, claimSize int) {
	e := setup(b)
	ctx := context.Background()
	cfg := retention.Config{
		BodyRetention:    500 * time.Millisecond,
		MessageRetention: time.Second,
		Interval:         time.Second,
		// Every run vacuums: the server these figures come from runs
		// with autovacuum off, so the janitor's VACUUM is the only one.
		VacuumMinRows: 1,
		Logger:        slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	if !janitor {
		cfg.BodyRetention, cfg.MessageRetention, cfg.VacuumMinRows = -1, -1, -1
	}
	j := newJanitor(b, e.store, cfg)
	j.Start(ctx)

	var (
		done      int
		sizeEarly map[string]int64
		latencies []time.Duration
		owner     int
	)
	for done < total {
		insertAll(b, e.store, newMessages(b, insertSize))
		for claimed := 0; claimed < insertSize; {
			owner++
			start := time.Now()
			c, err := e.store.ClaimWithContents(ctx, db.ClaimParams{
				Owner: "churn-" + newID(b).String(), Limit: claimSize, LeaseFor: time.Minute,
			})
			if err != nil {
				b.Fatal(err)
			}
			if done >= total*9/10 {
				latencies = append(latencies, time.Since(start))
			}
			if len(c.Recipients) == 0 {
				b.Fatalf("claim found nothing with %d of %d left", insertSize-claimed, insertSize)
			}
			recordOutcomes(b, e.store, c.Recipients, db.StatusDelivered)
			claimed += len(c.Recipients)
		}
		if _, err := e.store.FanOutWebhooks(ctx, 2*insertSize*2); err != nil {
			b.Fatal(err)
		}
		done += insertSize
		if done == early {
			sizeEarly = settledSizes(b, e, j)
		}
	}
	sizeEnd := settledSizes(b, e, j)
	j.Stop()
	st := j.Stats()

	var totalEarly, totalEnd int64
	for _, table := range hotTables {
		totalEarly += sizeEarly[table]
		totalEnd += sizeEnd[table]
		b.Logf("%-10s after %d: %6d kB, after %d: %6d kB (%.2fx)", table, early, sizeEarly[table]/1024,
			total, sizeEnd[table]/1024, float64(sizeEnd[table])/float64(sizeEarly[table]))
	}
	slices.Sort(latencies)
	p50 := latencies[len(latencies)/2]
	p95 := latencies[len(latencies)*95/100]
	b.Logf("hot tables: %d kB -> %d kB (%.2fx); claim of %d over the last tenth: p50 %s, p95 %s (%d claims)",
		totalEarly/1024, totalEnd/1024, float64(totalEnd)/float64(totalEarly), claimSize,
		p50.Round(10*time.Microsecond), p95.Round(10*time.Microsecond), len(latencies))
	b.Logf("janitor: %d runs, %d failed; purged %d bodies, deleted %d messages, %d events in %d batches",
		st.Runs, st.Failed, st.Total.BodiesPurged, st.Total.Messages, st.Total.Events, st.Total.Batches)
	b.ReportMetric(float64(totalEnd)/float64(totalEarly), "growth")
	b.ReportMetric(float64(p95.Microseconds())/1000, "claim-p95-ms")
	if janitor && st.Total.Messages == 0 {
		b.Error("the janitor deleted nothing")
	}
}

// settledSizes waits for the janitor to finish its next run and then
// measures the hot tables, so that sizes are compared at the same point of
// the janitor's cycle: right after it deleted and vacuumed. Without the
// janitor (retention off) it measures at once.
func settledSizes(b *testing.B, e env, j *retention.Janitor) map[string]int64 {
	b.Helper()
	if j.Stats().Total.Messages > 0 || j.Stats().Total.BodiesPurged > 0 {
		runs := j.Stats().Runs + j.Stats().Skipped
		deadline := time.After(time.Minute)
		poll := time.NewTicker(10 * time.Millisecond)
		defer poll.Stop()
		for j.Stats().Runs+j.Stats().Skipped <= runs {
			select {
			case <-deadline:
				b.Fatal("no retention run within a minute")
			case <-poll.C:
			}
		}
	}
	return tableSizes(b, e)
}

func tableSizes(b *testing.B, e env) map[string]int64 {
	b.Helper()
	out := make(map[string]int64, len(hotTables))
	for _, table := range hotTables {
		out[table] = count(b, e.raw, `SELECT pg_total_relation_size($1::regclass)`, table)
	}
	return out
}
