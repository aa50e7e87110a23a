package bench_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/bench"
	"github.com/posthaste/posthaste/internal/pgserver"
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
		{"pg_stat_statements with a database url", bench.Config{DatabaseURL: "postgres://127.0.0.1:1/x", PGStatStatements: true}, "PGStatStatements"},
		{"metrics url in-process", bench.Config{MetricsURL: "http://127.0.0.1:1/metrics"}, "MetricsURL"},
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

// TestRunQueueHealth checks the table sizes at the mark and at the end, the
// claim latency after the mark and the RSS series, on a real database.
func TestRunQueueHealth(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const n, mark = 80, 20
	rep, err := bench.Run(ctx, bench.Config{
		DatabaseURL:      testenv.Database(t),
		Messages:         n,
		Concurrency:      4,
		Rate:             400,
		Size:             512,
		HealthMark:       mark,
		Timeout:          30 * time.Second,
		StatsSettle:      -1,
		ProgressInterval: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("run: %v (report %+v)", err, rep)
	}
	q := rep.Queue
	if q == nil {
		t.Fatalf("no queue report; notes %q", rep.Notes)
	}
	if q.MarkMessages < mark || q.MarkMessages > n || q.MarkAtSeconds <= 0 {
		t.Errorf("mark at %d messages after %gs, want at least %d", q.MarkMessages, q.MarkAtSeconds, mark)
	}
	for _, table := range []string{"messages", "recipients", "attempts", "events"} {
		if q.MarkBytes[table] <= 0 || q.EndBytes[table] < q.MarkBytes[table] {
			t.Errorf("%s: %d bytes at the mark, %d at the end", table, q.MarkBytes[table], q.EndBytes[table])
		}
	}
	if q.GrowthRatio == nil || *q.GrowthRatio < 1 || q.EndTotalBytes < q.MarkTotalBytes {
		t.Errorf("total %d -> %d bytes, ratio %v", q.MarkTotalBytes, q.EndTotalBytes, q.GrowthRatio)
	}
	if c := q.Claim; c == nil || c.Count == 0 || c.Source != "in-process" || c.FromSeconds != q.MarkAtSeconds || c.P95LeMs == nil {
		t.Errorf("claim latency %+v: want claims counted from the mark", c)
	}
	m := rep.Server.Memory
	if m == nil {
		t.Fatalf("no memory series; notes %q", rep.Notes)
	}
	if len(m.Samples) < 3 || m.EarlyRSSBytes <= 0 || m.LatePeakRSSBytes <= 0 || m.LateFromSeconds <= m.EarlyAtSeconds {
		t.Errorf("memory %+v", m)
	}
	var text strings.Builder
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"hot tables", "claim round trip", "server rss"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, text.String())
		}
	}
}

// TestRunEmbeddedProfile runs against the embedded database started with
// pg_stat_statements: the report lists the server's statements.
func TestRunEmbeddedProfile(t *testing.T) {
	t.Parallel()
	if _, err := pgserver.FindBinDir(context.Background()); errors.Is(err, pgserver.ErrNoBinaries) {
		t.Skip("no PostgreSQL server binaries on this machine")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const n = 30
	rep, err := bench.Run(ctx, bench.Config{
		PGStatStatements: true,
		Statements:       3,
		Messages:         n,
		Concurrency:      4,
		Size:             256,
		Timeout:          30 * time.Second,
		StatsSettle:      -1,
	})
	if err != nil && strings.Contains(err.Error(), "pg_stat_statements") {
		t.Skipf("this PostgreSQL has no pg_stat_statements: %v", err)
	}
	if err != nil {
		t.Fatalf("run: %v (report %+v)", err, rep)
	}
	st := rep.Postgres.Statements
	if st == nil {
		t.Fatalf("no statement profile; notes %q", rep.Notes)
	}
	if len(st.Top) != 3 || st.Distinct < 3 || st.Database != "posthaste" {
		t.Fatalf("profile of %q: %d listed of %d", st.Database, len(st.Top), st.Distinct)
	}
	for _, s := range st.Top {
		if s.CallsPerMessage == nil || *s.CallsPerMessage <= 0 || s.Query == "" {
			t.Errorf("statement %+v", s)
		}
	}
	if rep.Queue == nil || rep.Queue.EndTotalBytes == 0 {
		t.Errorf("no table sizes from the embedded database: %+v", rep.Queue)
	}
	for _, note := range rep.Notes {
		if strings.Contains(note, "autovacuum") {
			t.Errorf("the embedded database runs without autovacuum: %s", note)
		}
	}
}
