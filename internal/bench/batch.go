package bench

import (
	"context"
	"errors"
	"fmt"
	"time"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// batchSender sends several messages in one call.
type batchSender interface {
	// sendBatch queues ms in one call. A failed call is its error; a call
	// that was answered returns one result per message, nil for an
	// accepted one and a *sendError for one the server refused.
	sendBatch(ctx context.Context, ms []outMessage) ([]error, error)
}

// itemError is the refusal of one message of a batch. Its kind is the
// stable reason the server gives, so that the report says why.
func itemError(id string, reason, status, message string) error {
	kind := reason
	if kind == "" {
		kind = status
	}
	if kind == "" {
		kind = "unknown"
	}
	return &sendError{kind: "item_" + kind, err: fmt.Errorf("message %s refused: %s", id, message)}
}

// errBatchResults says that an answer did not have one result per message.
var errBatchResults = errors.New("wrong number of results")

// batchResults turns a batch answer's results into per-message errors; err
// returns the refusal of result i, nil when it was accepted.
func batchResults(ms []outMessage, n int, err func(i int) error) ([]error, error) {
	if n != len(ms) {
		return nil, fmt.Errorf("batch of %d messages from %s: %w (%d)", len(ms), ms[0].id, errBatchResults, n)
	}
	errs := make([]error, n)
	for i := range errs {
		errs[i] = err(i)
	}
	return errs, nil
}

// restBatchAnswer is the part of a batchSend answer the harness reads.
type restBatchAnswer struct {
	Results []struct {
		Error *struct {
			Status  string `json:"status"`
			Message string `json:"message"`
			Reason  string `json:"reason"`
		} `json:"error"`
	} `json:"results"`
}

func (s *restSender) sendBatch(ctx context.Context, ms []outMessage) ([]error, error) {
	body := struct {
		Messages []restSend `json:"messages"`
	}{Messages: make([]restSend, len(ms))}
	for i, m := range ms {
		body.Messages[i] = s.request(m)
	}
	var answer restBatchAnswer
	if err := s.post(ctx, "/v1/messages:batchSend", body, &answer); err != nil {
		return nil, fmt.Errorf("send batch of %d messages from %s: %w", len(ms), ms[0].id, err)
	}
	return batchResults(ms, len(answer.Results), func(i int) error {
		e := answer.Results[i].Error
		if e == nil {
			return nil
		}
		return itemError(ms[i].id, e.Reason, e.Status, e.Message)
	})
}

func (s *grpcSender) sendBatch(ctx context.Context, ms []outMessage) ([]error, error) {
	req := &posthastev1.SendBatchRequest{Messages: make([]*posthastev1.SendMessageRequest, len(ms))}
	for i, m := range ms {
		req.Messages[i] = s.request(m)
	}
	resp, err := s.client.SendBatch(s.withAuth(ctx), req)
	if err != nil {
		return nil, grpcError(fmt.Errorf("send batch of %d messages from %s: %w", len(ms), ms[0].id, err))
	}
	return batchResults(ms, len(resp.GetResults()), func(i int) error {
		e := resp.GetResults()[i].GetError()
		if e == nil {
			return nil
		}
		return itemError(ms[i].id, e.GetReason(), e.GetStatus(), e.GetMessage())
	})
}

// message is the i-th message of the run.
func (r *runner) message(i int) outMessage {
	to := make([]string, r.cfg.Recipients)
	for j := range to {
		to[j] = r.tracker.recipient(i, j, r.cfg.Domains)
	}
	return outMessage{id: fmt.Sprintf("%s-%d", r.runID, i), subject: fmt.Sprintf("bench %s message %d", r.runID, i), to: to}
}

// callMessages sends call k's messages, the k-th group of Batch, and
// records them in samples; it returns how many it sent. The call's latency
// runs from due and is recorded once, on its first message, so that API
// latency counts calls, not messages.
func (r *runner) callMessages(ctx context.Context, k int, due time.Time, samples []sample) int {
	first := k * r.cfg.Batch
	ms := make([]outMessage, min(r.cfg.Batch, r.cfg.Messages-first))
	for j := range ms {
		ms[j] = r.message(first + j)
	}
	callCtx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	var (
		errs    []error
		callErr error
	)
	if bs, ok := r.sender.(batchSender); ok && r.cfg.Batch > 1 {
		errs, callErr = bs.sendBatch(callCtx, ms)
	} else {
		callErr = r.sender.send(callCtx, ms[0])
	}
	cancel()
	now := time.Now()
	for j := range ms {
		err := callErr
		if err == nil && errs != nil {
			err = errs[j]
		}
		if err == nil {
			r.tracker.accepted(first+j, now)
		}
		s := sample{sent: true, err: err}
		if j == 0 && callErr == nil {
			s.timed, s.latency = true, now.Sub(due)
		}
		samples[first+j] = s
	}
	return len(ms)
}

// tallySamples splits the samples into the latencies of the calls that
// succeeded and the messages that failed, by kind.
func tallySamples(samples []sample) (latencies []time.Duration, failed int, kinds map[string]int) {
	for _, s := range samples {
		if s.timed {
			latencies = append(latencies, s.latency)
		}
		if !s.sent || s.err == nil {
			continue
		}
		if kinds == nil {
			kinds = make(map[string]int)
		}
		failed++
		kinds[errorKind(s.err)]++
	}
	return latencies, failed, kinds
}

// callLatencyLabel names what the report's call latency measures.
func (r *Report) callLatencyLabel() string {
	switch {
	case r.Proto == "smtp":
		return "smtp transaction"
	case r.Batch > 1:
		return fmt.Sprintf("api latency (per call of %d)", r.Batch)
	}
	return "api latency"
}
