package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/posthaste/posthaste/internal/bench"
)

const benchUsage = `Usage: posthaste bench [flags]            measure a Posthaste server
       posthaste bench sink [flags]       run only the SMTP sink, for other senders
       posthaste bench cpu PID...         print the CPU seconds of process trees

Without --rest-url or --grpc-addr (or with --start), bench starts Posthaste
in this process, routes every domain to its own SMTP sink, sends -n messages
and reports intake, delivery and end-to-end rates, latencies, the CPU, WAL
flushes and disk flushes per message, memory over the run, the queue's
health and, with pg_stat_statements, the statement profile. With --proto
smtp it starts no server and submits the messages over SMTP to the relay at
--smtp-addr (a local Postfix, say), which must relay them to the sink at
--sink-addr. Run
"posthaste bench -h" for flags.
`

// runBench dispatches "posthaste bench ...".
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	if len(args) > 0 {
		switch args[0] {
		case "sink":
			return runBenchSink(ctx, args[1:], stdout, stderr)
		case "cpu":
			return runBenchCPU(args[1:], stdout)
		case "help":
			fmt.Fprint(stdout, benchUsage)
			return nil
		}
	}
	fs := newFlagSet("bench", stderr)
	defer func() { err = placeSettings(fs, err) }()
	flagUsage := fs.Usage
	fs.Usage = func() {
		fmt.Fprint(stderr, benchUsage+"\n")
		flagUsage()
	}
	var (
		cfg        bench.Config
		start      bool
		asJSON     bool
		logLevel   string
		statements int
	)
	fs.BoolVar(&start, "start", false, "start Posthaste in this process, ignoring --rest-url and --grpc-addr from the environment (the default when no address is given)")
	fs.StringVar(&cfg.RESTURL, "rest-url", "", "base URL of a running server's REST API, e.g. http://127.0.0.1:8080")
	fs.StringVar(&cfg.GRPCAddr, "grpc-addr", "", "a running server's gRPC address, e.g. 127.0.0.1:9090")
	fs.StringVar(&cfg.APIKey, "api-key", "", "API key allowed to send; with --start it is also stored as the bootstrap key (default: a random one)")
	fs.StringVar(&cfg.DatabaseURL, "database-url", "", "PostgreSQL whose statistics are read; with --start also the database the server uses (default: embedded in a temporary directory)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "with --start and no --database-url: directory of the embedded database (default: a temporary one, removed afterwards)")
	fs.IntVar(&cfg.ServerPID, "server-pid", 0, "process id of a running server, for its CPU and memory")
	fs.StringVar(&cfg.MetricsURL, "metrics-url", "", "a running server's /metrics URL, for its claim latency, e.g. http://127.0.0.1:8080/metrics")
	fs.BoolVar(&cfg.PGStatStatements, "pg-stat-statements", false, "with --start and no --database-url: load pg_stat_statements in the embedded database, for the statement profile")
	fs.IntVar(&statements, "statements", bench.DefaultStatements, "list this many statements by execution time when the database has pg_stat_statements loaded (resets its counters at the start); 0 lists none")
	fs.IntVar(&cfg.HealthMark, "health-mark", 0, fmt.Sprintf("read the queue tables' sizes when this many messages are delivered, to compare with the end, and measure claim latency from then on (default %d, or n/20 when smaller); negative: neither", bench.DefaultHealthMark))
	fs.StringVar(&cfg.Proto, "proto", "rest", "rest, grpc, or smtp to submit to the relay at --smtp-addr instead of calling Posthaste")
	fs.StringVar(&cfg.SMTPAddr, "smtp-addr", "", "with --proto smtp: the relay to submit to, e.g. a Postfix at 127.0.0.1:2525, which must relay every message to --sink-addr")
	fs.IntVar(&cfg.Batch, "batch", 1, "messages per API call (SendBatch when above 1); -c then counts calls, --rate still messages")
	fs.IntVar(&cfg.Messages, "n", 1000, "messages to send")
	fs.IntVar(&cfg.Concurrency, "c", 10, "calls in flight at most")
	fs.Float64Var(&cfg.Rate, "rate", 0, "send this many messages per second (open loop) instead of as fast as -c callers can")
	fs.IntVar(&cfg.Size, "size", 2048, "text body size in bytes")
	fs.IntVar(&cfg.Recipients, "recipients", 1, "recipients per message")
	fs.IntVar(&cfg.Domains, "domains", 1, "spread recipients over this many .test domains")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", 30*time.Second, "deadline of one API call")
	fs.DurationVar(&cfg.Timeout, "timeout", 2*time.Minute, "how long to wait after the last call for the accepted messages to arrive")
	fs.StringVar(&cfg.SinkAddr, "sink-addr", "", "sink listen address (default 127.0.0.1:0 with --start, else "+bench.DefaultSinkAddr+", where a running server or the SMTP relay must deliver)")
	fs.IntVar(&cfg.DeliveryConcurrency, "delivery-concurrency", 0, "with --start: the server's --concurrency (default the server's)")
	fs.IntVar(&cfg.PerDomainConcurrency, "per-domain-concurrency", 0, "with --start: the server's --per-domain-concurrency (default the server's)")
	fs.DurationVar(&cfg.StatsSettle, "stats-settle", bench.DefaultStatsSettle, "wait this long after the last delivery before reading PostgreSQL's WAL counters, which backends report late; negative does not wait")
	fs.DurationVar(&cfg.ProgressInterval, "progress-interval", time.Second, "how often to print a progress line on stderr and sample the server's RSS; 0 prints none (and samples every second)")
	fs.BoolVar(&asJSON, "json", false, "print the report as JSON on stdout")
	fs.StringVar(&logLevel, "log-level", "error", "log level of the in-process server and the sink (debug, info, warn, error)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench: unexpected argument %q", fs.Arg(0))
	}
	// bench.Config reads zero as "the default"; on the command line a zero
	// is a mistake.
	for _, f := range []struct {
		name string
		v    int
	}{{"n", cfg.Messages}, {"c", cfg.Concurrency}, {"batch", cfg.Batch}, {"size", cfg.Size}, {"recipients", cfg.Recipients}, {"domains", cfg.Domains}} {
		if f.v < 1 {
			return fmt.Errorf("%s: must be at least 1, got %d", flagRef(f.name), f.v)
		}
	}
	if statements < 0 {
		return fmt.Errorf("%s: must not be negative, got %d", flagRef("statements"), statements)
	}
	// Zero in bench.Config is the default; on the command line it is none.
	cfg.Statements = statements
	if statements == 0 {
		cfg.Statements = -1
	}
	if start && cfg.Proto == "smtp" {
		return errors.New("bench: --start and --proto smtp exclude each other: over SMTP bench drives the relay at --smtp-addr")
	}
	if start {
		// Addresses from the environment belong to a server's own
		// configuration; only the command line conflicts with --start.
		for _, name := range []string{"rest-url", "grpc-addr", "server-pid", "metrics-url"} {
			if givenOnCommandLine(args, name) {
				return fmt.Errorf("bench: --start and --%s exclude each other", name)
			}
		}
		cfg.RESTURL, cfg.GRPCAddr, cfg.ServerPID, cfg.MetricsURL = "", "", 0, ""
	}
	logger, err := newLogger(stderr, logLevel, "text")
	if err != nil {
		return err
	}
	cfg.Logger = logger
	if cfg.ProgressInterval > 0 {
		cfg.Progress = stderr
	}
	rep, runErr := bench.Run(ctx, cfg)
	if rep != nil {
		if err := writeReport(stdout, rep, asJSON); err != nil {
			return errors.Join(runErr, err)
		}
	}
	if runErr != nil {
		return fmt.Errorf("bench: %w", benchConfigError(runErr))
	}
	return nil
}

func writeReport(w io.Writer, rep *bench.Report, asJSON bool) error {
	if !asJSON {
		return rep.WriteText(w)
	}
	if err := json.NewEncoder(w).Encode(rep); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// benchFlags maps bench.Config's fields to the flags that set them.
var benchFlags = map[string]string{
	"RESTURL":          "rest-url",
	"GRPCAddr":         "grpc-addr",
	"APIKey":           "api-key",
	"ServerPID":        "server-pid",
	"MetricsURL":       "metrics-url",
	"HealthMark":       "health-mark",
	"Statements":       "statements",
	"PGStatStatements": "pg-stat-statements",
	"Proto":            "proto",
	"SMTPAddr":         "smtp-addr",
	"Batch":            "batch",
	"Messages":         "n",
	"Concurrency":      "c",
	"Rate":             "rate",
	"Size":             "size",
	"Recipients":       "recipients",
	"Domains":          "domains",
	"RequestTimeout":   "request-timeout",
	"Timeout":          "timeout",
}

// benchConfigError names the flag behind a configuration error
// ("bench config: Messages: ..." becomes "-n (POSTHASTE_N): ...").
func benchConfigError(err error) error {
	rest, ok := strings.CutPrefix(err.Error(), "bench config: ")
	if !ok {
		return err
	}
	field, problem, ok := strings.Cut(rest, ": ")
	name, known := benchFlags[field]
	if !ok || !known {
		return err
	}
	return fmt.Errorf("%s: %s", flagRef(name), problem)
}

// givenOnCommandLine reports whether args set the flag name.
func givenOnCommandLine(args []string, name string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		a = strings.TrimLeft(a, "-")
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

// sinkResult is what "bench sink" prints.
type sinkResult struct {
	Addr       string  `json:"addr"`
	Messages   int     `json:"messages"`
	Recipients int     `json:"recipients"`
	Bytes      int64   `json:"bytes"`
	Complete   bool    `json:"complete"`
	First      string  `json:"first,omitempty"`
	Last       string  `json:"last,omitempty"`
	FirstUnix  float64 `json:"first_unix,omitempty"`
	LastUnix   float64 `json:"last_unix,omitempty"`
	Seconds    float64 `json:"seconds"`
	PerSec     float64 `json:"per_sec"`
}

// runBenchSink runs only the sink: the receiving end for a sender that is
// not driven by bench, such as Postfix fed by smtp-source.
func runBenchSink(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	fs := newFlagSet("bench sink", stderr)
	defer func() { err = placeSettings(fs, err) }()
	var (
		addr    string
		count   int
		timeout time.Duration
	)
	fs.StringVar(&addr, "addr", bench.DefaultSinkAddr, "listen address")
	fs.IntVar(&count, "count", 0, "exit after this many messages; 0 runs until --timeout or Ctrl-C")
	fs.DurationVar(&timeout, "timeout", 10*time.Minute, "exit after this long whatever arrived")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench sink: unexpected argument %q", fs.Arg(0))
	}
	if count < 0 {
		return fmt.Errorf("%s: must not be negative, got %d", flagRef("count"), count)
	}
	sink := bench.NewSink(bench.SinkConfig{Addr: addr})
	if err := sink.Start(ctx); err != nil {
		return err
	}
	defer sink.Stop()
	fmt.Fprintf(stderr, "sink listening on %s\n", sink.Addr())

	waitCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if count > 0 {
		_ = sink.WaitMessages(waitCtx, count)
	} else {
		<-waitCtx.Done()
	}
	sink.Stop()
	st := sink.Stats()
	res := sinkResult{
		Addr:       sink.Addr(),
		Messages:   st.Messages,
		Recipients: st.Recipients,
		Bytes:      st.Bytes,
		Complete:   count > 0 && st.Messages >= count,
	}
	if !st.First.IsZero() {
		res.First, res.Last = st.First.Format(time.RFC3339Nano), st.Last.Format(time.RFC3339Nano)
		res.FirstUnix = float64(st.First.UnixNano()) / 1e9
		res.LastUnix = float64(st.Last.UnixNano()) / 1e9
		d := st.Last.Sub(st.First)
		res.Seconds = d.Seconds()
		if d > 0 {
			res.PerSec = float64(st.Messages) / d.Seconds()
		}
	}
	if err := json.NewEncoder(stdout).Encode(res); err != nil {
		return fmt.Errorf("bench sink: write result: %w", err)
	}
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("bench sink: interrupted after %d messages", st.Messages)
	case count > 0 && !res.Complete:
		return fmt.Errorf("bench sink: %d of %d messages arrived within %s", st.Messages, count, timeout)
	}
	return nil
}

// runBenchCPU prints the CPU seconds (user + system) used so far by each
// process tree, exited descendants included, summed: a before and an after
// reading give what a forking server cost over an interval.
func runBenchCPU(args []string, stdout io.Writer) error {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprint(stdout, "Usage: posthaste bench cpu PID...\n\nPrints the CPU seconds used so far by the processes and all their descendants.\n")
		if len(args) == 0 {
			return errors.New("bench cpu: no process id given")
		}
		return nil
	}
	var total time.Duration
	for _, a := range args {
		pid, err := strconv.Atoi(a)
		if err != nil || pid < 1 {
			return fmt.Errorf("bench cpu: %q is not a process id", a)
		}
		cpu, err := bench.TreeCPU(pid)
		if err != nil {
			return fmt.Errorf("bench cpu: %w", err)
		}
		total += cpu
	}
	fmt.Fprintf(stdout, "%.2f\n", total.Seconds())
	return nil
}
