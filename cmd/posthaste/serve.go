package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/delivery/webhook"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/netguard"
	"github.com/posthaste/posthaste/internal/retention"
	"github.com/posthaste/posthaste/internal/statskeeper"
	"github.com/posthaste/posthaste/service"
)

// databaseFlags are shared by every command that talks to the database.
type databaseFlags struct {
	url     string
	dataDir string
}

func (d *databaseFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&d.url, "database-url", "", "PostgreSQL connection URL; when empty an embedded PostgreSQL is started in --data-dir")
	fs.StringVar(&d.dataDir, "data-dir", app.DefaultDataDir(), "directory for the embedded PostgreSQL")
}

type logFlags struct {
	level  string
	format string
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&l.level, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&l.format, "log-format", "text", "text or json")
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return serve(ctx, args, stdout, stderr, false)
}

// serve runs the service, or with printOnly prints the configuration it
// would run with and returns: "config print" thus knows every serve flag,
// however many are added, without a second list of them.
func serve(ctx context.Context, args []string, stdout, stderr io.Writer, printOnly bool) (err error) {
	fs := newFlagSet("serve", stderr)
	defer func() { err = placeSettings(fs, err) }()
	var (
		dbf      databaseFlags
		logf     logFlags
		cfg      app.Config
		svc      service.Config
		dlv      delivery.Config
		routes   listFlag
		tlsPols  listFlag
		allowDst listFlag
		mtaSTS   bool
		provs    repeatFlag
		hostname string
		whRetry  durationListFlag
		secrets  listFlag
		kf       kekFlags
	)
	dbf.register(fs)
	logf.register(fs)
	fs.StringVar(&cfg.HTTPAddr, "http-addr", ":8080", "REST API listen address")
	fs.StringVar(&cfg.GRPCAddr, "grpc-addr", ":9090", "gRPC API listen address")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "listen address of a separate /metrics listener; empty serves /metrics on --http-addr")
	fs.BoolVar(&cfg.Profiling, "pprof", false, "also serve Go's runtime profiles under /debug/pprof/ on the --metrics-addr listener (which it needs)")
	fs.StringVar(&cfg.TLSCertFile, "tls-cert-file", "", "PEM certificate (chain) for TLS on the REST and gRPC listeners; needs --tls-key-file")
	fs.StringVar(&cfg.TLSKeyFile, "tls-key-file", "", "PEM private key of --tls-cert-file")
	fs.BoolVar(&cfg.Sandbox, "sandbox", false, "deliver every message to an in-process SMTP server whose replies depend on the recipient (see README)")
	fs.StringVar(&cfg.BounceDomain, "bounce-domain", "", "send every message from a VERP address at this domain and receive its bounces, complaints and automatic replies with the bounce listener (its MX must point there); empty sends from the message's own envelope sender, and bounces go to that mailbox (sandbox mode: "+app.SandboxBounceDomain+")")
	fs.Var(&secrets, "bounce-secret", "secret that signs VERP addresses, at least 16 bytes; repeatable or comma-separated: the first signs, all verify (rotation); required with --bounce-domain (sandbox mode generates one per run)")
	fs.StringVar(&cfg.BounceListener.Addr, "bounce-addr", "", "bounce listener address (default :2525; sandbox mode without --bounce-domain: a free port on 127.0.0.1)")
	fs.StringVar(&cfg.BootstrapAPIKey, "bootstrap-api-key", "", "API key to store when the database has none (otherwise one is generated and printed once)")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", 30*time.Second, "how long API calls and SMTP sessions in flight may take to finish when stopping")
	fs.StringVar(&hostname, "hostname", "", "name used in EHLO and in Message-IDs; empty uses the machine's host name when it is fully qualified, else localhost.localdomain")
	fs.IntVar(&svc.MaxRecipients, "max-recipients", 50, "most recipients (to+cc+bcc) in one message")
	fs.Int64Var(&svc.MaxMessageBytes, "max-message-bytes", 10<<20, "largest accepted message, encoded")
	fs.DurationVar(&svc.APIKeyCacheTTL, "api-key-cache-ttl", service.DefaultAPIKeyCacheTTL, "how long a looked-up API key is trusted; a key revoked on another instance is refused within this long")
	fs.IntVar(&svc.Intake.Queue, "intake-queue", db.DefaultCommitterQueue, "most send calls waiting to be committed; more are answered 503 / Unavailable with Retry-After")
	kf.register(fs)
	fs.BoolVar(&svc.AllowUnverifiedDomains, "allow-unverified-domains", false, "accept mail whose From domain is not a verified domain of the caller's project (it is sent unsigned); sandbox mode always does")
	fs.DurationVar(&svc.DKIMKeyGrace, "dkim-key-grace", service.DefaultDKIMKeyGrace, "how long a replaced DKIM key stays published after a rotation")
	fs.StringVar(&dlv.DNSServer, "dns-server", "", "DNS server (host:port) for MX lookups; empty uses the system's resolver configuration")
	fs.IntVar(&dlv.SMTP.Port, "smtp-port", 25, "destination SMTP port")
	fs.Var(&routes, "route", "static route domain=host:port (or *=host:port), repeatable; overrides MX lookup")
	fs.IntVar(&dlv.Concurrency, "concurrency", 100, "most SMTP sessions at once")
	fs.IntVar(&dlv.PerDomainConcurrency, "per-domain-concurrency", 10, "most SMTP sessions at once to one destination domain")
	fs.Var(&provs, "provider", "limits of a destination provider, 'name=suffix1,suffix2;connections=N;per-connection=M;per-minute=K' (MX host name suffixes); repeatable; a built-in name (google, microsoft, yahoo, apple, ...) changes the parts given")
	fs.IntVar(&dlv.Shaping.Instances, "instances", 1, "instances sharing the database: each enforces this share of every provider's connections and messages per minute")
	fs.IntVar(&svc.RequestsPerSecond, "requests-per-second", 0, "API calls per second per key, per instance, unless the key or its project overrides it; 0 is no limit")
	fs.Int64Var(&svc.RecipientsPerDay, "recipients-per-day", 0, "recipients per project and UTC day, over all instances, unless the project overrides it; 0 is no limit")
	fs.DurationVar(&dlv.MaxAttemptDuration, "max-attempt-duration", 10*time.Minute, "cap on one delivery attempt (DNS, every MX host, the SMTP session)")
	fs.DurationVar(&dlv.LeaseDuration, "lease", 30*time.Second, "how long claimed recipients stay reserved without a renewal (renewed every third of it); a crashed instance's recipients are taken over after about this long")
	fs.DurationVar(&dlv.PollInterval, "poll-interval", 5*time.Second, "how often to look for scheduled and retry work without a notification")
	fs.DurationVar(&dlv.Retry.InitialInterval, "retry-initial", time.Minute, "delay before the first retry of a deferred recipient")
	fs.DurationVar(&dlv.Retry.MaxInterval, "retry-max", time.Hour, "longest delay between retries")
	fs.DurationVar(&dlv.Retry.MaxAge, "max-age", 48*time.Hour, "give up (status failed) on a recipient after this long")
	fs.IntVar(&dlv.MaxAmbiguousRetries, "max-ambiguous-retries", 0, "give up (status failed) on a recipient after this many retries of attempts whose outcome stayed unknown (connection lost after the end of data); 0 retries until --max-age")
	fs.DurationVar(&dlv.SMTP.ConnectTimeout, "smtp-connect-timeout", 30*time.Second, "timeout for the TCP connection to an MX")
	fs.DurationVar(&dlv.SMTP.CommandTimeout, "smtp-command-timeout", 5*time.Minute, "timeout for each SMTP command's reply (RFC 5321 section 4.5.3.2)")
	fs.DurationVar(&dlv.SMTP.DataTimeout, "smtp-data-timeout", 10*time.Minute, "timeout for writing the message and for the reply to its end")
	fs.DurationVar(&dlv.SMTP.IdleTimeout, "smtp-idle-timeout", 5*time.Second, "how long an idle SMTP connection is kept for reuse")
	fs.IntVar(&dlv.SMTP.MaxReuse, "smtp-max-reuse", 100, "most transactions sent over one SMTP connection")
	fs.DurationVar(&dlv.DNSTimeout, "dns-timeout", 20*time.Second, "timeout for all DNS lookups of one domain")
	fs.IntVar(&dlv.BatchSize, "batch-size", 100, "most recipients claimed in one query")
	fs.BoolVar(&dlv.SMTP.VerifyTLS, "smtp-verify-tls", false, "refuse STARTTLS peers whose certificate does not verify")
	fs.Var(&tlsPols, "tls-policy", "TLS policy of a recipient domain, domain=none|opportunistic|require|require-verified, repeatable; replaces the domain's MTA-STS policy")
	fs.BoolVar(&mtaSTS, "mta-sts", true, "apply the MTA-STS policies (RFC 8461) recipient domains publish")
	fs.Var(&allowDst, "allow-destination", "address range (CIDR) that MX hosts may resolve to although it is loopback, private, link-local or otherwise internal, repeatable")
	fs.StringVar(&dlv.IPVersion, "ip-version", delivery.IPPrefer4, "address families of MX hosts: prefer-4, prefer-6, 4 (IPv4 only) or 6 (IPv6 only)")
	fs.BoolVar(&cfg.WebhookAllowPrivate, "webhook-allow-private", false, "let webhook URLs point at loopback, private and link-local addresses (local development and tests; never the cloud metadata service)")
	fs.IntVar(&cfg.Webhook.Concurrency, "webhook-concurrency", webhook.DefaultConcurrency, "most webhook requests in flight at once")
	fs.Var(&whRetry, "webhook-retry-schedule", "delays before each webhook retry, comma-separated (default 5s,5m,30m,2h,5h,10h,10h); after the last a delivery has failed")
	fs.DurationVar(&cfg.Webhook.Timeout, "webhook-timeout", webhook.DefaultTimeout, "cap on one webhook request: connect, TLS, sending and reading the response")
	fs.DurationVar(&cfg.Webhook.DisableAfter, "webhook-disable-after", webhook.DefaultDisableAfter, "disable a webhook endpoint whose attempts have all failed for this long; negative never")
	fs.IntVar(&cfg.Webhook.DisableAfterFailures, "webhook-disable-after-failures", 0, "disable a webhook endpoint after this many failed attempts in a row; 0 leaves it to --webhook-disable-after")
	fs.DurationVar(&cfg.Webhook.PollInterval, "webhook-poll-interval", webhook.DefaultPollInterval, "how often to read new events for webhooks and look for due webhook retries")
	fs.DurationVar(&cfg.Retention.BodyRetention, "retain-bodies", retention.DefaultBodyRetention, "empty a message's raw body this long after every recipient is final (delivered, bounced, failed, canceled); negative keeps bodies")
	fs.DurationVar(&cfg.Retention.MessageRetention, "retain-messages", retention.DefaultMessageRetention, "delete a final message with its recipients, attempts and events this long after it became final; negative keeps them")
	fs.DurationVar(&cfg.Retention.Interval, "retention-interval", retention.DefaultInterval, "how often one instance runs retention")
	fs.DurationVar(&cfg.Statistics.Interval, "analyze-interval", statskeeper.DefaultInterval, "how often to check whether the outbox tables need an ANALYZE that autovacuum has not done yet; negative: never")
	fs.IntVar(&cfg.Retention.BatchSize, "retention-batch-size", retention.DefaultBatchSize, "most rows retention purges or deletes in one transaction")
	fs.IntVar(&cfg.DatabaseMaxConns, "database-max-conns", app.DefaultDatabaseMaxConns(), "most connections to the database at once")
	fs.DurationVar(&cfg.DatabaseWait, "database-wait", app.DefaultDatabaseWait, "how long to keep trying a database that does not accept connections yet; 0 tries once")
	fs.DurationVar(&cfg.HTTPReadTimeout, "http-read-timeout", app.DefaultHTTPReadTimeout, "deadline for reading a whole REST request, body included")
	// These two default to values derived from --http-read-timeout, so that
	// raising or lowering it alone stays a valid configuration.
	fs.DurationVar(&cfg.HTTPWriteTimeout, "http-write-timeout", 0, "deadline from the end of a REST request's headers to the end of its response; longer than --http-read-timeout (default 60s, or twice --http-read-timeout when that is longer)")
	fs.DurationVar(&cfg.HTTPReadHeaderTimeout, "http-read-header-timeout", 0, "deadline for reading a REST request's headers (default 10s, or --http-read-timeout when that is shorter)")
	fs.DurationVar(&cfg.HTTPIdleTimeout, "http-idle-timeout", app.DefaultHTTPIdleTimeout, "how long an idle keep-alive REST connection is kept")
	fs.IntVar(&cfg.HTTPMaxConnections, "http-max-connections", app.DefaultMaxConnections, "most REST connections open at once; more wait until one closes")
	fs.IntVar(&cfg.GRPCMaxConnections, "grpc-max-connections", app.DefaultMaxConnections, "most gRPC connections open at once; more wait until one closes")
	fs.IntVar(&cfg.GRPCMaxConcurrentStreams, "grpc-max-concurrent-streams", app.DefaultGRPCMaxConcurrentStreams, "most calls in flight on one gRPC connection; REST shares one, so keep it at least --http-max-connections")
	fs.DurationVar(&cfg.GRPCKeepaliveTime, "grpc-keepalive-time", app.DefaultGRPCKeepaliveTime, "ping a gRPC client after this long without traffic")
	fs.DurationVar(&cfg.GRPCKeepaliveTimeout, "grpc-keepalive-timeout", app.DefaultGRPCKeepaliveTimeout, "close a gRPC connection whose ping is not answered within this")
	fs.DurationVar(&cfg.GRPCKeepaliveMinTime, "grpc-keepalive-min-time", app.DefaultGRPCKeepaliveMinTime, "shortest interval allowed between a client's keepalive pings; faster clients are disconnected")
	fs.DurationVar(&cfg.GRPCIdleTimeout, "grpc-idle-timeout", app.DefaultGRPCIdleTimeout, "close a gRPC connection that had no call for this long")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
	}
	if printOnly {
		return printConfig(stdout, fs)
	}
	logger, err := newLogger(stderr, logf.level, logf.format)
	if err != nil {
		return err
	}
	if len(routes) > 0 {
		dlv.Routes = make(map[string]string, len(routes))
		for _, r := range routes {
			domain, target, ok := strings.Cut(r, "=")
			if !ok || domain == "" || target == "" {
				return fmt.Errorf("%s: want domain=host:port, got %q", flagRef("route"), r)
			}
			dlv.Routes[strings.ToLower(domain)] = target
		}
	}
	if len(tlsPols) > 0 {
		dlv.TLSPolicies = make(map[string]string, len(tlsPols))
		for _, p := range tlsPols {
			domain, policy, ok := strings.Cut(p, "=")
			if !ok || domain == "" || policy == "" {
				return fmt.Errorf("%s: want domain=policy, got %q", flagRef("tls-policy"), p)
			}
			dlv.TLSPolicies[strings.ToLower(domain)] = policy
		}
	}
	if dlv.AllowDestinations, err = netguard.ParsePrefixes(allowDst); err != nil {
		return fmt.Errorf("%s: %w", flagRef("allow-destination"), err)
	}
	dlv.MTASTS.Disabled = !mtaSTS
	for _, spec := range provs {
		p, err := delivery.ParseProvider(spec)
		if err != nil {
			return fmt.Errorf("%s: %w", flagRef("provider"), err)
		}
		dlv.Shaping.Providers = append(dlv.Shaping.Providers, p)
	}
	switch {
	case cfg.DatabaseWait < 0:
		return fmt.Errorf("%s: must not be negative, got %s", flagRef("database-wait"), cfg.DatabaseWait)
	case cfg.DatabaseWait == 0:
		cfg.DatabaseWait = -1 // app's "try once"; its zero means the default
	}
	if len(whRetry) > 0 {
		cfg.Webhook.RetrySchedule = whRetry
	}
	cfg.BounceSecrets = secrets
	if svc.KeyEncryptionKey, err = kf.load(); err != nil {
		return err
	}
	svc.Hostname = hostname
	dlv.SMTP.Hostname = hostname
	cfg.DatabaseURL = dbf.url
	cfg.DataDir = dbf.dataDir
	cfg.Service = svc
	cfg.Delivery = dlv
	cfg.Logger = logger
	cfg.KeyOutput = stdout
	cfg.KeyOutputJSON = logf.format == "json"

	a, err := app.New(cfg)
	if err != nil {
		return configError(err)
	}
	if err := a.Start(ctx); err != nil {
		return err
	}
	bounces := ""
	if addr := a.BounceAddr(); addr != "" {
		bounces = ", bounces on " + addr
	}
	// Every line of a JSON run is JSON; there the log's "posthaste started"
	// line says where each listener is.
	if logf.format != "json" {
		fmt.Fprintf(stdout, "Posthaste is running: REST on %s, gRPC on %s%s. Press Ctrl-C to stop.\n", a.HTTPAddr(), a.GRPCAddr(), bounces)
	}
	<-ctx.Done()
	logger.Info("shutting down")
	// Past the drain deadline, leave time to release leases and to stop the
	// embedded database cleanly.
	stopCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout+30*time.Second)
	defer cancel()
	if err := a.Stop(stopCtx); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("stop: %w", err)
	}
	return nil
}

// configFlags maps the settings of app.Config, by their path, to the serve
// flags that set them, so that a configuration error names what the user
// typed rather than a Go field.
var configFlags = map[string]string{
	"BootstrapAPIKey":                "bootstrap-api-key",
	"BounceDomain":                   "bounce-domain",
	"BounceSecrets":                  "bounce-secret",
	"BounceListener.Addr":            "bounce-addr",
	"TLSCertFile":                    "tls-cert-file",
	"TLSKeyFile":                     "tls-key-file",
	"ShutdownTimeout":                "shutdown-timeout",
	"DatabaseWait":                   "database-wait",
	"DatabaseMaxConns":               "database-max-conns",
	"HTTPReadTimeout":                "http-read-timeout",
	"HTTPWriteTimeout":               "http-write-timeout",
	"HTTPReadHeaderTimeout":          "http-read-header-timeout",
	"HTTPIdleTimeout":                "http-idle-timeout",
	"HTTPMaxConnections":             "http-max-connections",
	"Profiling":                      "pprof",
	"GRPCMaxConnections":             "grpc-max-connections",
	"GRPCMaxConcurrentStreams":       "grpc-max-concurrent-streams",
	"GRPCKeepaliveTime":              "grpc-keepalive-time",
	"GRPCKeepaliveTimeout":           "grpc-keepalive-timeout",
	"GRPCKeepaliveMinTime":           "grpc-keepalive-min-time",
	"GRPCIdleTimeout":                "grpc-idle-timeout",
	"Service.MaxRecipients":          "max-recipients",
	"Service.MaxMessageBytes":        "max-message-bytes",
	"Service.APIKeyCacheTTL":         "api-key-cache-ttl",
	"Service.Intake.Queue":           "intake-queue",
	"Service.Hostname":               "hostname",
	"Service.KeyEncryptionKey":       "key-encryption-key",
	"Service.DKIMKeyGrace":           "dkim-key-grace",
	"Delivery.SMTP.Hostname":         "hostname",
	"Delivery.SMTP.Port":             "smtp-port",
	"Delivery.SMTP.ConnectTimeout":   "smtp-connect-timeout",
	"Delivery.SMTP.CommandTimeout":   "smtp-command-timeout",
	"Delivery.SMTP.DataTimeout":      "smtp-data-timeout",
	"Delivery.SMTP.IdleTimeout":      "smtp-idle-timeout",
	"Delivery.SMTP.MaxReuse":         "smtp-max-reuse",
	"Delivery.Routes":                "route",
	"Delivery.TLSPolicies":           "tls-policy",
	"Delivery.AllowDestinations":     "allow-destination",
	"Delivery.IPVersion":             "ip-version",
	"Delivery.Concurrency":           "concurrency",
	"Delivery.PerDomainConcurrency":  "per-domain-concurrency",
	"Delivery.Shaping.Providers":     "provider",
	"Delivery.Shaping.Instances":     "instances",
	"Service.RequestsPerSecond":      "requests-per-second",
	"Service.RecipientsPerDay":       "recipients-per-day",
	"Delivery.MaxAttemptDuration":    "max-attempt-duration",
	"Delivery.PollInterval":          "poll-interval",
	"Delivery.Retry.InitialInterval": "retry-initial",
	"Delivery.Retry.MaxInterval":     "retry-max",
	"Delivery.Retry.MaxAge":          "max-age",
	"Delivery.DNSTimeout":            "dns-timeout",
	"Delivery.BatchSize":             "batch-size",
	"Delivery.ShutdownTimeout":       "shutdown-timeout",
	"Delivery.LeaseDuration":         "lease",
	"Delivery.MaxAmbiguousRetries":   "max-ambiguous-retries",
	"Webhook.Concurrency":            "webhook-concurrency",
	"Webhook.RetrySchedule":          "webhook-retry-schedule",
	"Webhook.Timeout":                "webhook-timeout",
	"Webhook.DisableAfter":           "webhook-disable-after",
	"Webhook.DisableAfterFailures":   "webhook-disable-after-failures",
	"Webhook.PollInterval":           "webhook-poll-interval",
	"Retention.BodyRetention":        "retain-bodies",
	"Retention.MessageRetention":     "retain-messages",
	"Retention.Interval":             "retention-interval",
	"Retention.BatchSize":            "retention-batch-size",
	"Statistics.Interval":            "analyze-interval",
}

// goName matches a Go field name inside a problem's text, such as the
// InitialInterval in "must not be less than InitialInterval".
var goName = regexp.MustCompile(`\b[A-Z][A-Za-z0-9]*\b`)

// configError rewrites an *app.FieldError to name the flag and environment
// variable behind the setting, in the problem's text too; other errors
// pass unchanged.
func configError(err error) error {
	var fe *app.FieldError
	if !errors.As(err, &fe) {
		return err
	}
	name, ok := configFlags[fe.Field]
	if !ok {
		return err
	}
	parent := ""
	if i := strings.LastIndex(fe.Field, "."); i >= 0 {
		parent = fe.Field[:i+1]
	}
	problem := goName.ReplaceAllStringFunc(fe.Problem, func(w string) string {
		if sibling, ok := configFlags[parent+w]; ok {
			return "--" + sibling
		}
		return w
	})
	return fmt.Errorf("%s: %s", flagRef(name), problem)
}
