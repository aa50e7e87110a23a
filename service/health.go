package service

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/db"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

const (
	// healthPingTimeout bounds the database ping behind a health check. A
	// database that takes longer to answer a trivial round trip is not one
	// to send traffic to, and probes themselves time out after a second or
	// two.
	healthPingTimeout = 2 * time.Second
	// healthPingEvery is how long one ping's answer is reused. The health
	// service needs no API key, so without it anyone could turn a flood of
	// probes into a flood of database round trips.
	healthPingEvery = time.Second
)

// dbHealth is the standard gRPC health service with MailService's status
// tied to the database, since no method can answer without it: a Check or
// List first pings the database (at most once per healthPingEvery) and sets
// MailService SERVING or NOT_SERVING by the result, so Watch streams see the
// change too.
//
// The overall status (service "") does not depend on the database and stays
// SERVING while the process runs: it answers "is this process alive", which
// restarting cannot improve when the database is down. Readiness belongs to
// MailService; /healthz asks for it.
type dbHealth struct {
	*health.Server
	ping   func(context.Context) error
	logger *slog.Logger

	mu       sync.Mutex
	pingedAt time.Time
	serving  bool
	reason   string // why not serving; "" while serving
}

// HealthReasonMetadataKey is the response header a MailService health
// check carries while not serving: a short reason safe to show to anyone
// who can reach the probe ("database unreachable", or the schema versions
// when the database is behind the binary's migrations).
const HealthReasonMetadataKey = "posthaste-health-reason"

func newDBHealth(ping func(context.Context) error, logger *slog.Logger) *dbHealth {
	h := &dbHealth{Server: health.NewServer(), ping: ping, logger: logger, serving: true}
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	h.SetServingStatus(posthastev1.MailService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	return h
}

// Check answers for one service, pinging the database first when the
// service is MailService.
func (h *dbHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if req.GetService() == posthastev1.MailService_ServiceDesc.ServiceName {
		h.refresh(ctx)
		if reason := h.notServingReason(); reason != "" {
			_ = grpc.SetHeader(ctx, metadata.Pairs(HealthReasonMetadataKey, reason))
		}
	}
	return h.Server.Check(ctx, req)
}

// List answers for every service, MailService's status freshly checked.
func (h *dbHealth) List(ctx context.Context, req *healthpb.HealthListRequest) (*healthpb.HealthListResponse, error) {
	h.refresh(ctx)
	return h.Server.List(ctx, req)
}

// notServingReason is why MailService is not serving, "" when it is.
func (h *dbHealth) notServingReason() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.reason
}

// refresh pings the database unless that was done within healthPingEvery,
// and sets MailService's status by the result. Concurrent callers wait for
// one ping rather than each sending their own.
func (h *dbHealth) refresh(ctx context.Context) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.pingedAt.IsZero() && time.Since(h.pingedAt) < healthPingEvery {
		return
	}
	// The answer is shared with other probes, so it must be about the
	// database, not about this caller's deadline.
	pingCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), healthPingTimeout)
	defer cancel()
	err := h.ping(pingCtx)
	h.pingedAt = time.Now()
	serving := err == nil
	if serving != h.serving {
		// Only changes are logged: probes run every few seconds.
		if serving {
			h.logger.InfoContext(ctx, "database ready again: serving")
		} else {
			h.logger.WarnContext(ctx, "database not ready: not serving", "error", err)
		}
	}
	h.serving = serving
	h.reason = ""
	switch {
	case serving:
	case errors.Is(err, db.ErrMigrationsBehind):
		// The versions only: they tell an operator which way to migrate.
		_, h.reason, _ = strings.Cut(err.Error(), "migrations: ")
		h.reason = "database schema behind binary: " + h.reason
	default:
		h.reason = "database unreachable"
	}
	st := healthpb.HealthCheckResponse_SERVING
	if !serving {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	h.SetServingStatus(posthastev1.MailService_ServiceDesc.ServiceName, st)
}
