// Package app assembles one Posthaste process: database (configured or
// embedded), migrations, the gRPC API with its REST gateway, the delivery
// dispatcher, the bounce listener, the webhook fan-out and sender, the
// retention janitor and, in sandbox mode, the in-process SMTP server that
// stands in for every MX.
package app

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/delivery/sandbox"
	"github.com/posthaste/posthaste/delivery/webhook"
	"github.com/posthaste/posthaste/internal/metrics"
	"github.com/posthaste/posthaste/internal/netguard"
	"github.com/posthaste/posthaste/internal/retention"
	"github.com/posthaste/posthaste/internal/statskeeper"
	"github.com/posthaste/posthaste/internal/telemetry"
	"github.com/posthaste/posthaste/service"
	"github.com/posthaste/posthaste/service/gateway"
)

// Config configures a whole Posthaste process.
type Config struct {
	// HTTPAddr is where the REST API, /healthz and /openapi.json listen.
	// Defaults to ":8080".
	HTTPAddr string
	// GRPCAddr is where the gRPC API listens. Defaults to ":9090".
	GRPCAddr string
	// TLSCertFile and TLSKeyFile, both or neither, name a PEM certificate
	// (chain) and its key. With them the REST and gRPC listeners serve TLS
	// only; the files are read once at Start. Defaults to "": plain TCP,
	// for a deployment that terminates TLS in front of the process.
	TLSCertFile string
	TLSKeyFile  string
	// DatabaseURL is the PostgreSQL connection string. Defaults to an
	// embedded PostgreSQL in DataDir.
	DatabaseURL string
	// DatabaseMaxConns is the most connections the process opens to the
	// database. The intake's group commit holds one per worker while it
	// commits, delivery one per claim and outcome in flight, and API reads
	// one each. Defaults to DefaultDatabaseMaxConns().
	DatabaseMaxConns int
	// DataDir holds the embedded database. Defaults to DefaultDataDir().
	DataDir string
	// Sandbox routes every domain to an in-process SMTP server whose replies
	// depend on the recipient's local part. Defaults to false.
	Sandbox bool
	// BootstrapAPIKey becomes the first API key when the database has none.
	// Defaults to "", which makes serve generate a key and print it once.
	BootstrapAPIKey string
	// Service configures the API. Defaults to service.Config's defaults.
	Service service.Config
	// Delivery configures the dispatcher. Defaults to delivery.Config's
	// defaults.
	Delivery delivery.Config
	// Webhook configures the webhook fan-out and sender. Defaults to
	// webhook.Config's defaults.
	Webhook webhook.Config
	// WebhookAllowPrivate lets webhook URLs point at loopback, private and
	// link-local addresses (never the cloud metadata service), for local
	// development and tests; it sets the guard of both the API's URL check
	// and the sender unless Service.WebhookGuard or Webhook.Guard is set.
	// Defaults to false.
	WebhookAllowPrivate bool
	// Retention configures how long message bodies and rows are kept, and
	// the janitor that removes them. Defaults to retention.Config's
	// defaults.
	Retention retention.Config
	// Statistics configures the keeper that analyzes the outbox tables
	// when their planner statistics are missing or stale (see
	// internal/statskeeper). Defaults to statskeeper.Config's.
	Statistics statskeeper.Config
	// SandboxServer configures the sandbox SMTP server. Defaults to
	// sandbox.Config's defaults; its ReportAddr is set to the bounce
	// listener's address.
	SandboxServer sandbox.Config
	// BounceDomain is the domain of the envelope senders: each SMTP
	// transaction is sent from a VERP address at it (see delivery/bounce),
	// and the bounce listener receives what comes back. Defaults to "": the
	// message's own envelope sender is used, bounces and complaints go to
	// that mailbox, and no listener runs. In sandbox mode it defaults to
	// SandboxBounceDomain, whose reports the sandbox sends straight to the
	// local listener.
	BounceDomain string
	// BounceSecrets are the VERP secrets: the first signs new addresses,
	// every one verifies (keep an old secret for a week after replacing it:
	// bounces arrive for days). Each must be at least 16 bytes. Required
	// with BounceDomain; in sandbox mode, when none is given, one is
	// generated at each start, so addresses of an earlier run no longer
	// verify. Defaults to none.
	BounceSecrets []string
	// BounceListener configures the bounce listener; Start sets its VERP
	// and Handler. Its Addr defaults to ":2525", and in sandbox mode
	// without BounceDomain to a free port on 127.0.0.1, since only the
	// sandbox sends to it.
	BounceListener bounce.Config
	// ShutdownTimeout is how long a graceful stop lets API calls and SMTP
	// sessions in flight finish; it becomes the dispatcher's
	// ShutdownTimeout unless Delivery sets one. Stopping the embedded
	// database afterwards has its own time. Defaults to 30s.
	ShutdownTimeout time.Duration
	// MetricsAddr is where /metrics listens when it should not share the
	// REST listener, for a deployment that keeps the REST port public and
	// scrapes from inside. Defaults to "": /metrics is served on HTTPAddr,
	// without an API key.
	MetricsAddr string
	// Profiling serves Go's runtime profiles (net/http/pprof, under
	// /debug/pprof/) on the MetricsAddr listener, so that an operator can
	// see where the process spends its CPU and memory under real load.
	// It needs MetricsAddr: profiles name internals and cost CPU while
	// taken, so they never share the public REST port. Defaults to false.
	Profiling bool
	// Metrics receives the process's metrics. Defaults to a new
	// metrics.Metrics with its own registry.
	Metrics *metrics.Metrics
	// Tracing configures OpenTelemetry tracing. Defaults to tracing only
	// when the OTEL_* environment names an OTLP endpoint.
	Tracing telemetry.Config
	// Logger receives the process log. Defaults to a discarding logger.
	Logger *slog.Logger
	// KeyOutput receives a generated first API key. Defaults to io.Discard.
	KeyOutput io.Writer
	// KeyOutputJSON writes the generated key's notice to KeyOutput as one
	// JSON object on one line, for a process whose output is all JSON.
	// Defaults to false: a few lines of text.
	KeyOutputJSON bool

	// DatabaseWait is how long Start keeps trying a configured database
	// that does not accept connections yet, as when the process and its
	// database start together. Errors that waiting cannot fix (a malformed
	// URL, a refused password, a missing database) fail at once. A
	// negative value tries once. Defaults to 60s.
	DatabaseWait time.Duration

	// HTTPReadTimeout bounds reading a whole REST request, body included,
	// so a client that sends its body a byte at a time cannot hold a
	// connection for long. Defaults to 30s.
	HTTPReadTimeout time.Duration
	// HTTPWriteTimeout bounds a REST request from the end of its headers to
	// the end of the response: reading the body, the call, and writing the
	// answer. It must be longer than HTTPReadTimeout. Defaults to 60s, or
	// twice HTTPReadTimeout when that is longer.
	HTTPWriteTimeout time.Duration
	// HTTPReadHeaderTimeout bounds reading a REST request's headers; it is
	// part of HTTPReadTimeout. Defaults to 10s, or HTTPReadTimeout when
	// that is shorter.
	HTTPReadHeaderTimeout time.Duration
	// HTTPIdleTimeout is how long an idle keep-alive REST connection is
	// kept. Defaults to 2m.
	HTTPIdleTimeout time.Duration
	// HTTPMaxConnections caps the REST connections open at once; further
	// ones wait in the listen backlog until one closes. Defaults to 1024.
	HTTPMaxConnections int

	// GRPCMaxConnections caps the gRPC connections open at once, as
	// HTTPMaxConnections does for REST. The REST gateway's own connection
	// to the gRPC server does not count. Defaults to 1024.
	GRPCMaxConnections int
	// GRPCMaxConcurrentStreams caps the calls in flight on one gRPC
	// connection. REST requests all reach the gRPC server over one
	// connection, so a value below HTTPMaxConnections makes REST requests
	// queue there. Defaults to 1024.
	GRPCMaxConcurrentStreams int
	// GRPCKeepaliveTime is how long a gRPC connection may be silent before
	// the server pings the client to see that it is still there.
	// Defaults to 2m.
	GRPCKeepaliveTime time.Duration
	// GRPCKeepaliveTimeout is how long the server waits for the answer to
	// that ping before it closes the connection. Defaults to 20s.
	GRPCKeepaliveTimeout time.Duration
	// GRPCKeepaliveMinTime is the shortest interval between a client's
	// keepalive pings; a client pinging more often is sent GOAWAY and
	// disconnected. Defaults to 20s.
	GRPCKeepaliveMinTime time.Duration
	// GRPCIdleTimeout closes a gRPC connection that had no call for this
	// long, so idle clients do not hold the connection slots of
	// GRPCMaxConnections for ever; clients reconnect transparently.
	// Defaults to 15m.
	GRPCIdleTimeout time.Duration
}

// SandboxBounceDomain is the bounce domain in sandbox mode when none is
// configured. .invalid (RFC 2606) cannot exist in DNS, so nothing sent
// from it can reach a real server.
const SandboxBounceDomain = "bounces.sandbox.invalid"

// Defaults for Config.
const (
	DefaultDatabaseWait             = 60 * time.Second
	DefaultHTTPReadTimeout          = 30 * time.Second
	DefaultHTTPWriteTimeout         = 60 * time.Second
	DefaultHTTPReadHeaderTimeout    = 10 * time.Second
	DefaultHTTPIdleTimeout          = 2 * time.Minute
	DefaultMaxConnections           = 1024
	DefaultGRPCMaxConcurrentStreams = 1024
	DefaultGRPCKeepaliveTime        = 2 * time.Minute
	DefaultGRPCKeepaliveTimeout     = 20 * time.Second
	DefaultGRPCKeepaliveMinTime     = 20 * time.Second
	DefaultGRPCIdleTimeout          = 15 * time.Minute
)

// DefaultDatabaseMaxConns is the default of Config.DatabaseMaxConns: four
// connections per CPU the process may use, and at least 8, so that a burst
// of commits does not wait for reads on a small machine while a large one
// keeps its database busy.
func DefaultDatabaseMaxConns() int {
	return max(8, 4*runtime.GOMAXPROCS(0))
}

// WithDefaults returns cfg with zero fields set to their defaults.
func (cfg Config) WithDefaults() Config {
	if cfg.DatabaseMaxConns == 0 {
		cfg.DatabaseMaxConns = DefaultDatabaseMaxConns()
	}
	if cfg.HTTPAddr == "" {
		cfg.HTTPAddr = ":8080"
	}
	if cfg.GRPCAddr == "" {
		cfg.GRPCAddr = ":9090"
	}
	if cfg.DataDir == "" && cfg.DatabaseURL == "" {
		cfg.DataDir = DefaultDataDir()
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	if cfg.KeyOutput == nil {
		cfg.KeyOutput = io.Discard
	}
	if cfg.DatabaseWait == 0 {
		cfg.DatabaseWait = DefaultDatabaseWait
	}
	if cfg.HTTPReadTimeout == 0 {
		cfg.HTTPReadTimeout = DefaultHTTPReadTimeout
	}
	if cfg.HTTPWriteTimeout == 0 {
		cfg.HTTPWriteTimeout = max(DefaultHTTPWriteTimeout, 2*cfg.HTTPReadTimeout)
	}
	if cfg.HTTPReadHeaderTimeout == 0 {
		cfg.HTTPReadHeaderTimeout = min(DefaultHTTPReadHeaderTimeout, cfg.HTTPReadTimeout)
	}
	if cfg.HTTPIdleTimeout == 0 {
		cfg.HTTPIdleTimeout = DefaultHTTPIdleTimeout
	}
	if cfg.HTTPMaxConnections == 0 {
		cfg.HTTPMaxConnections = DefaultMaxConnections
	}
	if cfg.GRPCMaxConnections == 0 {
		cfg.GRPCMaxConnections = DefaultMaxConnections
	}
	if cfg.GRPCMaxConcurrentStreams == 0 {
		cfg.GRPCMaxConcurrentStreams = DefaultGRPCMaxConcurrentStreams
	}
	if cfg.GRPCKeepaliveTime == 0 {
		cfg.GRPCKeepaliveTime = DefaultGRPCKeepaliveTime
	}
	if cfg.GRPCKeepaliveTimeout == 0 {
		cfg.GRPCKeepaliveTimeout = DefaultGRPCKeepaliveTimeout
	}
	if cfg.GRPCKeepaliveMinTime == 0 {
		cfg.GRPCKeepaliveMinTime = DefaultGRPCKeepaliveMinTime
	}
	if cfg.GRPCIdleTimeout == 0 {
		cfg.GRPCIdleTimeout = DefaultGRPCIdleTimeout
	}
	return cfg
}

// validate checks every setting, the service's and the dispatcher's
// included, so that a bad one stops the process before it waits for the
// database, prints a key or stores anything. Each error is a *FieldError.
func (cfg Config) validate() error {
	if cfg.BootstrapAPIKey != "" && len(cfg.BootstrapAPIKey) < service.MinAPIKeyLength {
		return &FieldError{Field: "BootstrapAPIKey", Problem: fmt.Sprintf("must be at least %d characters", service.MinAPIKeyLength)}
	}
	for _, d := range []struct {
		field string
		v     time.Duration
	}{
		{"ShutdownTimeout", cfg.ShutdownTimeout},
		{"HTTPReadTimeout", cfg.HTTPReadTimeout},
		{"HTTPWriteTimeout", cfg.HTTPWriteTimeout},
		{"HTTPReadHeaderTimeout", cfg.HTTPReadHeaderTimeout},
		{"HTTPIdleTimeout", cfg.HTTPIdleTimeout},
		{"GRPCKeepaliveTime", cfg.GRPCKeepaliveTime},
		{"GRPCKeepaliveTimeout", cfg.GRPCKeepaliveTimeout},
		{"GRPCKeepaliveMinTime", cfg.GRPCKeepaliveMinTime},
		{"GRPCIdleTimeout", cfg.GRPCIdleTimeout},
	} {
		if d.v < 0 {
			return &FieldError{Field: d.field, Problem: fmt.Sprintf("must not be negative, got %s", d.v)}
		}
	}
	// The write deadline starts when the headers are in, so it covers
	// reading the body too; no shorter than that, a slow but allowed upload
	// would have no time left for its answer.
	if cfg.HTTPWriteTimeout <= cfg.HTTPReadTimeout {
		return &FieldError{Field: "HTTPWriteTimeout", Problem: fmt.Sprintf("must be longer than the read timeout (%s), which it includes", cfg.HTTPReadTimeout)}
	}
	if (cfg.TLSCertFile == "") != (cfg.TLSKeyFile == "") {
		field := "TLSKeyFile"
		if cfg.TLSCertFile == "" {
			field = "TLSCertFile"
		}
		return &FieldError{Field: field, Problem: "must be set together with the other of TLSCertFile and TLSKeyFile"}
	}
	if cfg.HTTPReadHeaderTimeout > cfg.HTTPReadTimeout {
		return &FieldError{Field: "HTTPReadHeaderTimeout", Problem: fmt.Sprintf("must not be longer than the read timeout (%s), which it is part of", cfg.HTTPReadTimeout)}
	}
	for _, n := range []struct {
		field string
		v     int
	}{
		{"DatabaseMaxConns", cfg.DatabaseMaxConns},
		{"HTTPMaxConnections", cfg.HTTPMaxConnections},
		{"GRPCMaxConnections", cfg.GRPCMaxConnections},
		{"GRPCMaxConcurrentStreams", cfg.GRPCMaxConcurrentStreams},
	} {
		if n.v < 1 {
			return &FieldError{Field: n.field, Problem: fmt.Sprintf("must be at least 1, got %d", n.v)}
		}
	}
	if cfg.Profiling && cfg.MetricsAddr == "" {
		return &FieldError{Field: "Profiling", Problem: "needs MetricsAddr: profiles are served on the metrics listener, never on the REST port"}
	}
	if err := cfg.validateBounce(); err != nil {
		return err
	}
	if err := cfg.Service.Validate(); err != nil {
		return fieldError("Service", err)
	}
	if err := cfg.deliveryConfig().Validate(); err != nil {
		return fieldError("Delivery", err)
	}
	if err := cfg.Webhook.Validate(); err != nil {
		return fieldError("Webhook", err)
	}
	if err := cfg.Retention.WithDefaults().Validate(); err != nil {
		return fieldError("Retention", err)
	}
	if err := cfg.Statistics.Validate(); err != nil {
		return fieldError("Statistics", err)
	}
	return nil
}

// bounceDomain is the bounce domain in use: BounceDomain, or in sandbox
// mode SandboxBounceDomain; "" when there is none.
func (cfg Config) bounceDomain() string {
	if cfg.BounceDomain == "" && cfg.Sandbox {
		return SandboxBounceDomain
	}
	return cfg.BounceDomain
}

// validateBounce checks the bounce settings the way Start uses them.
func (cfg Config) validateBounce() error {
	domain := cfg.bounceDomain()
	if domain == "" {
		if len(cfg.BounceSecrets) > 0 {
			return &FieldError{Field: "BounceSecrets", Problem: "set without a bounce domain (BounceDomain), which they would sign for"}
		}
		return nil
	}
	if len(cfg.BounceSecrets) == 0 && !cfg.Sandbox {
		return &FieldError{Field: "BounceSecrets", Problem: "required with BounceDomain: at least one secret of 16 bytes or more"}
	}
	if _, err := bounce.NewVERP(domain, "", verpSecrets(cfg.BounceSecrets, []byte("0123456789abcdef"))); err != nil {
		field := "BounceSecrets"
		if strings.HasPrefix(err.Error(), "verp domain") {
			field = "BounceDomain"
		}
		_, problem, _ := strings.Cut(err.Error(), ": ")
		return &FieldError{Field: field, Problem: problem}
	}
	if addr := cfg.BounceListener.Addr; addr != "" {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return &FieldError{Field: "BounceListener.Addr", Problem: fmt.Sprintf("%q is not host:port", addr)}
		}
	}
	return nil
}

// verpSecrets converts the configured secrets, or uses generated when there
// are none.
func verpSecrets(configured []string, generated []byte) [][]byte {
	if len(configured) == 0 {
		return [][]byte{generated}
	}
	out := make([][]byte, len(configured))
	for i, s := range configured {
		out[i] = []byte(s)
	}
	return out
}

// deliveryConfig is the dispatcher's configuration as Start builds it,
// before sandbox mode replaces its routes.
func (cfg Config) deliveryConfig() delivery.Config {
	d := cfg.Delivery
	if d.ShutdownTimeout == 0 {
		d.ShutdownTimeout = cfg.ShutdownTimeout
	}
	return d
}

// FieldError is a problem with one setting of Config, so that whoever
// built the Config can name the setting the way its user knows it (cmd
// names the flag and the environment variable).
type FieldError struct {
	// Field is the setting's path in Config, e.g. "BootstrapAPIKey",
	// "Service.MaxRecipients" or "Delivery.SMTP.Port".
	Field string
	// Problem says what is wrong, e.g. "must be at least 1, got 0".
	Problem string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Problem }

// leadingField matches the field name that the service's and the
// dispatcher's validation errors start with ("SMTP.Port: ...").
var leadingField = regexp.MustCompile(`^([A-Z][A-Za-z0-9]*(?:\.[A-Z][A-Za-z0-9]*)*):? (.*)$`)

// fieldError turns a component's validation error into a FieldError under
// prefix, the component's field in Config.
func fieldError(prefix string, err error) *FieldError {
	m := leadingField.FindStringSubmatch(err.Error())
	if m == nil {
		return &FieldError{Field: prefix, Problem: err.Error()}
	}
	return &FieldError{Field: prefix + "." + m[1], Problem: m[2]}
}

// App is a running Posthaste process.
type App struct {
	cfg Config
	log *slog.Logger

	database   *Database
	store      *db.DB
	notifier   *db.OutboxNotifier
	events     *service.EventHub
	api        *service.Server
	sandbox    *sandbox.Server
	bounces    *bounce.Listener
	dispatcher *delivery.Dispatcher
	fanOut     *webhook.FanOut
	sender     *webhook.Sender
	janitor    *retention.Janitor
	stats      *statskeeper.Keeper
	grpcServer *grpc.Server
	grpcLis    net.Listener
	gatewayLis *gateway.PipeListener
	httpServer *http.Server
	httpLis    net.Listener
	gwClose    func() error
	metricsSrv *http.Server
	metricsLis net.Listener
	telemetry  *telemetry.Telemetry

	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// New validates cfg and returns an App that is not started yet. A bad
// setting is reported as a *FieldError.
func New(cfg Config) (*App, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &App{cfg: cfg, log: cfg.Logger}, nil
}

// Start brings every part up and returns once the listeners accept
// connections. On error, whatever was started is stopped again.
func (a *App) Start(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.cfg.ShutdownTimeout)
			defer cancel()
			_ = a.Stop(stopCtx)
		}
	}()
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	a.cancel = cancel

	// First: a certificate that cannot be used stops the process before it
	// starts a database, prints a key or stores anything.
	tlsCfg, err := a.tlsConfig()
	if err != nil {
		return err
	}

	a.database, err = OpenDatabase(ctx, a.cfg.DatabaseURL, a.cfg.DataDir, a.log)
	if err != nil {
		return err
	}
	if !a.database.Embedded() {
		if err := waitForDatabase(ctx, a.database.URL, a.cfg.DatabaseWait, a.log); err != nil {
			return err
		}
	}
	// db's errors already say which step failed ("migrate: ...", "open
	// database: ..."); another prefix would only repeat it.
	if err := db.Migrate(ctx, a.database.URL); err != nil {
		return err
	}
	a.telemetry, err = telemetry.Setup(ctx, a.cfg.Tracing)
	if err != nil {
		return err
	}
	tp := a.telemetry.TracerProvider()
	dbOpts := []db.OpenOption{db.WithMaxConns(a.cfg.DatabaseMaxConns)}
	if a.telemetry.Enabled() {
		dbOpts = append(dbOpts, db.WithTracer(telemetry.NewQueryTracer(tp)))
		a.log.Info("tracing enabled", "exporter", a.telemetry.Exporter())
	}
	a.store, err = db.Open(ctx, a.database.URL, dbOpts...)
	if err != nil {
		return err
	}
	m := a.cfg.Metrics

	// One guard for the URL check at the API and the connections of the
	// sender, so what the API accepts is what the sender may reach.
	guard := netguard.New()
	if a.cfg.WebhookAllowPrivate {
		guard = netguard.AllowAll()
	}
	svcCfg, err := a.domainsConfig(a.cfg.Service)
	if err != nil {
		return err
	}
	if svcCfg.Logger == nil {
		svcCfg.Logger = a.log.With("component", "api")
	}
	if svcCfg.Observer == nil {
		svcCfg.Observer = m
	}
	a.events, err = service.NewEventHub(a.store, service.EventHubConfig{Logger: a.log.With("component", "events")})
	if err != nil {
		return err // "event hub config: ..."
	}
	if svcCfg.WebhookGuard == nil {
		svcCfg.WebhookGuard = guard
	}
	if svcCfg.BounceDomain == "" {
		// The domains API suggests the return-path records of the bounce
		// domain the dispatcher sends from.
		svcCfg.BounceDomain = a.cfg.BounceDomain
	}
	// Built before anything else is started so that a bad configuration
	// stops the process before it prints or stores anything.
	a.api, err = service.New(svcCfg, a.store, func() {
		// The local dispatcher and event streams wake at once; other
		// instances hear the coalesced NOTIFY.
		a.dispatcher.Wake()
		a.events.Wake()
		a.notifier.Kick()
	}, service.WithEventHub(a.events))
	if err != nil {
		return err // "service config: ..."
	}
	if err := a.bootstrapAPIKey(ctx); err != nil {
		return err
	}
	a.api.Start(runCtx)

	deliveryCfg := a.cfg.deliveryConfig()
	if deliveryCfg.Logger == nil {
		deliveryCfg.Logger = a.log.With("component", "delivery")
	}
	if deliveryCfg.Observer == nil {
		deliveryCfg.Observer = m
	}
	if deliveryCfg.TracerProvider == nil && a.telemetry.Enabled() {
		deliveryCfg.TracerProvider = tp
	}
	if err := a.startBounceListener(runCtx, &deliveryCfg); err != nil {
		return err
	}
	if a.cfg.Sandbox {
		sbCfg := a.cfg.SandboxServer
		if a.bounces != nil && sbCfg.ReportAddr == "" {
			sbCfg.ReportAddr = dialable(a.bounces.Addr())
		}
		if sbCfg.Logger == nil {
			sbCfg.Logger = a.log.With("component", "sandbox")
		}
		a.sandbox = sandbox.New(sbCfg)
		if err := a.sandbox.Start(runCtx); err != nil {
			return fmt.Errorf("start sandbox: %w", err)
		}
		// The sandbox replaces every MX but is reached through the same
		// SMTP client path as real delivery.
		deliveryCfg.Routes = map[string]string{"*": a.sandbox.Addr()}
		a.log.Info("sandbox mode: every domain is delivered to the in-process SMTP server", "addr", a.sandbox.Addr())
	}
	a.dispatcher, err = delivery.NewDispatcher(deliveryCfg, a.store)
	if err != nil {
		return err // "delivery config: ..."
	}
	a.dispatcher.Start(runCtx)

	whCfg := a.cfg.Webhook
	if whCfg.Logger == nil {
		whCfg.Logger = a.log.With("component", "webhook")
	}
	if whCfg.Guard == nil {
		whCfg.Guard = guard
	}
	if whCfg.Observe == nil {
		whCfg.Observe = m.WebhookDelivery
	}
	a.sender, err = webhook.NewSender(whCfg, a.store)
	if err != nil {
		return err // "webhook config: ..."
	}
	a.fanOut, err = webhook.NewFanOut(whCfg, a.store, a.sender.Wake)
	if err != nil {
		return err
	}
	a.sender.Start(runCtx)
	a.fanOut.Start(runCtx)

	retCfg := a.cfg.Retention
	if retCfg.Logger == nil {
		retCfg.Logger = a.log.With("component", "retention")
	}
	a.janitor, err = retention.New(retCfg, a.store)
	if err != nil {
		return err // "retention config: ..."
	}
	a.janitor.Start(runCtx)

	statsCfg := a.cfg.Statistics
	if statsCfg.Logger == nil {
		statsCfg.Logger = a.log.With("component", "statistics")
	}
	a.stats, err = statskeeper.New(statsCfg, a.store)
	if err != nil {
		return err // "statistics keeper config: ..."
	}
	a.stats.Start(runCtx)

	a.notifier = db.NewOutboxNotifier(a.store, 0, a.log.With("component", "notify"))
	a.notifier.Start(runCtx)
	a.events.Start(runCtx)

	a.grpcServer = service.NewGRPCServer(a.api, a.store, svcCfg.Logger, a.grpcOptions()...)
	lis, err := net.Listen("tcp", a.cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("listen grpc on %s: %w", a.cfg.GRPCAddr, err)
	}
	a.grpcLis = netutil.LimitListener(lis, a.cfg.GRPCMaxConnections)
	if tlsCfg != nil {
		// TLS on the listener rather than as the server's credentials: the
		// server also serves the gateway's in-memory listener, which stays
		// plain. gRPC clients insist on ALPN h2 (RFC 7540 section 3.3).
		grpcTLS := tlsCfg.Clone()
		grpcTLS.NextProtos = []string{"h2"}
		a.grpcLis = tls.NewListener(a.grpcLis, grpcTLS)
	}
	// The gateway reaches the server in memory, on a listener of its own
	// outside the connection cap: clients holding every gRPC slot must not
	// lock REST out of the server it forwards to. Its calls still pass
	// every interceptor, so REST and gRPC are authenticated, validated and
	// logged by the same code.
	pipe := gateway.NewPipeListener()
	a.gatewayLis = pipe
	for _, l := range []net.Listener{a.grpcLis, a.gatewayLis} {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			if err := a.grpcServer.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				a.log.Error("grpc server stopped", "addr", l.Addr().String(), "err", err)
			}
		}()
	}

	maxMessage := svcCfg.WithDefaults().MaxMessageBytes
	// Base64 in JSON grows a message by a third; the gateway's bound only
	// stops absurd bodies early, the service enforces the real limit.
	gwOpts := []gateway.Option{
		gateway.WithDialer(pipe.Dial),
		gateway.WithMaxBodyBytes(2 * maxMessage),
		gateway.WithAuthCheck(a.api.CheckAuthorization),
		gateway.WithObserver(m),
	}
	if a.telemetry.Enabled() {
		gwOpts = append(gwOpts, gateway.WithTracerProvider(tp), gateway.WithDialOptions(grpc.WithStatsHandler(
			otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(telemetry.Propagator())))))
	}
	handler, gwClose, err := gateway.New(runCtx, pipe.Addr().String(), svcCfg.Logger, gwOpts...)
	if err != nil {
		return err // "gateway: ..."
	}
	if a.cfg.MetricsAddr == "" {
		// Outside the gateway: a scrape needs no API key and is not an
		// API request.
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", m.Handler())
		mux.Handle("/", handler)
		handler = mux
	} else if err := a.startMetricsServer(m); err != nil {
		return err
	}
	a.setMetricSources(m)
	a.gwClose = gwClose
	lis, err = net.Listen("tcp", a.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listen http on %s: %w", a.cfg.HTTPAddr, err)
	}
	a.httpLis = netutil.LimitListener(lis, a.cfg.HTTPMaxConnections)
	a.httpServer = &http.Server{
		Handler:           handler,
		ReadTimeout:       a.cfg.HTTPReadTimeout,
		WriteTimeout:      a.cfg.HTTPWriteTimeout,
		ReadHeaderTimeout: a.cfg.HTTPReadHeaderTimeout,
		IdleTimeout:       a.cfg.HTTPIdleTimeout,
		ErrorLog:          slog.NewLogLogger(a.log.With("component", "http").Handler(), slog.LevelWarn),
		TLSConfig:         tlsCfg,
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		var err error
		if tlsCfg != nil {
			// The certificate is in TLSConfig; ServeTLS adds HTTP/2 by ALPN.
			err = a.httpServer.ServeTLS(a.httpLis, "", "")
		} else {
			err = a.httpServer.Serve(a.httpLis)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("http server stopped", "err", err)
		}
	}()

	a.log.Info("posthaste started", "http", a.HTTPAddr(), "grpc", a.GRPCAddr(), "metrics", a.MetricsAddr(),
		"tls", tlsCfg != nil, "embedded_database", a.database.Embedded())
	return nil
}

// startBounceListener starts the bounce listener when there is a bounce
// domain, and has the dispatcher send from VERP addresses at it. It runs
// before the sandbox, which sends its reports to the listener, and before
// the dispatcher, so no mail goes out from an address nobody listens at.
func (a *App) startBounceListener(ctx context.Context, deliveryCfg *delivery.Config) error {
	domain := a.cfg.bounceDomain()
	if domain == "" {
		return nil
	}
	var generated []byte
	if len(a.cfg.BounceSecrets) == 0 {
		generated = make([]byte, 32)
		_, _ = rand.Read(generated) // crypto/rand.Read never fails; it crashes the program instead
		a.log.Warn("bounce: no --bounce-secret given, generated one for this run; VERP addresses of earlier runs no longer verify")
	}
	verp, err := bounce.NewVERP(domain, "", verpSecrets(a.cfg.BounceSecrets, generated))
	if err != nil {
		return fmt.Errorf("bounce: %w", err)
	}
	lcfg := a.cfg.BounceListener
	lcfg.VERP = verp
	lcfg.Handler = delivery.NewReportHandler(a.store, a.log.With("component", "bounce"))
	if lcfg.Addr == "" {
		lcfg.Addr = ":2525"
		if a.cfg.BounceDomain == "" {
			lcfg.Addr = "127.0.0.1:0"
		}
	}
	if lcfg.Logger == nil {
		lcfg.Logger = a.log.With("component", "bounce")
	}
	if lcfg.Observe == nil {
		lcfg.Observe = a.cfg.Metrics.BounceReport
	}
	a.bounces = bounce.New(lcfg)
	if err := a.bounces.Start(ctx); err != nil {
		return err // "bounce listener: ..."
	}
	deliveryCfg.VERP = verp
	return nil
}

// dialable turns a listener's address into one to connect to: an
// unspecified host (":2525" listens on every address) becomes loopback.
func dialable(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		return net.JoinHostPort("127.0.0.1", port)
	}
	return addr
}

// BounceAddr is the address the bounce listener listens on, "" when it
// does not run.
func (a *App) BounceAddr() string {
	if a.bounces == nil {
		return ""
	}
	return a.bounces.Addr()
}

// tlsConfig loads the configured certificate, nil when none is configured.
func (a *App) tlsConfig() (*tls.Config, error) {
	if a.cfg.TLSCertFile == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(a.cfg.TLSCertFile, a.cfg.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("load tls certificate %s and key %s: %w", a.cfg.TLSCertFile, a.cfg.TLSKeyFile, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// HTTPAddr is the address the REST API listens on.
func (a *App) HTTPAddr() string {
	if a.httpLis == nil {
		return ""
	}
	return a.httpLis.Addr().String()
}

// GRPCAddr is the address the gRPC API listens on.
func (a *App) GRPCAddr() string {
	if a.grpcLis == nil {
		return ""
	}
	return a.grpcLis.Addr().String()
}

// DatabaseURL is the database the process uses.
func (a *App) DatabaseURL() string {
	if a.database == nil {
		return ""
	}
	return a.database.URL
}

// IntakeStats counts the transactions and messages of the API's group
// commit; zero before Start.
func (a *App) IntakeStats() db.CommitterStats {
	if a.api == nil {
		return db.CommitterStats{}
	}
	return a.api.IntakeStats()
}

// RetentionStats is what the retention janitor did so far; zero before
// Start.
func (a *App) RetentionStats() retention.Stats {
	if a.janitor == nil {
		return retention.Stats{}
	}
	return a.janitor.Stats()
}

// Sandbox is the sandbox SMTP server, nil unless sandbox mode is on.
func (a *App) Sandbox() *sandbox.Server { return a.sandbox }

// Stop shuts down in dependency order: stop accepting API calls, let SMTP
// sessions in flight finish and release unattempted leases, then close the
// database. It is idempotent and waits.
func (a *App) Stop(ctx context.Context) error {
	a.stopOnce.Do(func() { a.stopErr = a.stop(ctx) })
	return a.stopErr
}

func (a *App) stop(ctx context.Context) error {
	var errs []error
	if a.api != nil {
		a.api.Drain()
	}
	// Event streams would hold the graceful stop below until its deadline;
	// they end now, and their clients resume from their cursors elsewhere.
	if a.events != nil {
		a.events.Stop()
	}
	if a.httpServer != nil {
		if err := a.httpServer.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shutdown http: %w", err))
		}
	} else if a.httpLis != nil {
		_ = a.httpLis.Close()
	}
	if a.metricsSrv != nil {
		if err := a.metricsSrv.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shutdown metrics: %w", err))
		}
	}
	if a.gwClose != nil {
		if err := a.gwClose(); err != nil {
			errs = append(errs, fmt.Errorf("close gateway: %w", err))
		}
	}
	if a.grpcServer != nil {
		stopped := make(chan struct{})
		go func() {
			a.grpcServer.GracefulStop()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-ctx.Done():
			a.grpcServer.Stop()
			<-stopped
		}
	} else {
		if a.grpcLis != nil {
			_ = a.grpcLis.Close()
		}
		if a.gatewayLis != nil {
			_ = a.gatewayLis.Close()
		}
	}
	if a.api != nil {
		// After the servers: every call has been answered, and what was
		// accepted for the group commit is committed before the database
		// goes.
		a.api.Stop()
	}
	if a.dispatcher != nil {
		a.dispatcher.Stop()
	}
	if a.notifier != nil {
		a.notifier.Stop()
	}
	// The fan-out first: a batch it was writing is rolled back and read
	// again by the next start. The sender then finishes its requests in
	// flight (each bounded by its timeout) and writes their outcomes.
	if a.fanOut != nil {
		a.fanOut.Stop()
	}
	if a.sender != nil {
		a.sender.Stop()
	}
	// A batch in flight is rolled back and done again by a later run.
	if a.janitor != nil {
		a.janitor.Stop()
	}
	if a.stats != nil {
		a.stats.Stop()
	}
	if a.cancel != nil {
		a.cancel()
	}
	a.wg.Wait()
	if a.sandbox != nil {
		a.sandbox.Stop()
	}
	// After the sandbox, whose reports it receives, and before the store
	// its handler writes to. A report cut off here gets no reply, and its
	// sender tries again later.
	if a.bounces != nil {
		a.bounces.Stop()
	}
	if a.store != nil {
		a.store.Close()
	}
	// Last: the spans of the shutdown itself are exported too.
	if err := a.telemetry.Shutdown(ctx); err != nil {
		errs = append(errs, err)
	}
	if a.database != nil {
		if err := a.database.Close(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// bootstrapAPIKey makes sure a fresh database has one key, so the API is
// usable right after the first start. It is an admin key of the default
// project, as every key made before projects existed became.
func (a *App) bootstrapAPIKey(ctx context.Context) error {
	key := a.cfg.BootstrapAPIKey
	generated := key == ""
	if generated {
		var err error
		key, _, _, err = service.NewAPIKey()
		if err != nil {
			return fmt.Errorf("generate first api key: %w", err)
		}
	}
	_, created, err := a.store.CreateAPIKeyIfNone(ctx, db.NewAPIKeyParams{
		ProjectID: db.DefaultProjectID(),
		Name:      "bootstrap",
		Prefix:    service.APIKeyListPrefix(key),
		Hash:      service.HashAPIKey(key),
		Scopes:    []string{db.ScopeAdmin},
	})
	if err != nil {
		return fmt.Errorf("create first api key: %w", err)
	}
	switch {
	case created && generated && a.cfg.KeyOutputJSON:
		// The key goes to KeyOutput only, never to the log.
		line, _ := json.Marshal(map[string]string{
			"time": time.Now().Format(time.RFC3339Nano), "level": "INFO",
			"msg": "created the first API key; it is shown only this once", "api_key": key,
		})
		fmt.Fprintf(a.cfg.KeyOutput, "%s\n", line)
		a.log.Info("created the first API key")
	case created && generated:
		fmt.Fprintf(a.cfg.KeyOutput, "\nCreated the first API key. It is shown only this once:\n\n    %s\n\n", key)
		a.log.Info("created the first API key")
	case created:
		a.log.Info("stored the bootstrap API key")
	}
	return nil
}

// grpcOptions are the transport settings of the gRPC server, and its
// tracing when that is on.
func (a *App) grpcOptions() []grpc.ServerOption {
	var opts []grpc.ServerOption
	if a.telemetry.Enabled() {
		opts = append(opts, grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(a.telemetry.TracerProvider()),
			otelgrpc.WithPropagators(telemetry.Propagator()))))
	}
	return append(opts,
		grpc.MaxConcurrentStreams(uint32(a.cfg.GRPCMaxConcurrentStreams)),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: a.cfg.GRPCIdleTimeout,
			Time:              a.cfg.GRPCKeepaliveTime,
			Timeout:           a.cfg.GRPCKeepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime: a.cfg.GRPCKeepaliveMinTime,
			// Callers of a mail API sit idle between sends; pinging keeps
			// their connection through NATs and load balancers, which is
			// cheaper than reconnecting. MinTime still bounds the rate.
			PermitWithoutStream: true,
		}),
	)
}
