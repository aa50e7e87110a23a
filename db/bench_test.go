package db_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
)

// BenchmarkClaimAndRecord measures the delivery hot path: claim a batch of
// due recipients and record an outcome with an attempt for each. Outcomes
// are deferrals that are due again at once, so the queue never runs dry and
// every iteration does the same work (while attempts and events grow, as in
// production).
func BenchmarkClaimAndRecord(b *testing.B) {
	for _, batch := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			env := setup(b)
			ctx := context.Background()
			const messages, perMessage = 20, 50
			for range messages {
				insert(b, env.db, newMessage(b, perMessage))
			}
			owner := 0
			walBefore, err := env.db.WALPosition(ctx)
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				owner++
				claimed, err := env.db.ClaimRecipients(ctx, db.ClaimParams{
					Owner: fmt.Sprintf("bench-%d", owner), Limit: batch, LeaseFor: time.Minute,
				})
				if err != nil {
					b.Fatal(err)
				}
				if len(claimed) != batch {
					b.Fatalf("claimed %d, want %d", len(claimed), batch)
				}
				now := time.Now()
				outcomes := make([]db.Outcome, len(claimed))
				for i, c := range claimed {
					outcomes[i] = db.Outcome{
						RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: db.StatusDeferred,
						NextAttemptAt: now.Add(-time.Second),
						Code:          451, EnhancedCode: "4.7.1", Text: "greylisted",
						Attempts: []db.NewAttempt{{StartedAt: now, Duration: 30 * time.Millisecond,
							MXHost: "mx." + c.Domain, IP: "127.0.0.1", TLS: true, TLSVersion: "TLS 1.3",
							Code: 451, EnhancedCode: "4.7.1", Text: "greylisted"}},
					}
				}
				applied, err := env.db.RecordOutcomes(ctx, outcomes)
				if err != nil {
					b.Fatal(err)
				}
				if len(applied) != batch {
					b.Fatalf("applied %d, want %d", len(applied), batch)
				}
			}
			b.ReportMetric(float64(owner*batch)/b.Elapsed().Seconds(), "recipients/s")
			walAfter, err := env.db.WALPosition(ctx)
			if err != nil {
				b.Fatal(err)
			}
			// The whole server's WAL: other work running at the same time
			// adds to it.
			b.ReportMetric(float64(walAfter-walBefore)/float64(owner*batch), "wal-B/rcpt")
		})
	}
}
