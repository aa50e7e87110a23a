package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/service"
)

// errorBody is the one shape of every REST error:
//
//	{"error":{"code":400,"status":"INVALID_ARGUMENT","reason":"FIELD_INVALID",
//	  "message":"...","field_violations":[{"field":"subject","description":"..."}],
//	  "request_id":"..."}}
//
// code is the HTTP status, status the gRPC code name, reason the
// google.rpc.ErrorInfo reason, or one the gateway names itself for what it
// refuses on its own (see fallbackReason); it is always set. Every field is
// always present, field_violations as [] when there are none, as in every
// other answer.
type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code            int              `json:"code"`
	Status          string           `json:"status"`
	Message         string           `json:"message"`
	Reason          string           `json:"reason"`
	FieldViolations []fieldViolation `json:"field_violations"`
	RequestID       string           `json:"request_id"`
	// RetryAfter, when positive, is sent as the Retry-After header, in
	// seconds (RFC 9110 section 10.2.3), from the status's RetryInfo.
	RetryAfter int `json:"-"`
}

type fieldViolation struct {
	Field       string `json:"field"`
	Description string `json:"description"`
}

// invalidArgument is a 400 naming every bad field in vs, worded as the
// service words its own (invalid <field>: <description>, and how many more
// problems there are).
func invalidArgument(vs []fieldViolation) errorDetail {
	msg := "invalid request"
	if len(vs) > 0 {
		msg = "invalid " + vs[0].Field + ": " + vs[0].Description
		if n := len(vs) - 1; n == 1 {
			msg += " (and 1 more problem)"
		} else if n > 1 {
			msg += " (and " + strconv.Itoa(n) + " more problems)"
		}
	}
	return errorDetail{
		Code:            http.StatusBadRequest,
		Status:          statusName(codes.InvalidArgument),
		Message:         msg,
		FieldViolations: vs,
	}
}

// statusName is the google.rpc.Code name of c, e.g. INVALID_ARGUMENT.
func statusName(c codes.Code) string {
	switch c {
	case codes.OK:
		return "OK"
	case codes.Canceled:
		return "CANCELLED" // google.rpc.Code spells it so
	case codes.Unknown:
		return "UNKNOWN"
	case codes.InvalidArgument:
		return "INVALID_ARGUMENT"
	case codes.DeadlineExceeded:
		return "DEADLINE_EXCEEDED"
	case codes.NotFound:
		return "NOT_FOUND"
	case codes.AlreadyExists:
		return "ALREADY_EXISTS"
	case codes.PermissionDenied:
		return "PERMISSION_DENIED"
	case codes.ResourceExhausted:
		return "RESOURCE_EXHAUSTED"
	case codes.FailedPrecondition:
		return "FAILED_PRECONDITION"
	case codes.Aborted:
		return "ABORTED"
	case codes.OutOfRange:
		return "OUT_OF_RANGE"
	case codes.Unimplemented:
		return "UNIMPLEMENTED"
	case codes.Internal:
		return "INTERNAL"
	case codes.Unavailable:
		return "UNAVAILABLE"
	case codes.DataLoss:
		return "DATA_LOSS"
	case codes.Unauthenticated:
		return "UNAUTHENTICATED"
	default:
		return "UNKNOWN"
	}
}

// httpStatus maps a gRPC status to HTTP. It follows grpc-gateway's table
// except that a too-large message is 413 (retrying cannot help), while
// other exhausted resources stay 429 (retrying later can).
//
// NOTHING_TO_CANCEL is 409 rather than the table's 400: the request is
// fine, the message's state conflicts with it (RFC 9110 section 15.5.10).
// RAW_PURGED is 410: the body existed and is gone for good (section
// 15.5.11).
func httpStatus(st *status.Status) int {
	switch reason := reasonOf(st); {
	case st.Code() == codes.ResourceExhausted && reason == service.ReasonMessageTooLarge:
		return http.StatusRequestEntityTooLarge
	case st.Code() == codes.FailedPrecondition && reason == service.ReasonNothingToCancel:
		return http.StatusConflict
	case st.Code() == codes.FailedPrecondition && reason == service.ReasonRawPurged:
		return http.StatusGone
	}
	return runtime.HTTPStatusFromCode(st.Code())
}

// Reasons of errors the gateway answers without the gRPC server, which
// therefore carry no ErrorInfo of their own.
const (
	reasonMalformedRequest     = "MALFORMED_REQUEST"
	reasonRequestTooLarge      = "REQUEST_TOO_LARGE"
	reasonRequestTimeout       = "REQUEST_TIMEOUT"
	reasonUnsupportedMediaType = "UNSUPPORTED_MEDIA_TYPE"
	reasonRouteNotFound        = "ROUTE_NOT_FOUND"
	reasonMethodNotAllowed     = "METHOD_NOT_ALLOWED"
	reasonServiceUnavailable   = "SERVICE_UNAVAILABLE"
)

// fallbackReason names the cause of an error that came without a reason:
// one the gateway found itself (a body or query it cannot parse, a route
// that does not exist), or a status from the gRPC server without an
// ErrorInfo. Reasons never depend on the wording of the message.
func fallbackReason(d errorDetail) string {
	switch d.Code {
	case http.StatusBadRequest:
		if len(d.FieldViolations) > 0 {
			return service.ReasonFieldInvalid
		}
		return reasonMalformedRequest
	case http.StatusUnauthorized:
		return service.ReasonUnauthenticated
	case http.StatusNotFound:
		return reasonRouteNotFound
	case http.StatusMethodNotAllowed:
		return reasonMethodNotAllowed
	case http.StatusRequestTimeout:
		return reasonRequestTimeout
	case http.StatusRequestEntityTooLarge:
		return reasonRequestTooLarge
	case http.StatusUnsupportedMediaType:
		return reasonUnsupportedMediaType
	case http.StatusInternalServerError:
		return service.ReasonInternal
	case http.StatusServiceUnavailable:
		return reasonServiceUnavailable
	}
	return d.Status
}

func reasonOf(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}

// handleError writes every error the mux meets (from the gRPC server, from
// decoding the request, from the gateway itself) in the one REST shape.
func (g *gateway) handleError(ctx context.Context, _ *runtime.ServeMux, _ runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
	noteCaller(ctx)
	if b := bodyFrom(r.Context()); b != nil {
		if b.tooLarge {
			g.writeError(w, r, g.bodyTooLarge())
			return
		}
		if b.decodeErr != nil {
			g.writeError(w, r, *b.decodeErr)
			return
		}
	}
	var httpErr *runtime.HTTPStatusError
	if errors.As(err, &httpErr) {
		st := status.Convert(httpErr.Err)
		g.writeError(w, r, errorDetail{
			Code:    httpErr.HTTPStatus,
			Status:  statusName(st.Code()),
			Message: st.Message(),
		})
		return
	}
	st := status.Convert(err)
	d := errorDetail{
		Code:    httpStatus(st),
		Status:  statusName(st.Code()),
		Message: st.Message(),
		Reason:  reasonOf(st),
	}
	for _, detail := range st.Details() {
		switch detail := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range detail.GetFieldViolations() {
				d.FieldViolations = append(d.FieldViolations, fieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			d.RetryAfter = retryAfterSeconds(detail.GetRetryDelay().AsDuration())
		}
	}
	if st.Code() == codes.Unavailable && d.Reason == "" && ctx.Err() == nil {
		// The connection to our own server failed; its text names internal
		// addresses.
		g.log.WarnContext(ctx, "grpc backend unavailable", "request_id", r.Header.Get(requestIDHeader), "error", st.Message())
		d.Message = "service temporarily unavailable, retry later"
	}
	g.writeError(w, r, d)
}

// handleRoutingError answers requests that match no route (404) or match
// one with another method (405).
func (g *gateway) handleRoutingError(_ context.Context, _ *runtime.ServeMux, _ runtime.Marshaler, w http.ResponseWriter, r *http.Request, code int) {
	d := errorDetail{Code: code, Message: http.StatusText(code)}
	switch code {
	case http.StatusNotFound:
		d.Status = statusName(codes.NotFound)
		d.Message = "no such resource: " + r.URL.Path
	case http.StatusMethodNotAllowed:
		d.Status = statusName(codes.Unimplemented)
		d.Message = "method " + r.Method + " is not allowed on " + r.URL.Path
	case http.StatusBadRequest:
		d.Status = statusName(codes.InvalidArgument)
	default:
		d.Status = statusName(codes.Internal)
	}
	g.writeError(w, r, d)
}

func (g *gateway) writeError(w http.ResponseWriter, r *http.Request, d errorDetail) {
	h := w.Header()
	if d.Reason == "" {
		d.Reason = fallbackReason(d)
	}
	if d.FieldViolations == nil {
		d.FieldViolations = []fieldViolation{}
	}
	d.RequestID = h.Get(requestIDHeader)
	h.Del("Trailer")
	h.Del("Transfer-Encoding")
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	if d.Code == http.StatusUnauthorized {
		// RFC 6750 section 3.
		h.Set("WWW-Authenticate", `Bearer realm="posthaste"`)
	}
	if d.RetryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(d.RetryAfter))
	}
	w.WriteHeader(d.Code)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false) // messages quote <key> and the like; this is not HTML
	if err := enc.Encode(errorBody{Error: d}); err != nil {
		g.log.DebugContext(r.Context(), "write error response", "error", err)
	}
}

// retryAfterSeconds rounds a suggested delay up to whole seconds, the unit
// of Retry-After; any positive delay is at least one.
func retryAfterSeconds(d time.Duration) int {
	if d <= 0 {
		return 0
	}
	return int((d + time.Second - 1) / time.Second)
}
