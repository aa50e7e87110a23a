package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/metrics"
	"github.com/posthaste/posthaste/internal/pgserver"
	"github.com/posthaste/posthaste/service"
)

// Run sends cfg.Messages messages, waits for them at the sink and returns
// the report. It stops everything it started before it returns, also when
// ctx is cancelled. The report is returned with an error too when the run
// got far enough to measure something: messages missing after the timeout,
// failed calls, or an interruption.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench config: %w", err)
	}
	r := &runner{cfg: cfg}
	defer r.stop()
	if err := r.setup(ctx); err != nil {
		return nil, err
	}
	return r.run(ctx)
}

// runner holds what one run started.
type runner struct {
	cfg     Config
	runID   string
	tracker *tracker
	sink    *Sink
	server  *app.App
	// embedded is the database the run started for its server.
	embedded *pgserver.Server
	tempDir  string
	sender   sender
	pg       *pgStats
	// claims reads the server's claim histogram; nil when not reachable.
	claims claimReader
	notes  []string

	// Filled while the run goes by the monitor (rss, rssErr) and at the
	// health mark (queue, markClaims); read once those have finished.
	rss        []RSSSample
	rssErr     error
	queue      QueueReport
	markClaims *histogram
	statements *StatementsReport
}

func (r *runner) setup(ctx context.Context) error {
	id := make([]byte, 4)
	if _, err := rand.Read(id); err != nil {
		return fmt.Errorf("run id: %w", err)
	}
	r.runID = "b" + hex.EncodeToString(id)
	r.tracker = newTracker(r.runID, r.cfg.Messages, r.cfg.Recipients)

	r.sink = NewSink(SinkConfig{Addr: r.cfg.SinkAddr, OnArrival: r.tracker.arrived, Logger: r.cfg.Logger.With("component", "sink")})
	if err := r.sink.Start(ctx); err != nil {
		return err
	}

	restURL, grpcAddr, key := r.cfg.RESTURL, r.cfg.GRPCAddr, r.cfg.APIKey
	if r.cfg.InProcess() {
		var err error
		if restURL, grpcAddr, key, err = r.startServer(ctx); err != nil {
			return err
		}
	} else if r.cfg.Proto == "smtp" {
		r.progress("sink listening on %s: the relay at %s must relay every message there", r.sink.Addr(), r.cfg.SMTPAddr)
	} else {
		r.progress("sink listening on %s: the server must run with --route '*=%s' (and --allow-unverified-domains, or a verified From domain)", r.sink.Addr(), r.sink.Addr())
		if r.cfg.MetricsURL != "" {
			r.claims = scrapeClaims(r.cfg.MetricsURL, r.cfg.RequestTimeout)
		}
	}

	tmpl := messageTemplate{from: "bench@sender.bench.test", text: bodyText(r.cfg.Size)}
	switch r.cfg.Proto {
	case "smtp":
		r.sender = newSMTPSender(r.cfg.SMTPAddr, r.cfg.Concurrency, r.cfg.RequestTimeout, tmpl)
	case "grpc":
		s, err := newGRPCSender(grpcAddr, key, tmpl)
		if err != nil {
			return err
		}
		r.sender = s
	default:
		r.sender = newRESTSender(restURL, key, r.cfg.Concurrency, r.cfg.RequestTimeout, tmpl)
	}
	checkCtx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	defer cancel()
	if err := r.sender.check(checkCtx); err != nil {
		if r.cfg.InProcess() && r.cfg.APIKey == "" {
			return fmt.Errorf("%w (the database already has API keys: pass one)", err)
		}
		return err
	}

	dbURL := r.cfg.DatabaseURL
	if r.server != nil {
		dbURL = r.server.DatabaseURL()
	}
	if dbURL == "" {
		r.notes = append(r.notes, "postgresql: not measured (no database URL given)")
		return nil
	}
	pg, err := openPGStats(ctx, dbURL)
	if err != nil {
		return err
	}
	r.pg = pg
	return nil
}

// startServer starts Posthaste in this process with every domain routed to
// the sink, and returns its addresses and API key.
func (r *runner) startServer(ctx context.Context) (restURL, grpcAddr, key string, err error) {
	key = r.cfg.APIKey
	if key == "" {
		b := make([]byte, 24)
		if _, err := rand.Read(b); err != nil {
			return "", "", "", fmt.Errorf("generate api key: %w", err)
		}
		key = "ph_bench_" + hex.EncodeToString(b)
	}
	dbURL := r.cfg.DatabaseURL
	if dbURL == "" {
		if dbURL, err = r.startDatabase(ctx); err != nil {
			return "", "", "", err
		}
	} else {
		r.progress("starting Posthaste in-process (database: %s)", dbURL)
	}
	m := metrics.New()
	r.claims = func(context.Context) (histogram, error) {
		families, err := m.Registry().Gather()
		if err != nil {
			return histogram{}, fmt.Errorf("gather metrics: %w", err)
		}
		return gatherClaims(families)
	}
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     dbURL,
		Metrics:         m,
		BootstrapAPIKey: key,
		ShutdownTimeout: 10 * time.Second,
		Logger:          r.cfg.Logger.With("component", "server"),
		// The harness sends from a domain nobody verified, unsigned, as
		// the figures in docs/benchmarks.md were measured.
		Service: service.Config{AllowUnverifiedDomains: true},
		Delivery: delivery.Config{
			Routes:               map[string]string{"*": r.sink.Addr()},
			Concurrency:          r.cfg.DeliveryConcurrency,
			PerDomainConcurrency: r.cfg.PerDomainConcurrency,
		},
	}
	a, err := app.New(cfg)
	if err != nil {
		return "", "", "", fmt.Errorf("in-process server: %w", err)
	}
	if err := a.Start(ctx); err != nil {
		return "", "", "", fmt.Errorf("start in-process server: %w", err)
	}
	r.server = a
	return "http://" + a.HTTPAddr(), a.GRPCAddr(), key, nil
}

// startDatabase starts the in-process server's embedded PostgreSQL, laid
// out as the server's own (DataDir/postgres), and returns its URL. The
// run starts it rather than the server so that it can pass settings.
// Autovacuum keeps PostgreSQL's default (on): the queue's table sizes are
// measured as a production server would keep them.
func (r *runner) startDatabase(ctx context.Context) (string, error) {
	dataDir := r.cfg.DataDir
	if dataDir == "" {
		var err error
		if dataDir, err = os.MkdirTemp("", "posthaste-bench-"); err != nil {
			return "", fmt.Errorf("embedded database directory: %w", err)
		}
		r.tempDir = dataDir
		// Run as root, the database runs as another user that must be able
		// to enter the directory.
		if err := os.Chmod(dataDir, 0o755); err != nil {
			return "", fmt.Errorf("embedded database directory: %w", err)
		}
	}
	var settings map[string]string
	if r.cfg.PGStatStatements {
		settings = map[string]string{
			"shared_preload_libraries": "pg_stat_statements",
			"pg_stat_statements.track": "top",
		}
	}
	r.progress("starting Posthaste in-process (database: embedded in %s)", dataDir)
	srv, err := pgserver.Start(ctx, pgserver.Config{
		DataDir:  filepath.Join(dataDir, "postgres"),
		Settings: settings,
		Logger:   r.cfg.Logger.With("component", "postgres"),
	})
	if err != nil {
		return "", fmt.Errorf("start embedded database: %w", err)
	}
	r.embedded = srv
	return srv.URL(), nil
}

// stop stops whatever setup started, in reverse order.
func (r *runner) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	if r.pg != nil {
		if err := r.pg.close(ctx); err != nil {
			r.cfg.Logger.Warn("stop", "err", err)
		}
	}
	if r.sender != nil {
		if err := r.sender.close(); err != nil {
			r.cfg.Logger.Warn("stop", "err", err)
		}
	}
	if r.server != nil {
		if err := r.server.Stop(ctx); err != nil {
			r.cfg.Logger.Warn("stop in-process server", "err", err)
		}
	}
	if r.embedded != nil {
		if err := r.embedded.Stop(ctx); err != nil {
			r.cfg.Logger.Warn("stop embedded database", "err", err)
		}
	}
	if r.sink != nil {
		r.sink.Stop()
	}
	if r.tempDir != "" {
		if err := os.RemoveAll(r.tempDir); err != nil {
			r.cfg.Logger.Warn("remove embedded database directory", "err", err)
		}
	}
}

func (r *runner) progress(format string, args ...any) {
	if r.cfg.Progress != nil {
		fmt.Fprintf(r.cfg.Progress, format+"\n", args...)
	}
}

// sample is one message's outcome.
type sample struct {
	sent    bool
	latency time.Duration
	err     error
	// timed marks the one sample per successful call that carries the
	// call's latency.
	timed bool
}

// costs is one reading of what the server and the database have used.
type costs struct {
	serverCPU *time.Duration
	pg        pgSnapshot
}

// readProcesses reads the counters of processes and disks into c.
func (r *runner) readProcesses(c *costs) {
	if pid := r.serverPID(); pid != 0 {
		if cpu, err := ProcessCPU(pid); err == nil {
			c.serverCPU = &cpu
		} else {
			r.note("server cpu: %v", err)
		}
	}
	if r.pg != nil {
		r.pg.readProcesses(&c.pg)
	}
}

// readWAL reads PostgreSQL's WAL counters into c.
func (r *runner) readWAL(ctx context.Context, c *costs) {
	if r.pg != nil {
		r.pg.readWAL(ctx, &c.pg)
	}
}

func (r *runner) serverPID() int {
	if r.server != nil {
		return os.Getpid()
	}
	return r.cfg.ServerPID
}

func (r *runner) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func (r *runner) run(ctx context.Context) (*Report, error) {
	cfg := r.cfg
	if pid := r.serverPID(); pid != 0 {
		if err := resetPeakRSS(pid); err != nil {
			r.note("peak rss is the process's peak since it started: %v", err)
		}
	} else {
		r.note("server cpu and memory: not measured (give the server's pid)")
	}
	profile := r.pg != nil && cfg.Statements > 0 && r.pg.resetStatements(ctx)
	var startClaims *histogram
	if r.claims != nil && cfg.HealthMark > 0 {
		if h, err := r.claims(ctx); err == nil {
			startClaims = &h
		} else {
			r.note("claim latency: %v", err)
			r.claims = nil
		}
	}
	var before, after costs
	r.readWAL(ctx, &before)
	r.readProcesses(&before)

	samples := make([]sample, cfg.Messages)
	var done atomic.Int64
	progressCtx, stopProgress := context.WithCancel(ctx)
	var watchers sync.WaitGroup
	start := time.Now()
	watchers.Go(func() { r.monitor(progressCtx, start, &done) })
	if cfg.HealthMark > 0 && (r.pg != nil || r.claims != nil) {
		mark := r.tracker.whenCompleted(cfg.HealthMark)
		watchers.Go(func() { r.atMark(progressCtx, start, mark) })
	}

	r.generate(ctx, start, samples, &done)
	loadEnd := time.Now()

	// Wait for every accepted message at the sink, up to the timeout.
	var timedOut bool
	waitCtx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	for {
		outstanding, changed := r.tracker.state()
		if outstanding == 0 {
			break
		}
		select {
		case <-changed:
			continue
		case <-waitCtx.Done():
			timedOut = ctx.Err() == nil
		}
		break
	}
	cancel()
	stopProgress()
	watchers.Wait()
	end := time.Now()
	if pid := r.serverPID(); pid != 0 && r.rssErr == nil {
		r.sampleRSS(pid, start)
	}
	if r.rssErr != nil {
		r.note("server rss over time: %v", r.rssErr)
	}

	// CPU and disk counters are current, so they are read at once: the
	// settling time below would only add idle work and, on a shared
	// server, other clients' work. So are table sizes and claim counts.
	r.readProcesses(&after)
	endCtx, cancelEnd := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	r.readQueueEnd(endCtx, start, end, startClaims)
	cancelEnd()
	if cfg.StatsSettle > 0 && ctx.Err() == nil && r.pg != nil {
		r.progress("waiting %s for PostgreSQL to report its WAL statistics", cfg.StatsSettle)
		select {
		case <-time.After(cfg.StatsSettle):
		case <-ctx.Done():
		}
	}
	// Read with a fresh context so that an interrupted run still reports
	// what it measured.
	readCtx, cancelRead := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	r.readWAL(readCtx, &after)
	if profile {
		accepted := r.tracker.tally().accepted
		if st, err := r.pg.topStatements(readCtx, cfg.Statements, accepted); err == nil {
			r.statements = st
		} else {
			r.note("statements: %v", err)
		}
	}
	cancelRead()

	rep := r.report(start, loadEnd, samples, before, after)
	rep.TimedOut = timedOut
	rep.Interrupted = ctx.Err() != nil

	var errs []error
	if rep.Interrupted {
		errs = append(errs, fmt.Errorf("interrupted: %w", ctx.Err()))
	} else if rep.Failed > 0 {
		// Calls cut by an interruption are in the report, not an error.
		errs = append(errs, fmt.Errorf("%d of %d calls failed", rep.Failed, rep.Messages))
	}
	if rep.Missing > 0 && !rep.Interrupted {
		hint := ""
		switch {
		case cfg.Proto == "smtp":
			hint = fmt.Sprintf(" (does the relay at %s relay every message to the sink at %s?)", cfg.SMTPAddr, r.sink.Addr())
		case !cfg.InProcess():
			hint = fmt.Sprintf(" (does the server route every domain to the sink, --route '*=%s'?)", r.sink.Addr())
		}
		errs = append(errs, fmt.Errorf("%d accepted messages did not arrive within %s%s", rep.Missing, cfg.Timeout, hint))
	}
	if len(errs) == 0 {
		return rep, nil
	}
	if len(errs) == 1 {
		return rep, errs[0]
	}
	return rep, fmt.Errorf("%w; %w", errs[0], errs[1])
}

// generate sends every message, in a closed loop or at cfg.Rate, and
// records each call in samples.
func (r *runner) generate(ctx context.Context, start time.Time, samples []sample, done *atomic.Int64) {
	cfg := r.cfg
	// Call i carries the i-th group of cfg.Batch messages.
	calls := (cfg.Messages + cfg.Batch - 1) / cfg.Batch
	call := func(i int, due time.Time) {
		done.Add(int64(r.callMessages(ctx, i, due, samples)))
	}

	var wg sync.WaitGroup
	if cfg.Rate <= 0 {
		// Closed loop: each caller makes the next call when its last one
		// was answered.
		var next atomic.Int64
		for range cfg.Concurrency {
			wg.Go(func() {
				for {
					i := int(next.Add(1) - 1)
					if i >= calls || ctx.Err() != nil {
						return
					}
					call(i, time.Now())
				}
			})
		}
		wg.Wait()
		return
	}

	// Open loop: message i is due at start + i/rate whatever happened to
	// the ones before, with at most Concurrency calls in flight; a call is
	// due with its first message.
	slots := make(chan struct{}, cfg.Concurrency)
	interval := float64(time.Second) * float64(cfg.Batch) / cfg.Rate
	timer := time.NewTimer(0)
	defer timer.Stop()
	for i := range calls {
		due := start.Add(time.Duration(float64(i) * interval))
		if d := time.Until(due); d > 0 {
			timer.Reset(d)
			select {
			case <-timer.C:
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-slots }()
			call(i, due)
		})
	}
	wg.Wait()
}

// monitor samples the server's RSS and writes a progress line per
// interval until ctx ends.
func (r *runner) monitor(ctx context.Context, start time.Time, done *atomic.Int64) {
	pid := r.serverPID()
	if pid != 0 {
		r.sampleRSS(pid, start)
	}
	t := time.NewTicker(r.cfg.ProgressInterval)
	defer t.Stop()
	last, lastArrived := int64(0), 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rss := ""
		if pid != 0 && r.rssErr == nil {
			if r.sampleRSS(pid, start) {
				rss = ", rss " + mib(&r.rss[len(r.rss)-1].Bytes)
			}
		}
		if r.cfg.Progress == nil {
			continue
		}
		n := done.Load()
		arrived := r.sink.Stats().Messages
		secs := r.cfg.ProgressInterval.Seconds()
		r.progress("[%6.1fs] answered %d/%d (%.0f/s), at sink %d (%.0f/s)%s",
			time.Since(start).Seconds(), n, r.cfg.Messages, float64(n-last)/secs, arrived, float64(arrived-lastArrived)/secs, rss)
		last, lastArrived = n, arrived
	}
}

// sampleRSS appends a reading of the server's RSS. It reports whether it
// got one; after a failure (the process is gone, or not ours to read) it
// keeps the error and sampling stops.
func (r *runner) sampleRSS(pid int, start time.Time) bool {
	b, err := CurrentRSS(pid)
	if err != nil {
		r.rssErr = err
		return false
	}
	r.rss = append(r.rss, RSSSample{Seconds: time.Since(start).Seconds(), Bytes: b})
	return true
}

// atMark reads the hot tables' sizes and the claim histogram once mark is
// closed: the baseline of the queue's health.
func (r *runner) atMark(ctx context.Context, start time.Time, mark <-chan struct{}) {
	select {
	case <-mark:
	case <-ctx.Done():
		// The last delivery can both reach the mark and end the run.
		select {
		case <-mark:
		default:
			return
		}
	}
	q := &r.queue
	q.MarkMessages = r.tracker.completedCount()
	q.MarkAtSeconds = time.Since(start).Seconds()
	// The run may end right after the mark: the readings still finish.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if r.pg != nil {
		sizes, total, err := r.pg.tableSizes(ctx)
		if err != nil {
			r.pg.note("queue health: %v", err)
		} else {
			q.MarkBytes, q.MarkTotalBytes = sizes, total
		}
	}
	if r.claims != nil {
		if h, err := r.claims(ctx); err == nil {
			r.markClaims = &h
		}
	}
}

// readQueueEnd reads the hot tables' sizes and the claims at the end, and
// completes the queue report.
func (r *runner) readQueueEnd(ctx context.Context, start, end time.Time, startClaims *histogram) {
	if r.cfg.HealthMark <= 0 {
		return
	}
	q := &r.queue
	if r.pg != nil {
		if q.MarkBytes == nil {
			r.note("queue health: the table sizes at the mark (%d messages delivered) were not read", r.cfg.HealthMark)
		}
		if sizes, total, err := r.pg.tableSizes(ctx); err != nil {
			r.note("queue health: %v", err)
		} else {
			q.EndBytes, q.EndTotalBytes = sizes, total
			if q.MarkTotalBytes > 0 {
				g := float64(total) / float64(q.MarkTotalBytes)
				q.GrowthRatio = &g
			}
		}
		if av, err := r.pg.autovacuum(ctx); err != nil {
			r.note("queue health: %v", err)
		} else if av != "on" {
			r.note("queue health: autovacuum is %s on this server, so dead rows are not reclaimed and the tables grow more than they would in production", av)
		}
	}
	if r.claims == nil {
		if !r.cfg.InProcess() && r.cfg.MetricsURL == "" {
			r.note("claim latency: not measured (give the server's /metrics URL)")
		}
		return
	}
	from, fromAt := startClaims, 0.0
	if r.markClaims != nil {
		from, fromAt = r.markClaims, q.MarkAtSeconds
	}
	to, err := r.claims(ctx)
	if err != nil {
		r.note("claim latency: %v", err)
		return
	}
	c, err := claimLatency(*from, to)
	if err != nil {
		r.note("claim latency: %v", err)
		return
	}
	c.Source = "in-process"
	if r.cfg.MetricsURL != "" {
		c.Source = r.cfg.MetricsURL
	}
	c.FromSeconds, c.ToSeconds = fromAt, end.Sub(start).Seconds()
	q.Claim = c
}

// report computes the figures of a finished run.
func (r *runner) report(start, loadEnd time.Time, samples []sample, before, after costs) *Report {
	cfg := r.cfg
	c := r.tracker.tally()
	sinkStats := r.sink.Stats()
	rep := &Report{
		Mode:              "external",
		Proto:             cfg.Proto,
		RunID:             r.runID,
		Messages:          cfg.Messages,
		Concurrency:       cfg.Concurrency,
		Batch:             cfg.Batch,
		Rate:              cfg.Rate,
		SizeBytes:         cfg.Size,
		Recipients:        cfg.Recipients,
		Domains:           cfg.Domains,
		SinkAddr:          r.sink.Addr(),
		Accepted:          c.accepted,
		Delivered:         c.delivered,
		Missing:           c.accepted - c.delivered,
		RecipientsArrived: c.recipientsArrived,
		Duplicates:        c.duplicates,
		ArrivedUnaccepted: c.deliveredUnaccepted,
		Foreign:           c.foreign,
		SinkMessages:      sinkStats.Messages,
		SinkBytes:         sinkStats.Bytes,
	}
	if cfg.Proto == "smtp" {
		rep.Mode, rep.SMTPAddr = "relay", cfg.SMTPAddr
	}
	if r.server != nil {
		rep.Mode = "in-process"
		rep.Server.IncludesHarness = true
		r.note("in-process: server cpu and peak rss include the load generator and the sink; drive a separate server with --server-pid for the server alone")
	}

	latencies, failed, kinds := tallySamples(samples)
	rep.Failed, rep.Errors = failed, kinds
	rep.APILatency = summarize(latencies)
	rep.ToSinkLatency = summarize(c.toSink)

	load := loadEnd.Sub(start)
	rep.LoadSeconds = load.Seconds()
	rep.IntakeRate = rate(c.accepted, load)
	if !c.firstArrival.IsZero() && c.lastCompletion.After(c.firstArrival) {
		d := c.lastCompletion.Sub(c.firstArrival)
		rep.DeliverySeconds = d.Seconds()
		rep.DeliveryRate = rate(c.delivered, d)
	}
	if !c.lastCompletion.IsZero() {
		d := c.lastCompletion.Sub(start)
		rep.EndToEndSeconds = d.Seconds()
		rep.EndToEndRate = rate(c.delivered, d)
	}

	perMessage := per(c.accepted)
	rep.Server.PID = r.serverPID()
	if before.serverCPU != nil && after.serverCPU != nil {
		s := (*after.serverCPU - *before.serverCPU).Seconds()
		rep.Server.CPUSeconds, rep.Server.CPUPerMessage = &s, perMessage(s)
	}
	if pid := r.serverPID(); pid != 0 {
		if rss, err := PeakRSS(pid); err == nil {
			rep.Server.PeakRSSBytes = &rss
		} else {
			r.note("server peak rss: %v", err)
		}
	}
	if r.pg != nil {
		rep.Postgres.PostmasterPID = r.pg.postmaster
		b, a := before.pg, after.pg
		if b.cpu != nil && a.cpu != nil {
			s := (*a.cpu - *b.cpu).Seconds()
			rep.Postgres.CPUSeconds, rep.Postgres.CPUPerMessage = &s, perMessage(s)
		}
		if b.walSync != nil && a.walSync != nil {
			syncs, writes := *a.walSync-*b.walSync, *a.walWrite-*b.walWrite
			rep.Postgres.WALSyncs, rep.Postgres.WALWrites = &syncs, &writes
			rep.Postgres.WALSyncsPerMessage = perMessage(float64(syncs))
			rep.Postgres.WALBytesPerMessage = perMessage(float64(*a.walBytes - *b.walBytes))
		}
		if b.flushes != nil && a.flushes != nil {
			f := *a.flushes - *b.flushes
			rep.Postgres.DiskDevice, rep.Postgres.DiskFlushes = a.disk, &f
			rep.Postgres.DiskFlushesPerMessage = perMessage(float64(f))
		}
		rep.Postgres.Statements = r.statements
		r.notes = append(r.notes, r.pg.notes...)
	}
	rep.Server.Memory = summarizeMemory(r.rss, cfg.ProgressInterval)
	if rep.Server.Memory == nil && r.serverPID() != 0 && r.rssErr == nil {
		r.note("server rss over time: %d sample(s), too few to compare (a longer run, or a shorter --progress-interval)", len(r.rss))
	}
	if cfg.HealthMark > 0 && (r.queue.EndBytes != nil || r.queue.Claim != nil) {
		q := r.queue
		rep.Queue = &q
	}
	rep.Notes = r.notes
	return rep
}
