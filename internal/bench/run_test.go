package bench_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/bench"
	"github.com/posthaste/posthaste/internal/testenv"
)

// TestRunInProcess runs the whole harness against a real server and
// database: every message must arrive exactly once and the report's counts
// must agree with each other. Timings are not asserted.
func TestRunInProcess(t *testing.T) {
	t.Parallel()
	for _, proto := range []string{"rest", "grpc"} {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			const n = 50
			rep, err := bench.Run(ctx, bench.Config{
				DatabaseURL: testenv.Database(t),
				Proto:       proto,
				Messages:    n,
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
			if rep.APILatency.Count != n || rep.ToSinkLatency.Count != n {
				t.Errorf("latency samples %d api, %d to sink; want %d each", rep.APILatency.Count, rep.ToSinkLatency.Count, n)
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
		{"unknown proto", bench.Config{Proto: "smtp"}, "Proto"},
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
