package service

import (
	"context"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// RequestIDMetadataKey carries a call's request id: in the incoming
// metadata when the client chose one, and always in the response headers.
// The REST gateway forwards the X-Request-Id header under it.
const RequestIDMetadataKey = "x-request-id"

// maxRequestIDLen bounds a client's request id; longer ones are replaced,
// so a caller cannot make every log line of its calls arbitrarily long.
const maxRequestIDLen = 128

// ValidRequestID reports whether a request id sent by a client is passed
// through: 1 to 128 characters of letters, digits and -_.:/+=@ (UUIDs,
// ULIDs, base64 and most tracing ids). Anything else, spaces and control
// characters included, is replaced by a generated id rather than refused:
// a bad id must not fail a call, nor reach the logs as it is.
func ValidRequestID(id string) bool {
	if id == "" || len(id) > maxRequestIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '-', c == '_', c == '.', c == ':', c == '/', c == '+', c == '=', c == '@':
		default:
			return false
		}
	}
	return true
}

// NewRequestID returns a fresh request id, a random UUID.
func NewRequestID() string {
	return uuid.NewString()
}

type requestIDKey struct{}

// RequestIDFrom returns the request id of the call ctx belongs to, "" outside
// a call.
func RequestIDFrom(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

// requestID picks the call's id: the client's when it is sane, else a new
// one.
func requestID(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(RequestIDMetadataKey); len(v) == 1 && ValidRequestID(v[0]) {
		return v[0]
	}
	return NewRequestID()
}

// requestIDUnary gives every call an id, returns it in the response headers
// and puts it in the context for the log line of the call. It runs first so
// that every answer, refusals by later interceptors included, carries it.
func (ic interceptors) requestIDUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	id := requestID(ctx)
	// SetHeader only fails once the headers are sent, which cannot have
	// happened before the handler ran.
	_ = grpc.SetHeader(ctx, metadata.Pairs(RequestIDMetadataKey, id))
	return handler(context.WithValue(ctx, requestIDKey{}, id), req)
}

func (ic interceptors) requestIDStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	id := requestID(ss.Context())
	_ = ss.SetHeader(metadata.Pairs(RequestIDMetadataKey, id))
	return handler(srv, &authedStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), requestIDKey{}, id)})
}
