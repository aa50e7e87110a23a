package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/internal/metrics"
)

// startMetricsServer serves /metrics on MetricsAddr, a listener of its own.
func (a *App) startMetricsServer(m *metrics.Metrics) error {
	lis, err := net.Listen("tcp", a.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("listen metrics on %s: %w", a.cfg.MetricsAddr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	if a.cfg.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	a.metricsLis = lis
	a.metricsSrv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		// Long enough for a CPU profile of the default 30 seconds.
		WriteTimeout: time.Minute,
		ErrorLog:     slog.NewLogLogger(a.log.With("component", "metrics").Handler(), slog.LevelWarn),
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.metricsSrv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("metrics server stopped", "err", err)
		}
	}()
	return nil
}

// setMetricSources points the scrape-time metrics at the running parts.
func (a *App) setMetricSources(m *metrics.Metrics) {
	store, api, janitor := a.store, a.api, a.janitor
	m.SetSources(metrics.Sources{
		Accepted: func() int64 { return api.IntakeStats().Messages },
		Queue:    store.QueueDepth,
		Pool:     func() *pgxpool.Stat { return store.PoolStat() },
		Retention: func() (int64, int64) {
			t := janitor.Stats().Total
			return t.BodiesPurged, t.Messages + t.Recipients + t.Attempts + t.Events + t.IdempotencyKeys + t.WebhookDeliveries
		},
		// The same checks as the readiness probe: the database answers and
		// its schema is current.
		Ready: func(ctx context.Context) bool {
			return store.Ping(ctx) == nil && store.CheckMigrations(ctx) == nil
		},
	})
}

// MetricsAddr is the address /metrics listens on: the REST address unless
// MetricsAddr is configured.
func (a *App) MetricsAddr() string {
	if a.metricsLis != nil {
		return a.metricsLis.Addr().String()
	}
	return a.HTTPAddr()
}

// Metrics is the process's metrics.
func (a *App) Metrics() *metrics.Metrics { return a.cfg.Metrics }
