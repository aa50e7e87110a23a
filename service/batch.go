package service

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// MaxBatchMessages is the most messages one SendBatch call may carry.
const MaxBatchMessages = 500

// SendBatch checks each message of the batch on its own, stores the valid
// ones in one commit and answers one result per message, in order.
func (s *Server) SendBatch(ctx context.Context, req *posthastev1.SendBatchRequest) (*posthastev1.SendBatchResponse, error) {
	resp, err := s.sendBatch(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) sendBatch(ctx context.Context, req *posthastev1.SendBatchRequest) (*posthastev1.SendBatchResponse, error) {
	caller, err := requireScope(ctx, db.ScopeSend)
	if err != nil {
		return nil, err
	}
	var v violations
	switch n := len(req.GetMessages()); {
	case n == 0:
		v.add("messages", "at least one message is required")
	case n > MaxBatchMessages:
		v.add("messages", "must have at most %d entries, got %d", MaxBatchMessages, n)
	}
	// The call's key is checked like a message's; each message without a key
	// of its own is stored under "<key>/<index>".
	callKey := v.idempotencyKey(idempotencyKeyFromMetadata(ctx), "")
	if err := v.err(); err != nil {
		return nil, err
	}

	now := time.Now()
	results := make([]*posthastev1.SendBatchResult, len(req.GetMessages()))
	receipts := make([]*posthastev1.SendMessageResponse, 0, len(results))
	msgs := make([]db.NewMessage, 0, len(results))
	stored := make([]int, 0, len(results)) // index in the request of msgs[j]
	for i, m := range req.GetMessages() {
		field := "messages[" + strconv.Itoa(i) + "]"
		p, err := s.prepareMessage(ctx, caller.projectID, m, "", now)
		if err == nil && p.idempotencyKey == "" && callKey != "" {
			p.idempotencyKey = callKey + "/" + strconv.Itoa(i)
		}
		var (
			nm      db.NewMessage
			receipt *posthastev1.SendMessageResponse
		)
		if err == nil {
			err = checkSenders(caller, p)
		}
		if err == nil {
			nm, receipt, err = s.newMessage(caller, m, p, now)
		}
		if err != nil {
			itemErr, err := s.itemError(ctx, field, err)
			if err != nil {
				return nil, err
			}
			results[i] = &posthastev1.SendBatchResult{Result: &posthastev1.SendBatchResult_Error{Error: itemErr}}
			continue
		}
		msgs = append(msgs, nm)
		receipts = append(receipts, receipt)
		stored = append(stored, i)
	}
	if len(msgs) == 0 {
		return &posthastev1.SendBatchResponse{Results: results}, nil
	}

	total := 0
	for _, nm := range msgs {
		total += len(nm.Recipients)
	}
	// The whole batch counts against the day's recipients or none of it:
	// a batch is one call, refused as one.
	refund, err := s.reserveRecipients(ctx, caller, total, now)
	if err != nil {
		return nil, err
	}
	out, err := s.committer.Insert(ctx, msgs)
	if err != nil {
		refund(total)
		return nil, fmt.Errorf("insert batch of %d messages: %w", len(msgs), err)
	}
	notStored := 0
	defer func() { refund(notStored) }()
	committed := false
	for j, o := range out {
		i := stored[j]
		receipt := receipts[j]
		if o.Err != nil || o.Result.Replayed {
			notStored += len(msgs[j].Recipients)
		}
		switch {
		case o.Err != nil:
			itemErr, err := s.itemError(ctx, "messages["+strconv.Itoa(i)+"]", o.Err)
			if err != nil {
				return nil, err
			}
			results[i] = &posthastev1.SendBatchResult{Result: &posthastev1.SendBatchResult_Error{Error: itemErr}}
			continue
		case o.Result.Replayed:
			if receipt, err = replayedResponse(o.Result.Response); err != nil {
				return nil, err
			}
		default:
			applySuppressed(receipt, o.Result.Suppressed)
			s.countSuppressed(o.Result.Suppressed)
			committed = true
		}
		results[i] = &posthastev1.SendBatchResult{Result: &posthastev1.SendBatchResult_Accepted{Accepted: receipt}}
	}
	if committed {
		s.onCommit()
	}
	return &posthastev1.SendBatchResponse{Results: results}, nil
}

// itemError describes the error err of the message at field the way a REST
// error describes a call's, its field names prefixed with field. Errors that
// are not about the message itself (a failed build, a bug) fail the whole
// call: they are returned as the second result.
func (s *Server) itemError(ctx context.Context, field string, err error) (*posthastev1.Error, error) {
	var (
		invalid    *invalidArgumentError
		tooLarge   *messageTooLargeError
		unverified *unverifiedDomainError
		sender     *senderDeniedError
	)
	switch {
	case errors.As(err, &sender):
		sender.field = field + "." + sender.field
	case errors.As(err, &invalid):
		for i := range invalid.violations {
			invalid.violations[i].field = field + "." + invalid.violations[i].field
		}
	case errors.As(err, &unverified):
		unverified.field = field + "." + unverified.field
	case errors.As(err, &tooLarge), errors.Is(err, db.ErrIdempotencyConflict):
	default:
		return nil, err
	}
	st := status.Convert(toStatus(ctx, s.log, err))
	e := &posthastev1.Error{
		Code:      int32(itemHTTPStatus(st)),
		Status:    statusName(st),
		Message:   st.Message(),
		RequestId: RequestIDFrom(ctx),
	}
	if tooLarge != nil {
		e.Message = field + ": " + e.Message
	}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.BadRequest:
			for _, fv := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, &posthastev1.FieldViolation{
					Field: fv.GetField(), Description: fv.GetDescription(),
				})
			}
		case *errdetails.ErrorInfo:
			e.Reason = d.GetReason()
		}
	}
	return e, nil
}

// itemHTTPStatus is the HTTP status the error would have had as a call of
// its own, as the gateway maps it.
func itemHTTPStatus(st *status.Status) int {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == ReasonMessageTooLarge {
			return http.StatusRequestEntityTooLarge
		}
	}
	return runtime.HTTPStatusFromCode(st.Code())
}

// statusName is the google.rpc.Code name of st's code, as REST errors
// spell it (INVALID_ARGUMENT, ALREADY_EXISTS).
func statusName(st *status.Status) string {
	name := st.Code().String() // "InvalidArgument"
	out := make([]byte, 0, len(name)+4)
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= 'A' && c <= 'Z' {
			if i > 0 {
				out = append(out, '_')
			}
			out = append(out, c)
			continue
		}
		out = append(out, c-'a'+'A')
	}
	return string(out)
}
