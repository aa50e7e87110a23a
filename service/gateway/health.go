package gateway

import (
	"context"
	"net/http"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// healthCheckTimeout bounds a /healthz probe; a probe that hangs is a
// failed probe.
const healthCheckTimeout = 5 * time.Second

// healthz answers 200 "ok" while the gRPC health service reports
// MailService SERVING, and 503 otherwise. Going through the gRPC server
// (rather than answering locally) proves the whole REST-to-gRPC path works,
// and asking for MailService rather than the process as a whole makes the
// answer include the database, without which no call can succeed: this is a
// readiness check.
func (g *gateway) healthz(client healthpb.HealthClient) func(http.ResponseWriter, *http.Request, map[string]string) {
	return func(w http.ResponseWriter, r *http.Request, _ map[string]string) {
		ctx, cancel := context.WithTimeout(r.Context(), healthCheckTimeout)
		defer cancel()
		var header metadata.MD
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{
			Service: posthastev1.MailService_ServiceDesc.ServiceName,
		}, grpc.Header(&header))
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			msg := "not serving"
			if reason := header.Get(service.HealthReasonMetadataKey); len(reason) > 0 {
				msg += ": " + reason[0]
			}
			if err != nil {
				g.log.WarnContext(r.Context(), "health check failed", "error", err)
				msg = "health check failed"
			}
			g.writeError(w, r, errorDetail{
				Code:    http.StatusServiceUnavailable,
				Status:  statusName(codes.Unavailable),
				Message: msg,
			})
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write([]byte("ok"))
	}
}
