// Package gateway serves MailService over REST/JSON. It is a grpc-gateway
// reverse proxy that calls the in-process gRPC server over an in-memory
// connection (PipeListener), so REST requests pass the same authentication, logging and
// validation as gRPC ones. It also owns the REST error shape, /healthz and
// the OpenAPI documents.
package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/textproto"
	"net/url"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// Option changes how New builds the handler.
type Option func(*options)

type options struct {
	maxBodyBytes int64
	authCheck    AuthCheck
	dialer       func(ctx context.Context, addr string) (net.Conn, error)
	observer     service.CallObserver
	tracer       trace.TracerProvider
	dialOptions  []grpc.DialOption
}

// WithDialer makes the gateway reach the gRPC server through dial instead
// of a TCP connection to grpcAddr; PipeListener.Dial is the one meant for
// it, with the gRPC server serving that PipeListener. Defaults to TCP.
func WithDialer(dial func(ctx context.Context, addr string) (net.Conn, error)) Option {
	return func(o *options) { o.dialer = dial }
}

// AuthCheck checks the value of a request's Authorization header ("" when
// there is none) and returns nil when it names a valid API key, else a
// gRPC status error, shown to the caller as the REST error it maps to
// (Unauthenticated is 401). service.Server.CheckAuthorization is one.
type AuthCheck func(ctx context.Context, authorization string) error

// WithAuthCheck makes every route except /healthz and /openapi.json check
// the API key with check before the request body is read, so a caller
// without a valid key is refused at once whatever its body does. The gRPC
// server checks the key again. Defaults to no check here, leaving it to
// the gRPC server alone.
func WithAuthCheck(check AuthCheck) Option {
	return func(o *options) { o.authCheck = check }
}

// WithMaxBodyBytes sets the largest request body accepted; larger ones are
// answered 413 before they are read. Set it from the service's
// MaxMessageBytes: a JSON request is about as large as the encoded message
// it describes, so twice that leaves room for JSON escaping. Defaults to
// twice service.DefaultMaxMessageBytes.
func WithMaxBodyBytes(n int64) Option {
	return func(o *options) { o.maxBodyBytes = n }
}

// forwardedHeaders are the HTTP headers passed to the gRPC server, under
// their lowercase names as metadata. Nothing else is forwarded, so a caller
// cannot smuggle metadata the server would trust. Authorization is missing
// on purpose: grpc-gateway always forwards it as "authorization" itself, and
// forwarding it again would send the key twice.
var forwardedHeaders = map[string]string{
	"Idempotency-Key": "idempotency-key",
	// Set by assignRequestID to a sane value on every request, so the gRPC
	// server logs the call under the id the REST client sees.
	requestIDHeader: service.RequestIDMetadataKey,
}

// New returns an HTTP handler serving the REST mapping of the MailService
// listening at grpcAddr (host:port of the in-process server, or the address
// WithDialer is given), plus /healthz
// and /openapi.json, and a function that closes its gRPC connection.
func New(ctx context.Context, grpcAddr string, logger *slog.Logger, opts ...Option) (http.Handler, func() error, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	o := options{maxBodyBytes: 2 * service.DefaultMaxMessageBytes, tracer: noopTracer}
	for _, opt := range opts {
		opt(&o)
	}
	if o.maxBodyBytes <= 0 {
		return nil, nil, fmt.Errorf("gateway: max body bytes must be positive, got %d", o.maxBodyBytes)
	}

	target := grpcAddr
	dialOpts := []grpc.DialOption{
		// The server is this process, over loopback or in memory: there is
		// nothing for TLS to protect.
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallSendMsgSize(int(2*o.maxBodyBytes)),
			grpc.MaxCallRecvMsgSize(64<<20),
		),
	}
	dialOpts = append(dialOpts, o.dialOptions...)
	if o.dialer != nil {
		// The address means nothing to a resolver; hand it to the dialer
		// as it is.
		target = "passthrough:///" + grpcAddr
		dialOpts = append(dialOpts, grpc.WithContextDialer(o.dialer))
	}
	conn, err := grpc.NewClient(target, dialOpts...)
	if err != nil {
		return nil, nil, fmt.Errorf("gateway: connect to grpc server %s: %w", grpcAddr, err)
	}

	g := &gateway{log: logger, maxBodyBytes: o.maxBodyBytes, authCheck: o.authCheck,
		observer: o.observer, tracer: o.tracer,
		openAPI: posthastev1.OpenAPI(), openAPIv3: posthastev1.OpenAPIv3()}
	marshaler := &jsonMarshaler{JSONPb: runtime.JSONPb{
		// EmitDefaultValues writes empty lists as [], empty maps as {}, and
		// zero numbers, strings and false as such, so a client finds every
		// field of an answer whatever its value ({"messages":[]}, not {}).
		// Unlike EmitUnpopulated it leaves out fields that have presence
		// and are unset (timestamps such as delivered_at, messages such as
		// last_reply, the oneof of a batch result), rather than writing null:
		// absent means "not set", never "set to nothing".
		MarshalOptions:   protojson.MarshalOptions{UseProtoNames: true, EmitDefaultValues: true},
		UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: false},
	}}
	mux := runtime.NewServeMux(
		runtime.WithMarshalerOption(runtime.MIMEWildcard, marshaler),
		runtime.WithMarshalerOption(mimeRFC822, rfc822Marshaler{marshaler}),
		runtime.WithIncomingHeaderMatcher(matchIncomingHeader),
		// Response headers come from our own server; none are meant for
		// HTTP clients.
		runtime.WithOutgoingHeaderMatcher(func(string) (string, bool) { return "", false }),
		runtime.WithOutgoingTrailerMatcher(func(string) (string, bool) { return "", false }),
		runtime.WithErrorHandler(g.handleError),
		runtime.WithRoutingErrorHandler(g.handleRoutingError),
		runtime.WithForwardResponseOption(setSuccessStatus),
		runtime.WithMiddlewares(noteRoute, g.checkQuery),
		runtime.WithDisableHTTPMethodOverride(),
		runtime.WithDisablePathLengthFallback(),
	)
	if err := posthastev1.RegisterMailServiceHandler(ctx, mux, conn); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("gateway: register mail service: %w", err)
	}
	health := healthpb.NewHealthClient(conn)
	if err := mux.HandlePath(http.MethodGet, "/healthz", g.healthz(health)); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("gateway: register /healthz: %w", err)
	}
	for path, doc := range map[string][]byte{"/openapi.json": g.openAPI, "/openapi.v3.json": g.openAPIv3} {
		if err := mux.HandlePath(http.MethodGet, path, serveDocument(doc)); err != nil {
			conn.Close()
			return nil, nil, fmt.Errorf("gateway: register %s: %w", path, err)
		}
	}
	// Outermost first: give the request its id, so that every answer,
	// even to a panic, carries it; log, count and trace the request;
	// recover from anything below; refuse
	// callers without a key, then bodies that are not JSON, before a byte
	// of the body is read; bound the body as it is read.
	h := assignRequestID(g.observe(g.recoverPanics(g.requireAuth(g.requireJSON(preferRFC822(g.limitBody(mux)))))))
	return h, conn.Close, nil
}

type gateway struct {
	log          *slog.Logger
	observer     service.CallObserver
	tracer       trace.TracerProvider
	maxBodyBytes int64
	authCheck    AuthCheck
	openAPI      []byte // served as /openapi.json; never changed
	openAPIv3    []byte // served as /openapi.v3.json; never changed
}

func matchIncomingHeader(key string) (string, bool) {
	md, ok := forwardedHeaders[textproto.CanonicalMIMEHeaderKey(key)]
	return md, ok
}

// setSuccessStatus answers 202 Accepted to the send methods: the message is
// committed for delivery, not delivered. Both return a SendMessageResponse
// and nothing else does. The answer says where the message's status is
// (Location, RFC 9110 section 10.2.2) and, for an idempotent replay, that
// nothing new was stored (Idempotent-Replayed, as the IETF's
// Idempotency-Key draft and several payment APIs name it).
func setSuccessStatus(ctx context.Context, w http.ResponseWriter, resp proto.Message) error {
	noteCaller(ctx)
	if r, ok := resp.(*posthastev1.SendMessageResponse); ok {
		w.Header().Set("Location", "/v1/messages/"+url.PathEscape(r.GetId()))
		if r.GetReplayed() {
			w.Header().Set("Idempotent-Replayed", "true")
		}
		w.WriteHeader(http.StatusAccepted)
	}
	return nil
}

func serveDocument(doc []byte) runtime.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request, _ map[string]string) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(doc)
	}
}
