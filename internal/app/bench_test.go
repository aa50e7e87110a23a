package app_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// BenchmarkSendMessageGRPC measures intake: validation, MIME building and
// the committed insert, over gRPC from parallel clients, while the
// dispatcher delivers to a loopback MX in the same process.
func BenchmarkSendMessageGRPC(b *testing.B) {
	smtpSrv := testenv.StartSMTP(b)
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(b),
		BootstrapAPIKey: testKey,
	}
	cfg.Delivery.Routes = map[string]string{"*": smtpSrv.Addr}
	// Tests send from domains nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
	a, err := app.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = a.Stop(ctx)
	}()
	conn, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	client := posthastev1.NewMailServiceClient(conn)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+testKey)
	req := &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: "sender@posthaste.test", Name: "Sender"},
		To:      []*posthastev1.Address{{Address: "alice@example.test"}},
		Subject: "Your receipt",
		Text:    "Thanks for your order. This is the plain text part of a typical receipt.",
		Html:    "<p>Thanks for your order. This is the <b>HTML</b> part of a typical receipt.</p>",
	}
	b.SetParallelism(8)
	before := a.IntakeStats()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := client.SendMessage(ctx, req); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	// The intake's transactions per message: below 1 when the group commit
	// shares commits between concurrent calls.
	after := a.IntakeStats()
	if n := after.Messages - before.Messages; n > 0 {
		b.ReportMetric(float64(after.Commits-before.Commits)/float64(n), "commits/msg")
	}
}
