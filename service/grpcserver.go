package service

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// publicServices need no API key: probes and tooling must work without one.
var publicServices = []string{
	"/" + healthpb.Health_ServiceDesc.ServiceName + "/",
	"/grpc.reflection.v1.ServerReflection/",
	"/grpc.reflection.v1alpha.ServerReflection/",
}

func isPublic(fullMethod string) bool {
	for _, p := range publicServices {
		if strings.HasPrefix(fullMethod, p) {
			return true
		}
	}
	return false
}

// NewGRPCServer returns a gRPC server with MailService, the standard health
// service and server reflection registered. Every call passes through panic
// recovery, logging and, except for health and reflection, API key
// authentication. The caller owns Serve and Stop.
//
// Health reports MailService NOT_SERVING while store does not answer a
// ping, and the overall status (service "") SERVING while the process runs;
// see dbHealth.
//
// Requests up to twice srv's MaxMessageBytes are received, which leaves room
// for request framing; the message's encoded size is checked by srv itself
// so that the caller gets MESSAGE_TOO_LARGE rather than a transport error.
//
// opts are added after these, for transport settings that belong to the
// process rather than the API: keepalive, stream and connection limits.
func NewGRPCServer(srv *Server, store *db.DB, logger *slog.Logger, opts ...grpc.ServerOption) *grpc.Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	keys := srv.keys
	if store != srv.store {
		// Keys are looked up where the caller said; the cache is the
		// server's only when it reads the same database.
		keys = newKeyCache(store, srv.cfg.APIKeyCacheTTL, logger)
	}
	ic := interceptors{logger: logger, auth: authenticator{keys: keys, requests: srv.requests}, observer: srv.cfg.Observer}
	gs := grpc.NewServer(append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(int(2 * srv.cfg.MaxMessageBytes)),
		grpc.ChainUnaryInterceptor(ic.requestIDUnary, ic.logUnary, ic.recoverUnary, ic.authUnary),
		grpc.ChainStreamInterceptor(ic.requestIDStream, ic.logStream, ic.recoverStream, ic.authStream),
	}, opts...)...)
	posthastev1.RegisterMailServiceServer(gs, srv)
	h := newDBHealth(readiness(store), logger)
	srv.health.Store(h)
	healthpb.RegisterHealthServer(gs, h)
	reflection.Register(gs)
	return gs
}

type interceptors struct {
	logger   *slog.Logger
	auth     authenticator
	observer CallObserver
}

// CallObserver is told about every finished gRPC call, for metrics. Calls
// the REST gateway forwards are not reported here: the gateway reports them
// as REST calls itself, so each request counts once.
type CallObserver interface {
	ObserveCall(protocol, method, code string, elapsed time.Duration)
}

// CallerMetadataKey is the response header the server sets, on calls that
// come through the in-process gateway only, to the caller's API key id and
// project id ("<key id> <project id>"), so that the gateway's request line
// names them. The gateway forwards no response header to HTTP clients.
const CallerMetadataKey = "posthaste-caller"

// viaGateway reports whether the call came through the in-process REST
// gateway, whose connection is an in-memory pipe: no network client can
// reach the server over one.
func viaGateway(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	return ok && p.Addr != nil && p.Addr.Network() == "pipe"
}

// readiness is what health checks before MailService is SERVING: the
// database answers, and its schema is not behind the binary's migrations.
func readiness(store *db.DB) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := store.Ping(ctx); err != nil {
			return err
		}
		return store.CheckMigrations(ctx)
	}
}

func (ic interceptors) logUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	ctx, slot := withCallerSlot(ctx)
	resp, err := handler(ctx, req)
	ic.logCall(ctx, slot, info.FullMethod, start, err)
	return resp, err
}

func (ic interceptors) logStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	ctx, slot := withCallerSlot(ss.Context())
	err := handler(srv, &authedStream{ServerStream: ss, ctx: ctx})
	ic.logCall(ctx, slot, info.FullMethod, start, err)
	return err
}

// callerSlot is where authentication, which runs inside the logging
// interceptor, leaves the caller for the log line: the context it adds the
// caller to is not the one the logging interceptor holds.
type callerSlot struct {
	mu sync.Mutex
	p  *principal
}

type callerSlotKey struct{}

func withCallerSlot(ctx context.Context) (context.Context, *callerSlot) {
	slot := &callerSlot{}
	return context.WithValue(ctx, callerSlotKey{}, slot), slot
}

// noteCaller records the authenticated caller for the call's log line and,
// on a call through the gateway, tells the gateway for its own line. The
// header goes out with the answer; setting it cannot fail before then.
func noteCaller(ctx context.Context, p principal) {
	if slot, ok := ctx.Value(callerSlotKey{}).(*callerSlot); ok {
		slot.mu.Lock()
		slot.p = &p
		slot.mu.Unlock()
	}
	if viaGateway(ctx) {
		_ = grpc.SetHeader(ctx, metadata.Pairs(CallerMetadataKey, p.keyID.String()+" "+p.projectID.String()))
	}
}

func (ic interceptors) logCall(ctx context.Context, slot *callerSlot, method string, start time.Time, err error) {
	elapsed := time.Since(start)
	code := status.Code(err)
	gateway := viaGateway(ctx)
	if ic.observer != nil && !gateway {
		ic.observer.ObserveCall("grpc", method, code.String(), elapsed)
	}
	level := slog.LevelInfo
	switch {
	case gateway:
		// The gateway logs the REST request at info; this hop is the same
		// request seen from inside.
		level = slog.LevelDebug
	case isPublic(method):
		// Probes call every few seconds; they would drown the useful lines.
		level = slog.LevelDebug
	}
	if code == codes.Internal || code == codes.Unknown {
		level = slog.LevelError
	}
	attrs := []slog.Attr{
		slog.String("protocol", "grpc"),
		slog.String("method", method),
		slog.String("code", code.String()),
		slog.Float64("duration_ms", float64(elapsed.Microseconds())/1000),
		slog.String("request_id", RequestIDFrom(ctx)),
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil && !gateway {
		attrs = append(attrs, slog.String("client_addr", p.Addr.String()))
	}
	if gateway {
		attrs = append(attrs, slog.Bool("via_gateway", true))
	}
	slot.mu.Lock()
	p := slot.p
	slot.mu.Unlock()
	if p != nil {
		attrs = append(attrs, slog.String("api_key_id", p.keyID.String()), slog.String("project_id", p.projectID.String()))
	}
	if err != nil && code != codes.Internal {
		// Internal errors were logged with their cause where they were mapped;
		// their status text is generic.
		attrs = append(attrs, slog.String("error", status.Convert(err).Message()))
	}
	ic.logger.LogAttrs(ctx, level, "grpc call", attrs...)
}

func (ic interceptors) recoverUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			resp, err = nil, ic.panicked(ctx, info.FullMethod, r)
		}
	}()
	return handler(ctx, req)
}

func (ic interceptors) recoverStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = ic.panicked(ss.Context(), info.FullMethod, r)
		}
	}()
	return handler(srv, ss)
}

// panicked turns a recovered panic into an Internal error; a bug in one
// handler must not take the whole process down with it.
func (ic interceptors) panicked(ctx context.Context, method string, r any) error {
	ic.logger.ErrorContext(ctx, "panic in grpc handler", "method", method, "request_id", RequestIDFrom(ctx),
		"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	return internalError(ctx, ic.logger)
}

func (ic interceptors) authUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if isPublic(info.FullMethod) {
		return handler(ctx, req)
	}
	authed, err := ic.auth.authenticate(ctx)
	if err != nil {
		return nil, toStatus(ctx, ic.logger, err)
	}
	if p, ok := principalFrom(authed); ok {
		noteCaller(authed, p)
	}
	return handler(authed, req)
}

func (ic interceptors) authStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if isPublic(info.FullMethod) {
		return handler(srv, ss)
	}
	authed, err := ic.auth.authenticate(ss.Context())
	if err != nil {
		return toStatus(ss.Context(), ic.logger, err)
	}
	if p, ok := principalFrom(authed); ok {
		noteCaller(authed, p)
	}
	return handler(srv, &authedStream{ServerStream: ss, ctx: authed})
}

// authedStream hands a stream handler a context with more in it: the
// caller, the request id.
type authedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *authedStream) Context() context.Context { return s.ctx }
