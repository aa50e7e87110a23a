package gateway

import (
	"context"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"

	"github.com/posthaste/posthaste/service"
)

// WithObserver reports every REST request to o once, under protocol
// "rest", its route pattern and HTTP status. Defaults to none.
func WithObserver(o service.CallObserver) Option {
	return func(opts *options) { opts.observer = o }
}

// WithTracerProvider starts a server span for every REST request, the
// parent of the gRPC call it makes (when the gateway's connection
// propagates it, see WithDialOptions). Defaults to no tracing.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(opts *options) { opts.tracer = tp }
}

// WithDialOptions adds options to the gateway's connection to the gRPC
// server, such as a stats handler for tracing. Defaults to none.
func WithDialOptions(dopts ...grpc.DialOption) Option {
	return func(opts *options) { opts.dialOptions = append(opts.dialOptions, dopts...) }
}

// restCall is what the request line says about one REST request; parts of
// it are learnt deep inside the mux (the route, the caller), so the mux
// fills in the instance the outermost middleware put in the context.
type restCall struct {
	mu      sync.Mutex
	route   string
	keyID   string
	project string
}

type restCallKey struct{}

func restCallFrom(ctx context.Context) *restCall {
	c, _ := ctx.Value(restCallKey{}).(*restCall)
	return c
}

// noteRoute records the route pattern the mux matched; runs as a mux
// middleware, where the pattern is known.
func noteRoute(next runtime.HandlerFunc) runtime.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request, params map[string]string) {
		if c := restCallFrom(r.Context()); c != nil {
			if p, ok := runtime.HTTPPattern(r.Context()); ok {
				c.mu.Lock()
				c.route = p.String()
				c.mu.Unlock()
			}
		}
		next(w, r, params)
	}
}

// noteCaller records the caller the gRPC server authenticated, which it
// sends back to the gateway in a response header.
func noteCaller(ctx context.Context) {
	c := restCallFrom(ctx)
	if c == nil {
		return
	}
	md, ok := runtime.ServerMetadataFromContext(ctx)
	if !ok {
		return
	}
	v := md.HeaderMD.Get(service.CallerMetadataKey)
	if len(v) == 0 {
		return
	}
	key, project, _ := strings.Cut(v[0], " ")
	c.mu.Lock()
	c.keyID, c.project = key, project
	c.mu.Unlock()
}

// statusWriter remembers the response status for the request line.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 && code >= 200 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Flush() {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// observe logs one line per REST request, reports it to the observer and
// traces it. It sits inside assignRequestID so the line carries the id.
// The route is the mux's pattern ("/v1/messages/{id}"), never the raw
// path, so metrics keep a bounded label set; a request no route matched is
// "unmatched".
func (g *gateway) observe(next http.Handler) http.Handler {
	tracer := g.tracer.Tracer("github.com/posthaste/posthaste/service/gateway")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		call := &restCall{}
		if publicPaths[r.URL.Path] {
			call.route = r.URL.Path
		}
		ctx, span := tracer.Start(context.WithValue(r.Context(), restCallKey{}, call), "rest "+r.Method,
			trace.WithSpanKind(trace.SpanKindServer))
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			elapsed := time.Since(start)
			code := sw.code
			if code == 0 {
				code = http.StatusOK
			}
			call.mu.Lock()
			route, keyID, project := call.route, call.keyID, call.project
			call.mu.Unlock()
			if route == "" {
				route = "unmatched"
			}
			method := r.Method + " " + route
			span.SetName("rest " + method)
			span.SetAttributes(attribute.String("http.request.method", r.Method),
				attribute.String("http.route", route), attribute.Int("http.response.status_code", code))
			if code >= 500 {
				span.SetStatus(codes.Error, http.StatusText(code))
			}
			span.End()
			if g.observer != nil {
				g.observer.ObserveCall("rest", method, strconv.Itoa(code), elapsed)
			}
			level := slog.LevelInfo
			switch {
			case code >= 500:
				level = slog.LevelError
			case publicPaths[r.URL.Path]:
				// Probes call every few seconds; they would drown the useful lines.
				level = slog.LevelDebug
			}
			attrs := []slog.Attr{
				slog.String("protocol", "rest"),
				slog.String("method", r.Method),
				slog.String("route", route),
				slog.String("path", r.URL.Path),
				slog.Int("code", code),
				slog.Float64("duration_ms", float64(elapsed.Microseconds())/1000),
				slog.String("request_id", r.Header.Get(requestIDHeader)),
				slog.String("client_addr", r.RemoteAddr),
			}
			if keyID != "" {
				attrs = append(attrs, slog.String("api_key_id", keyID), slog.String("project_id", project))
			}
			g.log.LogAttrs(ctx, level, "rest call", attrs...)
		}()
		next.ServeHTTP(sw, r.WithContext(ctx))
	})
}

// noopTracer is the default: spans cost nothing and go nowhere.
var noopTracer trace.TracerProvider = noop.NewTracerProvider()
