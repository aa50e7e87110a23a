package service_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// A batch of valid and invalid messages: the valid ones are stored, each
// invalid one is answered with its own error naming the field from the
// batch, and the results are in request order.
func TestSendBatchMixed(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	bad := validRequest()
	bad.To[0].Address = "not an address"
	noBody := validRequest()
	noBody.Text, noBody.Html = "", ""
	resp, err := e.client.SendBatch(e.ctx(t), &posthastev1.SendBatchRequest{
		Messages: []*posthastev1.SendMessageRequest{validRequest(), bad, validRequest(), noBody},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetResults()) != 4 {
		t.Fatalf("%d results, want 4", len(resp.GetResults()))
	}
	for _, i := range []int{0, 2} {
		acc := resp.GetResults()[i].GetAccepted()
		if acc == nil || len(acc.GetRecipients()) != 2 {
			t.Errorf("result %d: %v, want accepted with 2 recipients", i, resp.GetResults()[i])
		}
	}
	for i, want := range map[int]string{1: "messages[1].to[0].address", 3: "messages[3].text"} {
		e := resp.GetResults()[i].GetError()
		if e == nil || e.GetStatus() != "INVALID_ARGUMENT" || e.GetCode() != 400 ||
			len(e.GetFieldViolations()) == 0 || e.GetFieldViolations()[0].GetField() != want {
			t.Errorf("result %d: %v, want INVALID_ARGUMENT naming %s", i, resp.GetResults()[i], want)
		}
	}
	if m, r := e.counts(t); m != 2 || r != 4 {
		t.Errorf("stored %d messages, %d recipients; want 2, 4", m, r)
	}
	if got := e.commits.Load(); got != 1 {
		t.Errorf("onCommit called %d times, want once for the batch", got)
	}
}

// Empty and oversized batches are refused whole, naming the field.
func TestSendBatchSize(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	big := &posthastev1.SendBatchRequest{}
	for range service.MaxBatchMessages + 1 {
		big.Messages = append(big.Messages, validRequest())
	}
	for name, req := range map[string]*posthastev1.SendBatchRequest{"empty": {}, "501": big} {
		_, err := e.client.SendBatch(e.ctx(t), req)
		if status.Code(err) != codes.InvalidArgument || fmt.Sprint(violations(err)) != "[messages]" {
			t.Errorf("%s: %v (fields %v), want InvalidArgument naming messages", name, err, violations(err))
		}
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages, want none", m)
	}
}

// Per-message keys replay per message; within one batch, a key used again
// with another request is that message's conflict only; the call's key
// replays the whole call.
func TestSendBatchIdempotency(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	keyed := validRequest()
	keyed.IdempotencyKey = "item-a"
	clash := validRequest()
	clash.Subject = "something else"
	clash.IdempotencyKey = "item-a"
	req := &posthastev1.SendBatchRequest{Messages: []*posthastev1.SendMessageRequest{keyed, validRequest(), clash}}
	ctx := metadata.AppendToOutgoingContext(e.ctx(t), "idempotency-key", "call-1")
	first, err := e.client.SendBatch(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetResults()[0].GetAccepted() == nil || first.GetResults()[1].GetAccepted() == nil {
		t.Fatalf("first call: %v", first)
	}
	if e := first.GetResults()[2].GetError(); e.GetStatus() != "ALREADY_EXISTS" || e.GetCode() != 409 {
		t.Errorf("reused key with another request in the batch: %v, want ALREADY_EXISTS", first.GetResults()[2])
	}

	again, err := e.client.SendBatch(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		// The first receipts, marked as replays.
		want := proto.Clone(first.GetResults()[i]).(*posthastev1.SendBatchResult)
		want.GetAccepted().Replayed = true
		if !proto.Equal(again.GetResults()[i], want) {
			t.Errorf("replayed result %d: %v, want %v", i, again.GetResults()[i], first.GetResults()[i])
		}
	}
	// The message's own key works across calls and transports: SendMessage
	// with it replays the batch's receipt.
	single, err := e.client.SendMessage(e.ctx(t), keyed)
	if err != nil {
		t.Fatal(err)
	}
	if single.GetId() != first.GetResults()[0].GetAccepted().GetId() {
		t.Errorf("SendMessage with the batch message's key: id %s, want %s", single.GetId(), first.GetResults()[0].GetAccepted().GetId())
	}
	if m, _ := e.counts(t); m != 2 {
		t.Errorf("stored %d messages, want 2", m)
	}
}

// Many concurrent senders, two of them with one key and different
// requests: every other message is stored exactly once, and only one of the
// two is told of the conflict.
func TestConcurrentSendersShareCommits(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	const senders = 60
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		ids       = map[string]bool{}
		conflicts int
	)
	for i := range senders {
		wg.Go(func() {
			req := validRequest()
			req.Subject = fmt.Sprintf("message %d", i)
			if i < 2 {
				req.IdempotencyKey = "shared"
			}
			resp, err := e.client.SendMessage(e.ctx(t), req)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case status.Code(err) == codes.AlreadyExists:
				conflicts++
			case err != nil:
				t.Errorf("sender %d: %v", i, err)
			default:
				ids[resp.GetId()] = true
			}
		})
	}
	wg.Wait()
	if conflicts != 1 || len(ids) != senders-1 {
		t.Errorf("%d conflicts and %d distinct ids, want 1 and %d", conflicts, len(ids), senders-1)
	}
	if m, r := e.counts(t); m != senders-1 || r != 2*(senders-1) {
		t.Errorf("stored %d messages, %d recipients; want %d, %d", m, r, senders-1, 2*(senders-1))
	}
	st := e.srv.IntakeStats()
	t.Logf("%d messages in %d commits", st.Messages, st.Commits)
}

// A key revoked elsewhere (another instance, the command line) is refused
// once the cache's TTL has passed.
func TestRevokedKeyRefusedAfterCacheTTL(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{APIKeyCacheTTL: 100 * time.Millisecond})
	if _, err := e.client.SendMessage(e.ctx(t), validRequest()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.RevokeAPIKey(t.Context(), db.DefaultProjectID(), e.keyID); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		_, err := e.client.ListMessages(e.ctx(t), &posthastev1.ListMessagesRequest{})
		if status.Code(err) == codes.Unauthenticated {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("revoked key still accepted after 10s: %v", err)
		}
		<-tick.C
	}
}

// The key's use is recorded off the request path: after Stop, LastUsedAt is
// set.
func TestKeyUseRecorded(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	if _, err := e.client.ListMessages(e.ctx(t), &posthastev1.ListMessagesRequest{}); err != nil {
		t.Fatal(err)
	}
	e.srv.Stop()
	keys, err := e.store.ListAPIKeys(t.Context(), db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.ID == e.keyID && k.LastUsedAt == nil {
			t.Errorf("key used but LastUsedAt is nil")
		}
	}
}

// When the intake queue is full, sends are refused at once with
// Unavailable, reason OVERLOADED and a RetryInfo.
func TestOverloadIsUnavailableWithRetryInfo(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{Intake: db.CommitterConfig{Workers: 1, Queue: 1, MaxWait: -1}})
	ctx := context.Background()
	tx, err := e.raw.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `LOCK TABLE messages IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	results := make(chan error, 2)
	send := func() {
		_, err := e.client.SendMessage(e.ctx(t), validRequest())
		results <- err
	}
	go send()
	poll(t, func() bool { return e.srv.IntakeStats().Commits == 1 })
	go send()
	poll(t, func() bool { return e.srv.IntakeStats().Queued == 1 })
	_, err = e.client.SendMessage(e.ctx(t), validRequest())
	st := status.Convert(err)
	var reason string
	var retry time.Duration
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			reason = d.GetReason()
		case *errdetails.RetryInfo:
			retry = d.GetRetryDelay().AsDuration()
		}
	}
	if st.Code() != codes.Unavailable || reason != service.ReasonOverloaded || retry <= 0 {
		t.Errorf("send with the queue full: %v (reason %q, retry %s), want Unavailable, OVERLOADED, a delay", err, reason, retry)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := <-results; err != nil {
			t.Errorf("accepted send: %v", err)
		}
	}
	if m, _ := e.counts(t); m != 2 {
		t.Errorf("stored %d messages, want 2", m)
	}
}

// poll waits until cond holds, failing the test after a deadline.
func poll(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		<-tick.C
	}
}
