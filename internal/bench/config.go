package bench

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/posthaste/posthaste/service"
)

// Config configures one benchmark run.
type Config struct {
	// RESTURL is the base URL of a running Posthaste's REST API, e.g.
	// "http://127.0.0.1:8080". Defaults to "": with GRPCAddr also empty,
	// the run starts Posthaste in-process.
	RESTURL string
	// GRPCAddr is a running Posthaste's gRPC address. Defaults to "".
	GRPCAddr string
	// APIKey authenticates the calls; it needs the right to send (and,
	// for the check before the run, is better allowed to read). When the
	// run starts Posthaste itself it also becomes the bootstrap key.
	// Defaults to a random key, usable only with an in-process server on a
	// database without keys.
	APIKey string

	// DatabaseURL is the PostgreSQL whose statistics are read; for an
	// in-process server it is also the database it uses. Defaults to "":
	// no PostgreSQL statistics for a running server, an embedded database
	// in DataDir for an in-process one.
	DatabaseURL string
	// DataDir holds the in-process server's embedded database. Defaults
	// to a temporary directory removed after the run.
	DataDir string
	// ServerPID is a running server's process id, for its CPU and peak
	// memory. Defaults to 0: not measured (the in-process server is this
	// process).
	ServerPID int
	// PGStatStatements starts the embedded database with pg_stat_statements
	// loaded (shared_preload_libraries, track = top), for the statement
	// profile. Only for an in-process server without DatabaseURL: another
	// server must load it in its own configuration. Defaults to false, so
	// that the figures are comparable with runs without the extension's
	// (small) bookkeeping.
	PGStatStatements bool
	// Statements is how many statements the profile lists, by execution
	// time, when the database has pg_stat_statements loaded: the run then
	// resets its counters at the start (see StatementsReport). Defaults to
	// DefaultStatements; negative lists none and leaves the extension
	// alone.
	Statements int
	// HealthMark is the number of delivered messages at which the hot
	// tables' sizes are read, to compare with their sizes at the end; claim
	// latency is measured from then on. Defaults to DefaultHealthMark, or
	// a twentieth of Messages when that is smaller; negative measures
	// neither.
	HealthMark int
	// MetricsURL is a running server's /metrics URL, scraped for its claim
	// latency. Defaults to "": none for a running server; the in-process
	// server's metrics are read directly.
	MetricsURL string
	// DeliveryConcurrency and PerDomainConcurrency configure the
	// in-process server's dispatcher. Default to the server's defaults.
	DeliveryConcurrency  int
	PerDomainConcurrency int

	// Proto is "rest", "grpc" or "smtp". Defaults to "rest". With "smtp"
	// the load generator submits each message over SMTP to the relay at
	// SMTPAddr instead of calling Posthaste's API, and the run starts no
	// server: the relay must deliver to SinkAddr.
	Proto string
	// SMTPAddr is the relay's address with Proto "smtp", e.g. a local
	// Postfix. Defaults to "".
	SMTPAddr string
	// Batch is how many messages one API call carries: above 1 the run
	// uses SendBatch, the last call carrying what is left. Concurrency
	// then counts calls, Rate still messages. Not with Proto "smtp".
	// Defaults to 1.
	Batch int
	// Messages is how many messages are sent. Defaults to 1000.
	Messages int
	// Concurrency is how many calls are in flight at most: in a closed
	// loop, every caller sends its next message as soon as the last one is
	// answered. Defaults to 10.
	Concurrency int
	// Rate, when positive, sends at this many messages per second instead
	// (an open loop), still with at most Concurrency calls in flight; API
	// latency is then measured from when each call was due, so a server
	// that falls behind shows it. Defaults to 0.
	Rate float64
	// Size is the length of each message's text body in bytes. Defaults
	// to 2048.
	Size int
	// Recipients is the number of To addresses per message. Defaults to 1.
	Recipients int
	// Domains spreads the recipients over this many .test domains, message
	// by message; the server limits its sessions per domain. Defaults to 1.
	Domains int
	// RequestTimeout bounds one API call. Defaults to 30s.
	RequestTimeout time.Duration
	// Timeout is how long the run waits, after the last call, for the
	// accepted messages to arrive at the sink. Defaults to 2m.
	Timeout time.Duration

	// SinkAddr is where the sink listens. Defaults to "127.0.0.1:0" for an
	// in-process server and DefaultSinkAddr otherwise: a running server
	// must route every domain there (--route '*=ADDR'), an SMTP relay must
	// relay every message there.
	SinkAddr string
	// StatsSettle is how long the run waits after the last delivery before
	// it reads PostgreSQL's WAL counters: a backend reports its statistics
	// at most once a second, and one that went idle right after an earlier
	// report holds them up to 10s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL), so
	// an immediate reading misses the last commits' WAL flushes. A
	// negative value does not wait. Defaults to 11s.
	StatsSettle time.Duration

	// Progress receives a line per ProgressInterval while the run goes.
	// Defaults to nil: no progress lines.
	Progress io.Writer
	// ProgressInterval defaults to 1s.
	ProgressInterval time.Duration
	// Logger receives the in-process server's and the sink's log.
	// Defaults to a discarding logger.
	Logger *slog.Logger
}

// DefaultSinkAddr is where the sink listens when the run drives a running
// server.
const DefaultSinkAddr = "127.0.0.1:2526"

// DefaultStatsSettle is StatsSettle's default.
const DefaultStatsSettle = 11 * time.Second

// InProcess reports whether the run starts its own server.
func (c Config) InProcess() bool { return c.Proto != "smtp" && c.RESTURL == "" && c.GRPCAddr == "" }

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Proto == "" {
		c.Proto = "rest"
	}
	if c.Messages == 0 {
		c.Messages = 1000
	}
	if c.Batch == 0 {
		c.Batch = 1
	}
	if c.Concurrency == 0 {
		c.Concurrency = 10
	}
	if c.Size == 0 {
		c.Size = 2048
	}
	if c.Recipients == 0 {
		c.Recipients = 1
	}
	if c.Domains == 0 {
		c.Domains = 1
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 30 * time.Second
	}
	if c.Timeout == 0 {
		c.Timeout = 2 * time.Minute
	}
	if c.SinkAddr == "" {
		c.SinkAddr = "127.0.0.1:0"
		if !c.InProcess() {
			c.SinkAddr = DefaultSinkAddr
		}
	}
	if c.StatsSettle == 0 {
		c.StatsSettle = DefaultStatsSettle
	}
	if c.Statements == 0 {
		c.Statements = DefaultStatements
	}
	if c.HealthMark == 0 {
		c.HealthMark = min(DefaultHealthMark, max(1, c.Messages/20))
	}
	if c.ProgressInterval == 0 {
		c.ProgressInterval = time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate checks a configuration that WithDefaults has filled. Errors
// start with the field's name.
func (c Config) Validate() error {
	switch {
	case c.Proto != "rest" && c.Proto != "grpc" && c.Proto != "smtp":
		return fmt.Errorf("Proto: want rest, grpc or smtp, got %q", c.Proto)
	case c.Proto == "smtp" && c.SMTPAddr == "":
		return errors.New("SMTPAddr: needed to send over SMTP")
	case c.Batch < 1 || c.Batch > service.MaxBatchMessages:
		return fmt.Errorf("Batch: must be from 1 to %d, got %d", service.MaxBatchMessages, c.Batch)
	case c.Proto == "smtp" && c.Batch != 1:
		return errors.New("Batch: SMTP sends one message per transaction")
	case c.Proto == "rest" && c.RESTURL == "" && !c.InProcess():
		return errors.New("RESTURL: needed to drive a running server over REST")
	case c.Proto == "grpc" && c.GRPCAddr == "" && !c.InProcess():
		return errors.New("GRPCAddr: needed to drive a running server over gRPC")
	case !c.InProcess() && c.Proto != "smtp" && c.APIKey == "":
		return errors.New("APIKey: needed to drive a running server")
	case c.Messages < 1:
		return fmt.Errorf("Messages: must be at least 1, got %d", c.Messages)
	case c.Concurrency < 1:
		return fmt.Errorf("Concurrency: must be at least 1, got %d", c.Concurrency)
	case c.Rate < 0:
		return fmt.Errorf("Rate: must not be negative, got %g", c.Rate)
	case c.Size < 1:
		return fmt.Errorf("Size: must be at least 1, got %d", c.Size)
	case c.Recipients < 1:
		return fmt.Errorf("Recipients: must be at least 1, got %d", c.Recipients)
	case c.Domains < 1:
		return fmt.Errorf("Domains: must be at least 1, got %d", c.Domains)
	case c.RequestTimeout < 0:
		return fmt.Errorf("RequestTimeout: must not be negative, got %s", c.RequestTimeout)
	case c.Timeout < 0:
		return fmt.Errorf("Timeout: must not be negative, got %s", c.Timeout)
	case c.ServerPID < 0:
		return fmt.Errorf("ServerPID: must not be negative, got %d", c.ServerPID)
	case c.PGStatStatements && (!c.InProcess() || c.DatabaseURL != ""):
		return errors.New("PGStatStatements: only for the embedded database; another server loads pg_stat_statements in its own configuration")
	case c.InProcess() && c.MetricsURL != "":
		return errors.New("MetricsURL: the in-process server's metrics are read directly; give it only with RESTURL or GRPCAddr")
	case c.InProcess() && c.ServerPID != 0:
		return errors.New("ServerPID: the in-process server is this process; give it only with RESTURL or GRPCAddr")
	}
	return nil
}
