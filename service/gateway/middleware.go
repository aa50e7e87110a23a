package gateway

import (
	"fmt"
	"mime"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/service"
)

// publicPaths are served without an API key: probes and tooling must work
// without one.
var publicPaths = map[string]bool{
	"/healthz":         true,
	"/openapi.json":    true,
	"/openapi.v3.json": true,
}

// requestIDHeader carries a request's id in both directions.
const requestIDHeader = "X-Request-Id"

// assignRequestID gives every request an id: the client's X-Request-Id when
// it is sane (service.ValidRequestID), else a new one. The id is sent back
// on the response, forwarded to the gRPC server, which logs the call under
// it, and written into error bodies, so one id ties together what a client
// saw and what the server logged.
func assignRequestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		values := r.Header.Values(requestIDHeader)
		id := ""
		if len(values) == 1 && service.ValidRequestID(values[0]) {
			id = values[0]
		} else {
			id = service.NewRequestID()
		}
		r.Header.Set(requestIDHeader, id)
		w.Header().Set(requestIDHeader, id)
		next.ServeHTTP(w, r)
	})
}

// recoverPanics answers 500 in the usual error shape when anything below it
// panics, and logs the panic with its stack. The gRPC server recovers its
// own handlers; this covers what runs only for REST (these middlewares,
// /healthz, /openapi.json, the mux itself), so that a bug there fails one
// request rather than the connection or the process.
func (g *gateway) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rw := &trackingWriter{ResponseWriter: w}
		defer func() {
			p := recover()
			if p == nil {
				return
			}
			if p == http.ErrAbortHandler {
				// The documented way to abort a response; net/http handles it.
				panic(p)
			}
			g.log.ErrorContext(r.Context(), "panic in http handler", "method", r.Method, "path", r.URL.Path,
				"request_id", r.Header.Get(requestIDHeader),
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			if rw.wroteHeader {
				// Part of a response is out; the client must not take it for a
				// whole one.
				panic(http.ErrAbortHandler)
			}
			rw.Header().Set("Connection", "close")
			g.writeError(rw, r, errorDetail{
				Code:    http.StatusInternalServerError,
				Status:  statusName(codes.Internal),
				Message: "internal error",
			})
		}()
		next.ServeHTTP(rw, r)
	})
}

// trackingWriter remembers whether the response has started.
type trackingWriter struct {
	http.ResponseWriter
	wroteHeader bool
}

func (w *trackingWriter) WriteHeader(code int) {
	if code >= 200 {
		w.wroteHeader = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *trackingWriter) Write(p []byte) (int, error) {
	w.wroteHeader = true
	return w.ResponseWriter.Write(p)
}

// Flush passes flushes on; grpc-gateway flushes streamed responses.
func (w *trackingWriter) Flush() {
	w.wroteHeader = true
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the server's writer, for
// per-request deadlines.
func (w *trackingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// requireAuth checks the API key before anything reads the request body.
// Without it, a caller with no key could open many connections and send
// their bodies a byte at a time, holding the connections and the server's
// memory while the key is only checked once the whole body arrived. The
// gRPC server checks the key again; that costs a lookup and keeps one
// authority on who may call.
func (g *gateway) requireAuth(next http.Handler) http.Handler {
	if g.authCheck == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if publicPaths[r.URL.Path] {
			next.ServeHTTP(w, r)
			return
		}
		var err error
		switch values := r.Header.Values("Authorization"); len(values) {
		case 0:
			err = g.authCheck(r.Context(), "")
		case 1:
			err = g.authCheck(r.Context(), values[0])
		default:
			err = status.Error(codes.Unauthenticated, "more than one authorization value")
		}
		if err != nil {
			g.refuseUnread(w, r, g.statusDetail(r, err))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// requireJSON answers 415 to a request whose body is declared as anything
// but JSON, before reading it. A body without a Content-Type is taken as
// JSON, so that clients which send none keep working. curl -d declares
// application/x-www-form-urlencoded and is refused: the README's examples
// set the header.
func (g *gateway) requireJSON(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ct := r.Header.Get("Content-Type")
		if r.ContentLength == 0 || ct == "" {
			next.ServeHTTP(w, r)
			return
		}
		if !isJSON(ct) {
			g.refuseUnread(w, r, errorDetail{
				Code:    http.StatusUnsupportedMediaType,
				Status:  statusName(codes.InvalidArgument),
				Message: fmt.Sprintf("unsupported Content-Type %q: send application/json", ct),
			})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// isJSON reports whether a Content-Type value is application/json, with
// parameters allowed except a charset other than UTF-8 (RFC 8259 section
// 8.1: JSON between systems is UTF-8).
func isJSON(contentType string) bool {
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil || mt != "application/json" {
		return false
	}
	cs, ok := params["charset"]
	return !ok || strings.EqualFold(cs, "utf-8")
}

// refuseUnread answers a request whose body was not read and closes the
// connection afterwards. Without "Connection: close", net/http would read
// what is left of a small body before sending the answer, to keep the
// connection, and a body that trickles in would delay the refusal by as
// long as the client likes. Even with it, net/http still reads up to 256
// KiB of the unread body after the answer before it closes, bounded only
// by the server's read timeout; the short read deadline ends that, so a
// refused client cannot keep its connection (and a slot under
// --http-max-connections) by trickling a body.
func (g *gateway) refuseUnread(w http.ResponseWriter, r *http.Request, d errorDetail) {
	if r.ContentLength == 0 {
		g.writeError(w, r, d)
		return
	}
	w.Header().Set("Connection", "close")
	g.writeError(w, r, d)
	// The grace lets the answer reach the client before the close: closing
	// with unread data in the socket sends a reset, which can discard the
	// answer on the client's side.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(refusedBodyGrace))
}

// refusedBodyGrace is how long a refused request's body may go on arriving
// before its connection is closed.
const refusedBodyGrace = 500 * time.Millisecond

// statusDetail describes an error from an injected check, which should be
// a gRPC status; anything else is a bug whose text is not for the caller.
func (g *gateway) statusDetail(r *http.Request, err error) errorDetail {
	st, ok := status.FromError(err)
	if !ok {
		g.log.ErrorContext(r.Context(), "authorization check failed", "error", err)
		return errorDetail{Code: http.StatusInternalServerError, Status: statusName(codes.Internal), Message: "internal error"}
	}
	return errorDetail{Code: httpStatus(st), Status: statusName(st.Code()), Message: st.Message(), Reason: reasonOf(st)}
}
