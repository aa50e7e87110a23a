package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/internal/app"
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
	fs := newFlagSet("serve", stderr)
	var (
		dbf      databaseFlags
		logf     logFlags
		cfg      app.Config
		svc      service.Config
		dlv      delivery.Config
		routes   listFlag
		hostname string
	)
	dbf.register(fs)
	logf.register(fs)
	fs.StringVar(&cfg.HTTPAddr, "http-addr", ":8080", "REST API listen address")
	fs.StringVar(&cfg.GRPCAddr, "grpc-addr", ":9090", "gRPC API listen address")
	fs.BoolVar(&cfg.Sandbox, "sandbox", false, "deliver every message to an in-process SMTP server whose replies depend on the recipient (see README)")
	fs.StringVar(&cfg.BootstrapAPIKey, "bootstrap-api-key", "", "API key to store when the database has none (otherwise one is generated and printed once)")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", 30*time.Second, "how long API calls and SMTP sessions in flight may take to finish when stopping")
	fs.StringVar(&hostname, "hostname", "", "name used in EHLO and in Message-IDs; empty uses the machine's host name when it is fully qualified, else localhost.localdomain")
	fs.IntVar(&svc.MaxRecipients, "max-recipients", 50, "most recipients (to+cc+bcc) in one message")
	fs.Int64Var(&svc.MaxMessageBytes, "max-message-bytes", 10<<20, "largest accepted message, encoded")
	fs.StringVar(&dlv.DNSServer, "dns-server", "", "DNS server (host:port) for MX lookups; empty uses the system's resolver configuration")
	fs.IntVar(&dlv.SMTP.Port, "smtp-port", 25, "destination SMTP port")
	fs.Var(&routes, "route", "static route domain=host:port (or *=host:port), repeatable; overrides MX lookup")
	fs.IntVar(&dlv.Concurrency, "concurrency", 100, "most SMTP sessions at once")
	fs.IntVar(&dlv.PerDomainConcurrency, "per-domain-concurrency", 10, "most SMTP sessions at once to one destination domain")
	fs.DurationVar(&dlv.MaxAttemptDuration, "max-attempt-duration", 10*time.Minute, "cap on one delivery attempt (DNS, every MX host, the SMTP session)")
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
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
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
				return fmt.Errorf("route: want domain=host:port, got %q", r)
			}
			dlv.Routes[strings.ToLower(domain)] = target
		}
	}
	svc.Hostname = hostname
	dlv.SMTP.Hostname = hostname
	cfg.DatabaseURL = dbf.url
	cfg.DataDir = dbf.dataDir
	cfg.Service = svc
	cfg.Delivery = dlv
	cfg.Logger = logger
	cfg.KeyOutput = stdout

	a, err := app.New(cfg)
	if err != nil {
		return err
	}
	if err := a.Start(ctx); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Posthaste is running: REST on %s, gRPC on %s. Press Ctrl-C to stop.\n", a.HTTPAddr(), a.GRPCAddr())
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
