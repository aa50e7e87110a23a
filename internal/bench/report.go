package bench

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
)

// Report is the outcome of a run. Rates are per second; "per message"
// figures divide by the accepted messages. A nil pointer was not measured
// (Notes says why).
type Report struct {
	// Mode is "in-process", "external" or, with Proto "smtp", "relay".
	Mode  string `json:"mode"`
	Proto string `json:"proto"`
	// SMTPAddr is the relay's address with Proto "smtp".
	SMTPAddr string `json:"smtp_addr,omitempty"`
	// RunID prefixes every recipient's local part and IDHeader's value.
	RunID       string  `json:"run_id"`
	Messages    int     `json:"messages"`
	Concurrency int     `json:"concurrency"`
	Rate        float64 `json:"rate,omitempty"`
	SizeBytes   int     `json:"size_bytes"`
	Recipients  int     `json:"recipients_per_message"`
	Domains     int     `json:"domains"`
	SinkAddr    string  `json:"sink_addr"`

	// Batch is how many messages each API call carried (the last one
	// fewer); Concurrency and APILatency then count calls.
	Batch int `json:"batch"`

	// Accepted counts calls answered with success (2xx, gRPC OK): the
	// message is committed to the outbox.
	Accepted int `json:"accepted"`
	// Failed counts the other calls; Errors splits them by kind.
	Failed int            `json:"failed"`
	Errors map[string]int `json:"errors,omitempty"`

	// Delivered counts accepted messages whose every recipient arrived at
	// the sink; Missing those that did not within the timeout.
	Delivered int `json:"delivered"`
	Missing   int `json:"missing"`
	// RecipientsArrived counts distinct recipients of this run that
	// arrived; Duplicates the arrivals of a recipient beyond its first
	// (delivery is at least once); ArrivedUnaccepted messages that arrived
	// though their call failed (a timeout after the commit); Foreign the
	// recipients at the sink that are not this run's (e.g. a previous
	// run's leftovers).
	RecipientsArrived int `json:"recipients_arrived"`
	Duplicates        int `json:"duplicates"`
	ArrivedUnaccepted int `json:"arrived_unaccepted"`
	Foreign           int `json:"foreign"`
	// SinkMessages and SinkBytes are what the sink accepted in all, as
	// SMTP transactions.
	SinkMessages int   `json:"sink_messages"`
	SinkBytes    int64 `json:"sink_bytes"`
	// TimedOut is set when the wait for deliveries hit Config.Timeout,
	// Interrupted when the run was cancelled.
	TimedOut    bool `json:"timed_out"`
	Interrupted bool `json:"interrupted"`

	// LoadSeconds runs from the first call to the last answer; IntakeRate
	// is Accepted over it.
	LoadSeconds float64 `json:"load_seconds"`
	IntakeRate  float64 `json:"intake_per_sec"`
	// DeliverySeconds runs from the first to the last arrival at the sink;
	// DeliveryRate is Delivered over it: how fast the server delivers once
	// it has work.
	DeliverySeconds float64 `json:"delivery_seconds"`
	DeliveryRate    float64 `json:"delivery_per_sec"`
	// EndToEndSeconds runs from the first call to the last message's
	// arrival; EndToEndRate is Delivered over it: the throughput a client
	// sees for "sent and delivered".
	EndToEndSeconds float64 `json:"end_to_end_seconds"`
	EndToEndRate    float64 `json:"end_to_end_per_sec"`

	// APILatency is the duration of the successful calls (from when they
	// were due, with Rate): one per call, whatever Batch is; with Proto
	// "smtp", from MAIL to the reply to the end of the data.
	APILatency Latency `json:"api_latency"`
	// ToSinkLatency runs from a call's success at the client to the
	// arrival of the message's last recipient at the sink.
	ToSinkLatency Latency `json:"to_sink_latency"`

	Server   ServerReport   `json:"server"`
	Postgres PostgresReport `json:"postgres"`
	// Queue is the outbox's health; nil when neither the database nor the
	// server's metrics could be read, or with a negative HealthMark.
	Queue *QueueReport `json:"queue,omitempty"`

	// Notes say what was not measured, and caveats of what was.
	Notes []string `json:"notes,omitempty"`
}

// ServerReport is what the Posthaste process cost.
type ServerReport struct {
	// PID is the measured process, 0 when none.
	PID int `json:"pid,omitempty"`
	// IncludesHarness is set for an in-process server: the figures then
	// include the load generator and the sink.
	IncludesHarness bool `json:"includes_harness"`
	// CPUSeconds is user + system time of the process over the run (from
	// just before the first call to after the last arrival).
	CPUSeconds    *float64 `json:"cpu_seconds"`
	CPUPerMessage *float64 `json:"cpu_seconds_per_message"`
	// PeakRSSBytes is the process's VmHWM at the end, reset at the start
	// when permitted.
	PeakRSSBytes *int64 `json:"peak_rss_bytes"`
	// Memory is the RSS sampled every progress interval; nil when not
	// measured or too short a run.
	Memory *MemoryReport `json:"memory,omitempty"`
}

// PostgresReport is what the database server did over the run. Every
// figure is cluster-wide: other work on the same server counts too.
type PostgresReport struct {
	// PostmasterPID is the root of the measured process tree.
	PostmasterPID int `json:"postmaster_pid,omitempty"`
	// CPUSeconds is user + system time of the postmaster and every
	// descendant, exited ones included.
	CPUSeconds    *float64 `json:"cpu_seconds"`
	CPUPerMessage *float64 `json:"cpu_seconds_per_message"`
	// WALSyncs is pg_stat_wal.wal_sync's increase: how often WAL was
	// flushed to disk (fsync/fdatasync), by backends at commit and by the
	// WAL writer.
	WALSyncs           *int64   `json:"wal_syncs"`
	WALSyncsPerMessage *float64 `json:"wal_syncs_per_message"`
	// WALWrites is pg_stat_wal.wal_write's increase.
	WALWrites *int64 `json:"wal_writes"`
	// WALBytesPerMessage is the WAL generated (LSN distance) per message.
	WALBytesPerMessage *float64 `json:"wal_bytes_per_message"`
	// DiskDevice is the block device of the data directory; DiskFlushes
	// its completed flush requests (/proc/diskstats), from every process.
	DiskDevice            string   `json:"disk_device,omitempty"`
	DiskFlushes           *int64   `json:"disk_flushes"`
	DiskFlushesPerMessage *float64 `json:"disk_flushes_per_message"`
	// Statements is the statement profile; nil when pg_stat_statements
	// was not available (Notes says why) or not asked for.
	Statements *StatementsReport `json:"statements,omitempty"`
}

// WriteText writes the report for people.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	load := fmt.Sprintf("-n %d -c %d", r.Messages, r.Concurrency)
	if r.Rate > 0 {
		load += fmt.Sprintf(" --rate %g", r.Rate)
	}
	if r.Batch > 1 {
		load += fmt.Sprintf(" --batch %d", r.Batch)
	}
	if r.SMTPAddr != "" {
		load += " via " + r.SMTPAddr
	}
	p("posthaste bench: %s server, %s, %s, %d-byte body, %d recipient(s) per message over %d domain(s), run %s",
		r.Mode, r.Proto, load, r.SizeBytes, r.Recipients, r.Domains, r.RunID)
	p("")
	p("  accepted            %d of %d (%d failed)", r.Accepted, r.Messages, r.Failed)
	for _, k := range slices.Sorted(maps.Keys(r.Errors)) {
		p("    %-18s %d", k, r.Errors[k])
	}
	p("  delivered           %d (missing %d, duplicate recipients %d, arrived though refused %d, foreign %d)",
		r.Delivered, r.Missing, r.Duplicates, r.ArrivedUnaccepted, r.Foreign)
	p("  intake              %8.1f msg/s  over %.2fs", r.IntakeRate, r.LoadSeconds)
	p("  delivery at sink    %8.1f msg/s  over %.2fs (first to last arrival)", r.DeliveryRate, r.DeliverySeconds)
	p("  end to end          %8.1f msg/s  over %.2fs (first call to last arrival)", r.EndToEndRate, r.EndToEndSeconds)
	p("  %-19s p50 %s  p90 %s  p99 %s  max %s", r.callLatencyLabel(),
		ms(r.APILatency.P50Ms), ms(r.APILatency.P90Ms), ms(r.APILatency.P99Ms), ms(r.APILatency.MaxMs))
	p("  accepted -> sink    p50 %s  p99 %s  max %s",
		ms(r.ToSinkLatency.P50Ms), ms(r.ToSinkLatency.P99Ms), ms(r.ToSinkLatency.MaxMs))
	who := "server"
	if r.Server.IncludesHarness {
		who = "server+harness"
	}
	p("  %-19s %s CPU per msg (%s s in all), peak RSS %s", who+" cpu",
		perMsg(r.Server.CPUPerMessage, 1e3, " ms"), num(r.Server.CPUSeconds), mib(r.Server.PeakRSSBytes))
	p("  postgresql cpu      %s CPU per msg (%s s in all)", perMsg(r.Postgres.CPUPerMessage, 1e3, " ms"), num(r.Postgres.CPUSeconds))
	p("  wal syncs           %s per msg (%s in all), %s WAL bytes per msg",
		perMsg(r.Postgres.WALSyncsPerMessage, 1, ""), inum(r.Postgres.WALSyncs), whole(r.Postgres.WALBytesPerMessage))
	p("  disk flushes        %s per msg (%s in all, device %s)",
		perMsg(r.Postgres.DiskFlushesPerMessage, 1, ""), inum(r.Postgres.DiskFlushes), orNA(r.Postgres.DiskDevice))
	if m := r.Server.Memory; m != nil {
		p("  server rss          %s at %.0fs, peak %s after %.0fs: %+.1f MiB (%+.1f%%) over %d samples",
			mib(&m.EarlyRSSBytes), m.EarlyAtSeconds, mib(&m.LatePeakRSSBytes), m.LateFromSeconds,
			float64(m.GrowthBytes)/(1<<20), m.GrowthPercent, len(m.Samples))
	}
	if q := r.Queue; q != nil {
		writeQueue(p, q)
	}
	if st := r.Postgres.Statements; st != nil {
		writeStatements(p, st)
	}
	for _, n := range r.Notes {
		p("  note: %s", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// per returns a function that divides by n, the accepted messages: nil,
// not measured, when there were none.
func per(n int) func(float64) *float64 {
	return func(v float64) *float64 {
		if n == 0 {
			return nil
		}
		x := v / float64(n)
		return &x
	}
}

func ms(v float64) string { return fmt.Sprintf("%.1fms", v) }

func perMsg(v *float64, scale float64, prefix string) string {
	if v == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.3f%s", *v*scale, prefix)
}

func whole(v *float64) string {
	if v == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.0f", *v)
}

func num(v *float64) string {
	if v == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", *v)
}

func inum(v *int64) string {
	if v == nil {
		return "n/a"
	}
	return fmt.Sprint(*v)
}

func mib(v *int64) string {
	if v == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MiB", float64(*v)/(1<<20))
}

func orNA(s string) string {
	if s == "" {
		return "n/a"
	}
	return s
}

// writeQueue writes the queue's health.
func writeQueue(p func(string, ...any), q *QueueReport) {
	if q.EndBytes != nil {
		mark := "not reached"
		if q.MarkBytes != nil {
			mark = fmt.Sprintf("%s after %d msgs", mib(&q.MarkTotalBytes), q.MarkMessages)
		}
		growth := "n/a"
		if q.GrowthRatio != nil {
			growth = fmt.Sprintf("x%.2f", *q.GrowthRatio)
		}
		p("  hot tables          %s, at the end %s: %s", mark, mib(&q.EndTotalBytes), growth)
		for _, t := range hotTables {
			end, ok := q.EndBytes[t]
			if !ok {
				continue
			}
			at := "n/a"
			if v, ok := q.MarkBytes[t]; ok {
				at = mib(&v)
			}
			p("    %-17s %s -> %s", t, at, mib(&end))
		}
	}
	if c := q.Claim; c != nil {
		le := func(v *float64) string {
			if v == nil {
				return fmt.Sprintf("> %gms", c.HighestBoundMs)
			}
			return fmt.Sprintf("≤ %gms", *v)
		}
		p("  claim round trip    p50 %s  p95 %s  p99 %s  mean %.1fms  (%d claims from %.1fs to %.1fs)",
			le(c.P50LeMs), le(c.P95LeMs), le(c.P99LeMs), c.MeanMs, c.Count, c.FromSeconds, c.ToSeconds)
	}
}

// writeStatements writes the statement profile as a table.
func writeStatements(p func(string, ...any), st *StatementsReport) {
	p("  top statements      by execution time, database %s: %d statements, %.0f ms in all", st.Database, st.Distinct, st.TotalExecMs)
	p("    %9s %9s %6s %9s %9s %9s %9s  %s", "calls/msg", "mean ms", "time%", "rows/call", "WAL B/msg", "dirty/msg", "write/msg", "query")
	for _, s := range st.Top {
		p("    %9s %9.3f %5.1f%% %9.1f %9s %9s %9s  %s", perMsg(s.CallsPerMessage, 1, ""), s.MeanMs, s.SharePercent,
			s.RowsPerCall, whole(s.WALBytesPerMessage), perMsg(s.BlocksDirtiedPerMessage, 1, ""), perMsg(s.BlocksWrittenPerMessage, 1, ""), s.Query)
	}
}
