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

// The google.rpc.ErrorInfo reasons of the errors this service returns.
// Every error a call can get carries one, so that a program branches on the
// reason rather than on the wording of a message or on a status code that
// several causes share. REST sends it as the error body's reason. Reasons
// are stable: new ones may be added, existing ones keep their meaning.
const (
	// ReasonFieldInvalid is InvalidArgument for request fields that fail
	// validation; google.rpc.BadRequest names every one.
	ReasonFieldInvalid = "FIELD_INVALID"
	// ReasonMessageTooLarge is the ResourceExhausted error returned for a
	// message over Config.MaxMessageBytes. It tells a too-large message
	// (which retrying cannot fix; HTTP 413) apart from other exhausted
	// resources.
	ReasonMessageTooLarge = "MESSAGE_TOO_LARGE"
	// ReasonUnauthenticated is a missing, malformed, unknown or revoked API
	// key.
	ReasonUnauthenticated = "UNAUTHENTICATED"
	// ReasonMissingScope is PermissionDenied: the key lacks the scope the
	// call needs, named in the metadata under "scope".
	ReasonMissingScope = "MISSING_SCOPE"
	// ReasonNotFound is NotFound: no such resource in the caller's project.
	// The metadata's "resource" says which kind.
	ReasonNotFound = "NOT_FOUND"
	// ReasonIdempotencyConflict is AlreadyExists: the idempotency key was
	// used with a different request.
	ReasonIdempotencyConflict = "IDEMPOTENCY_CONFLICT"
	// ReasonNothingToCancel is FailedPrecondition from CancelMessage when
	// every recipient is already final.
	ReasonNothingToCancel = "NOTHING_TO_CANCEL"
	// ReasonRawPurged is FailedPrecondition from GetMessageRaw when
	// retention has emptied the message's body.
	ReasonRawPurged = "RAW_PURGED"
	// ReasonOverloaded is the Unavailable error returned when the intake's
	// queue is full. Its RetryInfo says when to try again; REST sends it as
	// Retry-After.
	ReasonOverloaded = "OVERLOADED"
	// ReasonDatabaseUnavailable is Unavailable: the database cannot be
	// reached. Retrying later, with the same idempotency key, is safe.
	ReasonDatabaseUnavailable = "DATABASE_UNAVAILABLE"
	// ReasonCanceled is Canceled: the caller went away.
	ReasonCanceled = "CANCELED"
	// ReasonDeadlineExceeded is DeadlineExceeded: the caller's deadline
	// passed before the call finished.
	ReasonDeadlineExceeded = "DEADLINE_EXCEEDED"
	// ReasonInternal is Internal: a bug; the server's log has the cause.
	ReasonInternal = "INTERNAL"
)

// ReasonDomainNotVerified is the google.rpc.ErrorInfo reason of the
// PermissionDenied error returned for mail whose From domain is not a
// verified domain of the caller's project. Its metadata names the field and
// the domain.
const ReasonDomainNotVerified = "DOMAIN_NOT_VERIFIED"

// ReasonSenderNotAllowed is PermissionDenied: the API key is restricted to
// sender domains that do not include the message's.
const ReasonSenderNotAllowed = "SENDER_NOT_ALLOWED"

// Reasons of the domain calls' other errors.
const (
	// ReasonAlreadyExists is AlreadyExists: the domain is already added to
	// the project.
	ReasonAlreadyExists = "ALREADY_EXISTS"
	// ReasonFailedPrecondition is FailedPrecondition: the resource's state
	// does not allow the call (a rotation already pending, say).
	ReasonFailedPrecondition = "FAILED_PRECONDITION"
	// ReasonNoKeyEncryptionKey is FailedPrecondition: DKIM keys cannot be
	// stored because no key-encryption key is configured.
	ReasonNoKeyEncryptionKey = "NO_KEY_ENCRYPTION_KEY"
)

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

// unverifiedDomainError refuses mail from a domain the project has not
// verified: anyone could otherwise send in the name of any domain.
type unverifiedDomainError struct {
	field, domain string
}

func (e *unverifiedDomainError) Error() string {
	return e.field + ": " + e.domain + " is not a verified sending domain of this project; " +
		"add it (POST /v1/domains), publish its DKIM record and verify it"
}

// conflictError is a create that clashes with what exists; its text is the
// caller's to read.
type conflictError struct {
	msg string
	err error
}

func (e *conflictError) Error() string { return e.msg }
func (e *conflictError) Unwrap() error { return e.err }

// preconditionError is a call that cannot be done in the current state
// (of the resource or the server's configuration); its text says why.
type preconditionError struct {
	msg string
	err error
}

func (e *preconditionError) Error() string { return e.msg }
func (e *preconditionError) Unwrap() error { return e.err }

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
		unverif  *unverifiedDomainError
		conflict *conflictError
		precond  *preconditionError
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
		return withDetails(ctx, logger, st, errorInfo(ReasonFieldInvalid, nil), br)
	case errors.As(err, &tooLarge):
		st := status.New(codes.ResourceExhausted, tooLarge.Error())
		return withDetails(ctx, logger, st, errorInfo(ReasonMessageTooLarge, map[string]string{
			"size":  strconv.FormatInt(tooLarge.size, 10),
			"limit": strconv.FormatInt(tooLarge.limit, 10),
		}))
	case errors.As(err, &limited):
		st := status.New(codes.ResourceExhausted, limited.Error())
		return withDetails(ctx, logger, st, errorInfo(ReasonRateLimited, nil),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(max(limited.retryAfter, time.Second))})
	case errors.As(err, &sender):
		st := status.New(codes.PermissionDenied, sender.Error())
		return withDetails(ctx, logger, st, errorInfo(ReasonSenderNotAllowed, map[string]string{"field": sender.field}),
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
				Field: sender.field, Description: "the API key may not send from " + sender.domain,
			}}})
	case errors.As(err, &unauth):
		return withReason(ctx, logger, codes.Unauthenticated, unauth.reason, ReasonUnauthenticated, nil)
	case errors.As(err, &denied):
		return withReason(ctx, logger, codes.PermissionDenied, denied.Error(), ReasonMissingScope,
			map[string]string{"scope": denied.scope})
	case errors.As(err, &unverif):
		return withReason(ctx, logger, codes.PermissionDenied, unverif.Error(), ReasonDomainNotVerified,
			map[string]string{"field": unverif.field, "domain": unverif.domain})
	case errors.As(err, &conflict):
		return withReason(ctx, logger, codes.AlreadyExists, conflict.Error(), ReasonAlreadyExists, nil)
	case errors.As(err, &precond):
		return withReason(ctx, logger, codes.FailedPrecondition, precond.Error(), ReasonFailedPrecondition, nil)
	case errors.Is(err, ErrNoKeyEncryptionKey):
		return withReason(ctx, logger, codes.FailedPrecondition, ErrNoKeyEncryptionKey.Error(),
			ReasonNoKeyEncryptionKey, nil)
	case errors.As(err, &notFound):
		return withReason(ctx, logger, codes.NotFound, notFound.Error(), ReasonNotFound,
			map[string]string{"resource": notFound.what})
	case errors.Is(err, db.ErrNotFound):
		return withReason(ctx, logger, codes.NotFound, "message not found", ReasonNotFound,
			map[string]string{"resource": "message"})
	case errors.Is(err, db.ErrNothingToCancel):
		return withReason(ctx, logger, codes.FailedPrecondition,
			"nothing to cancel: every recipient is already delivered, bounced, failed or canceled",
			ReasonNothingToCancel, nil)
	case errors.Is(err, db.ErrRawPurged):
		return withReason(ctx, logger, codes.FailedPrecondition,
			"the message's body was removed by retention (--retain-bodies)", ReasonRawPurged, nil)
	case errors.Is(err, db.ErrIdempotencyConflict):
		return withReason(ctx, logger, codes.AlreadyExists,
			"idempotency key was already used with a different request; use a new key for a new request",
			ReasonIdempotencyConflict, nil)
	case errors.Is(err, db.ErrOverloaded):
		// Retrying after a pause is what helps, and RetryInfo says how long
		// (the gateway turns it into Retry-After).
		st := status.New(codes.Unavailable, "too many messages waiting to be stored, retry later")
		return withDetails(ctx, logger, st,
			errorInfo(ReasonOverloaded, nil),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(overloadRetryDelay)})
	case errors.Is(err, db.ErrUnavailable):
		logger.WarnContext(ctx, "database unavailable", "method", methodName(ctx), "request_id", RequestIDFrom(ctx), "error", err)
		return withReason(ctx, logger, codes.Unavailable, "service temporarily unavailable, retry later",
			ReasonDatabaseUnavailable, nil)
	case errors.Is(err, context.Canceled):
		return withReason(ctx, logger, codes.Canceled, "request canceled", ReasonCanceled, nil)
	case errors.Is(err, context.DeadlineExceeded):
		return withReason(ctx, logger, codes.DeadlineExceeded, "deadline exceeded", ReasonDeadlineExceeded, nil)
	default:
		logger.ErrorContext(ctx, "internal error", "method", methodName(ctx), "request_id", RequestIDFrom(ctx), "error", err)
		return internalError(ctx, logger)
	}
}

// internalError is the one answer to a bug: generic text, the cause only
// in the log.
func internalError(ctx context.Context, logger *slog.Logger) error {
	return withReason(ctx, logger, codes.Internal, "internal error", ReasonInternal, nil)
}

func errorInfo(reason string, md map[string]string) *errdetails.ErrorInfo {
	return &errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: md}
}

// withReason is a status of code with msg and an ErrorInfo of reason.
func withReason(ctx context.Context, logger *slog.Logger, code codes.Code, msg, reason string, md map[string]string) error {
	return withDetails(ctx, logger, status.New(code, msg), errorInfo(reason, md))
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
