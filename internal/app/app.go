// Package app assembles one Posthaste process: database (configured or
// embedded), migrations, the gRPC API with its REST gateway, the delivery
// dispatcher and, in sandbox mode, the in-process SMTP server that stands in
// for every MX.
package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/delivery/sandbox"
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
	// DatabaseURL is the PostgreSQL connection string. Defaults to an
	// embedded PostgreSQL in DataDir.
	DatabaseURL string
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
	// SandboxServer configures the sandbox SMTP server. Defaults to
	// sandbox.Config's defaults.
	SandboxServer sandbox.Config
	// ShutdownTimeout is how long a graceful stop lets API calls and SMTP
	// sessions in flight finish; it becomes the dispatcher's
	// ShutdownTimeout unless Delivery sets one. Stopping the embedded
	// database afterwards has its own time. Defaults to 30s.
	ShutdownTimeout time.Duration
	// Logger receives the process log. Defaults to a discarding logger.
	Logger *slog.Logger
	// KeyOutput receives a generated first API key. Defaults to io.Discard.
	KeyOutput io.Writer
}

// WithDefaults returns cfg with zero fields set to their defaults.
func (cfg Config) WithDefaults() Config {
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
	if cfg.KeyOutput == nil {
		cfg.KeyOutput = io.Discard
	}
	return cfg
}

// App is a running Posthaste process.
type App struct {
	cfg Config
	log *slog.Logger

	database   *Database
	store      *db.DB
	notifier   *db.OutboxNotifier
	api        *service.Server
	sandbox    *sandbox.Server
	dispatcher *delivery.Dispatcher
	grpcServer *grpc.Server
	grpcLis    net.Listener
	httpServer *http.Server
	httpLis    net.Listener
	gwClose    func() error

	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// New validates cfg and returns an App that is not started yet.
func New(cfg Config) (*App, error) {
	cfg = cfg.WithDefaults()
	if cfg.BootstrapAPIKey != "" && len(cfg.BootstrapAPIKey) < service.MinAPIKeyLength {
		return nil, fmt.Errorf("BootstrapAPIKey: must be at least %d characters", service.MinAPIKeyLength)
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

	a.database, err = OpenDatabase(ctx, a.cfg.DatabaseURL, a.cfg.DataDir, a.log)
	if err != nil {
		return err
	}
	if err := db.Migrate(ctx, a.database.URL); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	a.store, err = db.Open(ctx, a.database.URL)
	if err != nil {
		return fmt.Errorf("open database: %w", err)
	}

	svcCfg := a.cfg.Service
	if svcCfg.Logger == nil {
		svcCfg.Logger = a.log.With("component", "api")
	}
	// Built before anything else is started so that a bad configuration
	// stops the process before it prints or stores anything.
	a.api, err = service.New(svcCfg, a.store, func() {
		// The local dispatcher wakes at once; other instances hear the
		// coalesced NOTIFY.
		a.dispatcher.Wake()
		a.notifier.Kick()
	})
	if err != nil {
		return fmt.Errorf("service: %w", err)
	}
	if err := a.bootstrapAPIKey(ctx); err != nil {
		return err
	}

	deliveryCfg := a.cfg.Delivery
	if deliveryCfg.ShutdownTimeout == 0 {
		deliveryCfg.ShutdownTimeout = a.cfg.ShutdownTimeout
	}
	if deliveryCfg.Logger == nil {
		deliveryCfg.Logger = a.log.With("component", "delivery")
	}
	if a.cfg.Sandbox {
		sbCfg := a.cfg.SandboxServer
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
		return fmt.Errorf("delivery: %w", err)
	}
	a.dispatcher.Start(runCtx)

	a.notifier = db.NewOutboxNotifier(a.store, 0, a.log.With("component", "notify"))
	a.notifier.Start(runCtx)

	a.grpcServer = service.NewGRPCServer(a.api, a.store, svcCfg.Logger)
	a.grpcLis, err = net.Listen("tcp", a.cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("listen grpc on %s: %w", a.cfg.GRPCAddr, err)
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.grpcServer.Serve(a.grpcLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			a.log.Error("grpc server stopped", "err", err)
		}
	}()

	maxMessage := svcCfg.WithDefaults().MaxMessageBytes
	// Base64 in JSON grows a message by a third; the gateway's bound only
	// stops absurd bodies early, the service enforces the real limit.
	handler, gwClose, err := gateway.New(runCtx, dialAddr(a.grpcLis.Addr()), svcCfg.Logger, gateway.WithMaxBodyBytes(2*maxMessage))
	if err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	a.gwClose = gwClose
	a.httpLis, err = net.Listen("tcp", a.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listen http on %s: %w", a.cfg.HTTPAddr, err)
	}
	a.httpServer = &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.httpServer.Serve(a.httpLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("http server stopped", "err", err)
		}
	}()

	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.maintain(runCtx)
	}()

	a.log.Info("posthaste started", "http", a.HTTPAddr(), "grpc", a.GRPCAddr(), "embedded_database", a.database.Embedded())
	return nil
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
	if a.httpServer != nil {
		if err := a.httpServer.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shutdown http: %w", err))
		}
	} else if a.httpLis != nil {
		_ = a.httpLis.Close()
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
	} else if a.grpcLis != nil {
		_ = a.grpcLis.Close()
	}
	if a.dispatcher != nil {
		a.dispatcher.Stop()
	}
	if a.notifier != nil {
		a.notifier.Stop()
	}
	if a.cancel != nil {
		a.cancel()
	}
	a.wg.Wait()
	if a.sandbox != nil {
		a.sandbox.Stop()
	}
	if a.store != nil {
		a.store.Close()
	}
	if a.database != nil {
		if err := a.database.Close(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// maintain runs periodic housekeeping that belongs to no request.
func (a *App) maintain(ctx context.Context) {
	t := time.NewTicker(10 * time.Minute)
	defer t.Stop()
	for {
		n, err := a.store.DeleteExpiredIdempotencyKeys(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			a.log.Warn("delete expired idempotency keys", "err", err)
		case n > 0:
			a.log.Debug("deleted expired idempotency keys", "count", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
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
	case created && generated:
		fmt.Fprintf(a.cfg.KeyOutput, "\nCreated the first API key. It is shown only this once:\n\n    %s\n\n", key)
		a.log.Info("created the first API key")
	case created:
		a.log.Info("stored the bootstrap API key")
	}
	return nil
}

// dialAddr turns a listener address into one the in-process gateway can
// dial: a wildcard host becomes loopback.
func dialAddr(addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return addr.String()
	}
	ip := tcp.IP
	switch {
	case ip == nil || ip.IsUnspecified() && ip.To4() != nil:
		ip = net.IPv4(127, 0, 0, 1)
	case ip.IsUnspecified():
		ip = net.IPv6loopback
	}
	return net.JoinHostPort(ip.String(), fmt.Sprint(tcp.Port))
}
