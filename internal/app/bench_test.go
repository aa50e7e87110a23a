package app_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// BenchmarkSendMessageGRPC measures intake: validation, MIME building and
// the committed insert, over gRPC from parallel clients, while the
// dispatcher delivers to a loopback MX in the same process. The From
// domain is not verified (allowed), so nothing is signed.
func BenchmarkSendMessageGRPC(b *testing.B) {
	cfg := benchConfig(b)
	cfg.Service.AllowUnverifiedDomains = true
	benchSend(b, cfg, nil)
}

// BenchmarkSendMessageGRPCSigned is BenchmarkSendMessageGRPC with the From
// domain verified, so every message is signed with its RSA-2048 DKIM key:
// the difference is the cost of signing.
func BenchmarkSendMessageGRPCSigned(b *testing.B) {
	benchSigned(b, "rsa")
}

// BenchmarkSendMessageGRPCSignedEd25519 signs with an Ed25519 key.
func BenchmarkSendMessageGRPCSignedEd25519(b *testing.B) {
	benchSigned(b, "ed25519")
}

func benchSigned(b *testing.B, keyType string) {
	dns := testenv.StartDNS(b)
	kek, err := keyenc.Parse(keyenc.Generate())
	if err != nil {
		b.Fatal(err)
	}
	cfg := benchConfig(b)
	cfg.Service.KeyEncryptionKey = kek
	cfg.Delivery.DNSServer = dns.Addr
	benchSend(b, cfg, func(store *db.DB) {
		// The domain is added and verified as the API would, before the
		// clock starts.
		k, err := keyenc.New(kek)
		if err != nil {
			b.Fatal(err)
		}
		m := service.NewDomains(store, service.DomainsConfig{KEK: k, Resolver: dns.Resolver(), Hostname: "posthaste.test"})
		d, err := m.Add(context.Background(), uuid.Nil, service.AddDomainParams{Domain: "posthaste.test", KeyType: keyType, Selector: "bench"})
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range m.Records(d) {
			if r.Purpose == service.PurposeDKIM {
				dns.AddTXT(r.Name, r.Value)
			}
		}
		if d, err = m.Verify(context.Background(), uuid.Nil, d.ID); err != nil || d.VerifiedAt == nil {
			b.Fatalf("verify: %v", err)
		}
	})
}

func benchConfig(b *testing.B) app.Config {
	smtpSrv := testenv.StartSMTP(b)
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(b),
		BootstrapAPIKey: testKey,
	}
	cfg.Delivery.Routes = map[string]string{"*": smtpSrv.Addr}
	return cfg
}

// benchSend starts a process from cfg, runs prepare on its database, and
// sends messages from sender@posthaste.test in parallel.
func benchSend(b *testing.B, cfg app.Config, prepare func(*db.DB)) {
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
	if prepare != nil {
		store, err := db.Open(context.Background(), a.DatabaseURL())
		if err != nil {
			b.Fatal(err)
		}
		prepare(store)
		store.Close()
	}
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
