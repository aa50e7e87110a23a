package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/posthaste/posthaste/db"
)

// ErrorDomain is the domain of the google.rpc.ErrorInfo details this
// service attaches to errors.
const ErrorDomain = "posthaste"

// ReasonMessageTooLarge is the google.rpc.ErrorInfo reason of the
// ResourceExhausted error returned for a message over Config.MaxMessageBytes.
// It tells a too-large message (which retrying cannot fix; HTTP 413) apart
// from other exhausted resources.
const ReasonMessageTooLarge = "MESSAGE_TOO_LARGE"

// ReasonOverloaded is the google.rpc.ErrorInfo reason of the Unavailable
// error returned when the intake's queue is full. Its RetryInfo says when to
// try again; REST sends it as Retry-After.
const ReasonOverloaded = "OVERLOADED"

// overloadRetryDelay is the pause suggested to a caller refused for
// overload: long enough for a full queue to be committed several times over.
const overloadRetryDelay = time.Second

// fieldViolation is one problem with one request field. field is a path in
// proto field names, e.g. to[2].address or metadata["k"].
type fieldViolation struct {
	field, description string
}

// invalidArgumentError collects every problem found in a request, so a
// caller can fix them all in one round trip.
type invalidArgumentError struct {
	violations []fieldViolation
}

func (e *invalidArgumentError) Error() string {
	if len(e.violations) == 0 {
		return "invalid request"
	}
	v := e.violations[0]
	msg := "invalid " + v.field + ": " + v.description
	if n := len(e.violations) - 1; n == 1 {
		msg += " (and 1 more problem)"
	} else if n > 1 {
		msg += " (and " + strconv.Itoa(n) + " more problems)"
	}
	return msg
}

// invalidField returns an error naming one bad field.
func invalidField(field, description string) error {
	return &invalidArgumentError{violations: []fieldViolation{{field, description}}}
}

// messageTooLargeError is returned when the encoded message exceeds the
// configured limit.
type messageTooLargeError struct {
	size, limit int64
	// estimate marks size as a lower bound, found before building.
	estimate bool
}

func (e *messageTooLargeError) Error() string {
	if e.estimate {
		return fmt.Sprintf("message too large: at least %d bytes encoded, the limit is %d", e.size, e.limit)
	}
	return fmt.Sprintf("message too large: %d bytes encoded, the limit is %d", e.size, e.limit)
}

// unauthenticatedError is a missing or unusable API key. reason is safe to
// show to the caller.
type unauthenticatedError struct {
	reason string
}

func (e *unauthenticatedError) Error() string { return e.reason }

// permissionDeniedError is a valid API key without the scope a call needs.
type permissionDeniedError struct {
	scope string
}

func (e *permissionDeniedError) Error() string {
	return "the API key lacks the " + e.scope + " scope this call needs"
}

// notFoundError names what was not found, for resources other than
// messages (a bare db.ErrNotFound answers "message not found"). Another
// project's row answers the same as an unknown id.
type notFoundError struct {
	what string
	err  error
}

func (e *notFoundError) Error() string { return e.what + " not found" }
func (e *notFoundError) Unwrap() error { return e.err }

// toStatus is the one place that turns an error into the gRPC status a
// caller sees. Only errors whose text was written for the caller keep their
// text; anything unexpected becomes a generic Internal error and the cause
// goes to the log, so internals (SQL, hosts, paths) never leak.
func toStatus(ctx context.Context, logger *slog.Logger, err error) error {
	if err == nil {
		return nil
	}
	var (
		invalid  *invalidArgumentError
		tooLarge *messageTooLargeError
		unauth   *unauthenticatedError
		denied   *permissionDeniedError
		notFound *notFoundError
		limited  *rateLimitedError
		sender   *senderDeniedError
	)
	switch {
	case errors.As(err, &invalid):
		st := status.New(codes.InvalidArgument, invalid.Error())
		br := &errdetails.BadRequest{}
		for _, v := range invalid.violations {
			br.FieldViolations = append(br.FieldViolations, &errdetails.BadRequest_FieldViolation{
				Field:       v.field,
				Description: v.description,
			})
		}
		return withDetails(ctx, logger, st, br)
	case errors.As(err, &tooLarge):
		st := status.New(codes.ResourceExhausted, tooLarge.Error())
		return withDetails(ctx, logger, st, &errdetails.ErrorInfo{
			Reason: ReasonMessageTooLarge,
			Domain: ErrorDomain,
			Metadata: map[string]string{
				"size":  strconv.FormatInt(tooLarge.size, 10),
				"limit": strconv.FormatInt(tooLarge.limit, 10),
			},
		})
	case errors.As(err, &limited):
		st := status.New(codes.ResourceExhausted, limited.Error())
		return withDetails(ctx, logger, st,
			&errdetails.ErrorInfo{Reason: ReasonRateLimited, Domain: ErrorDomain},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(max(limited.retryAfter, time.Second))})
	case errors.As(err, &sender):
		st := status.New(codes.PermissionDenied, sender.Error())
		return withDetails(ctx, logger, st, &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
			Field: sender.field, Description: "the API key may not send from " + sender.domain,
		}}})
	case errors.As(err, &unauth):
		return status.Error(codes.Unauthenticated, unauth.reason)
	case errors.As(err, &denied):
		return status.Error(codes.PermissionDenied, denied.Error())
	case errors.As(err, &notFound):
		return status.Error(codes.NotFound, notFound.Error())
	case errors.Is(err, db.ErrNotFound):
		return status.Error(codes.NotFound, "message not found")
	case errors.Is(err, db.ErrIdempotencyConflict):
		return status.Error(codes.AlreadyExists,
			"idempotency key was already used with a different request; use a new key for a new request")
	case errors.Is(err, db.ErrOverloaded):
		// Retrying after a pause is what helps, and RetryInfo says how long
		// (the gateway turns it into Retry-After).
		st := status.New(codes.Unavailable, "too many messages waiting to be stored, retry later")
		return withDetails(ctx, logger, st,
			&errdetails.ErrorInfo{Reason: ReasonOverloaded, Domain: ErrorDomain},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(overloadRetryDelay)})
	case errors.Is(err, db.ErrUnavailable):
		logger.WarnContext(ctx, "database unavailable", "method", methodName(ctx), "error", err)
		return status.Error(codes.Unavailable, "service temporarily unavailable, retry later")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "request canceled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	default:
		logger.ErrorContext(ctx, "internal error", "method", methodName(ctx), "error", err)
		return status.Error(codes.Internal, "internal error")
	}
}

func withDetails(ctx context.Context, logger *slog.Logger, st *status.Status, d ...protoadapt.MessageV1) error {
	ds, err := st.WithDetails(d...)
	if err != nil {
		// Only a marshalling bug gets here; the bare status still carries the message.
		logger.ErrorContext(ctx, "attach error details", "error", err)
		return st.Err()
	}
	return ds.Err()
}

func methodName(ctx context.Context) string {
	m, _ := grpc.Method(ctx)
	return m
}
