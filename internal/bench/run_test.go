package bench_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/bench"
	"github.com/posthaste/posthaste/internal/testenv"
)

// TestRunInProcess runs the whole harness against a real server and
// database, one message per call and in batches: every message must arrive
// exactly once and the report's counts must agree with each other. Timings
// are not asserted.
func TestRunInProcess(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		proto    string
		n, batch int
	}{{"rest", 50, 1}, {"grpc", 50, 1}, {"rest", 200, 10}, {"grpc", 200, 10}} {
		t.Run(fmt.Sprintf("%s batch %d", tt.proto, tt.batch), func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			proto, n := tt.proto, tt.n
			rep, err := bench.Run(ctx, bench.Config{
				DatabaseURL: testenv.Database(t),
				Proto:       proto,
				Messages:    n,
				Batch:       tt.batch,
				Concurrency: 4,
				Size:        512,
				Recipients:  2,
				Domains:     3,
				Timeout:     30 * time.Second,
				StatsSettle: -1,
			})
			if err != nil {
				t.Fatalf("run: %v (report %+v)", err, rep)
			}
			if rep.Mode != "in-process" || rep.Proto != proto {
				t.Errorf("mode %q proto %q", rep.Mode, rep.Proto)
			}
			if rep.Accepted != n || rep.Failed != 0 || len(rep.Errors) != 0 {
				t.Errorf("accepted %d, failed %d (%v); want %d, 0", rep.Accepted, rep.Failed, rep.Errors, n)
			}
			if rep.Delivered != n || rep.Missing != 0 || rep.RecipientsArrived != 2*n {
				t.Errorf("delivered %d, missing %d, recipients %d; want %d, 0, %d", rep.Delivered, rep.Missing, rep.RecipientsArrived, n, 2*n)
			}
			if rep.Duplicates != 0 || rep.Foreign != 0 || rep.ArrivedUnaccepted != 0 {
				t.Errorf("duplicates %d, foreign %d, arrived unaccepted %d; want none", rep.Duplicates, rep.Foreign, rep.ArrivedUnaccepted)
			}
			// Two recipients at one domain travel in one transaction.
			if rep.SinkMessages != n {
				t.Errorf("sink saw %d transactions, want %d", rep.SinkMessages, n)
			}
			// API latency counts calls.
			if rep.Batch != tt.batch || rep.APILatency.Count != n/tt.batch || rep.ToSinkLatency.Count != n {
				t.Errorf("batch %d, latency samples %d api, %d to sink; want %d, %d, %d", rep.Batch, rep.APILatency.Count, rep.ToSinkLatency.Count, tt.batch, n/tt.batch, n)
			}
			if rep.IntakeRate <= 0 || rep.EndToEndRate <= 0 {
				t.Errorf("intake %g, end to end %g: want positive rates", rep.IntakeRate, rep.EndToEndRate)
			}
			if rep.Server.CPUSeconds == nil || !rep.Server.IncludesHarness {
				t.Errorf("server cpu not measured in-process: %+v", rep.Server)
			}
		})
	}
}

func TestRunRefusesBadConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  bench.Config
		want string
	}{
		{"unknown proto", bench.Config{Proto: "pigeon"}, "Proto"},
		{"smtp without a relay", bench.Config{Proto: "smtp"}, "SMTPAddr"},
		{"batch over smtp", bench.Config{Proto: "smtp", SMTPAddr: "127.0.0.1:1", Batch: 2}, "Batch"},
		{"batch too large", bench.Config{Batch: 501}, "Batch"},
		{"external without a key", bench.Config{RESTURL: "http://127.0.0.1:1"}, "APIKey"},
		{"grpc without its address", bench.Config{RESTURL: "http://127.0.0.1:1", Proto: "grpc", APIKey: "k"}, "GRPCAddr"},
		{"negative messages", bench.Config{Messages: -1}, "Messages"},
		{"server pid in-process", bench.Config{ServerPID: 1}, "ServerPID"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := bench.Run(context.Background(), tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want+":") {
				t.Errorf("Run = %v, want an error naming %s", err, tt.want)
			}
		})
	}
}
