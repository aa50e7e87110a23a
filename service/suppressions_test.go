package service_test

import (
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

func addEntries(t *testing.T, e *env, addrs ...string) *posthastev1.AddSuppressionsResponse {
	t.Helper()
	req := &posthastev1.AddSuppressionsRequest{}
	for _, a := range addrs {
		req.Suppressions = append(req.Suppressions, &posthastev1.NewSuppression{Address: a})
	}
	resp, err := e.client.AddSuppressions(e.ctx(t), req)
	if err != nil {
		t.Fatalf("AddSuppressions: %v", err)
	}
	return resp
}

// The receipt says which recipients are suppressed and why, a retry with
// the same key replays that, and GetMessage agrees.
// recipientCounter counts the recipients the service reports as ended at
// intake; the metrics package implements the same interfaces.
type recipientCounter struct {
	mu    sync.Mutex
	ended map[string]int
}

func (c *recipientCounter) ObserveCall(string, string, string, time.Duration) {}

func (c *recipientCounter) RecipientsEnded(outcome string, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ended[outcome] += n
}

func TestSendToSuppressedAddress(t *testing.T) {
	t.Parallel()
	counter := &recipientCounter{ended: map[string]int{}}
	e := setup(t, service.Config{Observer: counter})
	addEntries(t, e, "Bob@Example.test", "*@blocked.test")
	req := validRequest()
	req.Cc = []*posthastev1.Address{{Address: "dan@BLOCKED.test"}}
	req.IdempotencyKey = "suppressed-1"
	resp, err := e.client.SendMessage(e.ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	statuses := func(rs []*posthastev1.RecipientSummary) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.GetStatus()+"/"+r.GetSuppressionReason())
		}
		return out
	}
	want := []string{"suppressed/manual", "queued/", "suppressed/manual"}
	if got := statuses(resp.GetRecipients()); !slices.Equal(got, want) {
		t.Errorf("receipt %v, want %v", got, want)
	}
	again, err := e.client.SendMessage(e.ctx(t), req)
	if err != nil || again.GetId() != resp.GetId() || !slices.Equal(statuses(again.GetRecipients()), want) {
		t.Errorf("replay %v (%v), %v", statuses(again.GetRecipients()), again.GetId(), err)
	}
	// Counted once, for the call that stored them, not for its replay.
	counter.mu.Lock()
	if got := counter.ended["suppressed"]; got != 2 {
		t.Errorf("recipients counted as suppressed: %d, want 2", got)
	}
	counter.mu.Unlock()
	m, err := e.client.GetMessage(e.ctx(t), &posthastev1.GetMessageRequest{Id: resp.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if r := m.GetRecipients()[0]; r.GetStatus() != "suppressed" || r.GetSuppressionReason() != "manual" || r.GetNextAttemptAt() != nil {
		t.Errorf("recipient %v", r)
	}
	if m.GetStatus() != "queued" {
		t.Errorf("message status %s", m.GetStatus())
	}

	// Every recipient suppressed: the message is failed at once. Raw sends
	// and batches go through the same insert.
	raw, err := e.client.SendRawMessage(e.ctx(t), &posthastev1.SendRawMessageRequest{
		Raw:          "RnJvbTogYWRhQGV4YW1wbGUudGVzdA0KU3ViamVjdDogaGkNCg0KaGVsbG8NCg==",
		EnvelopeFrom: "ada@example.test",
		Recipients:   []string{"bob@example.test"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if r := raw.GetRecipients()[0]; r.GetStatus() != "suppressed" {
		t.Errorf("raw receipt %v", r)
	}
	if m, _ := e.client.GetMessage(e.ctx(t), &posthastev1.GetMessageRequest{Id: raw.GetId()}); m.GetStatus() != "failed" {
		t.Errorf("all suppressed: message status %s", m.GetStatus())
	}
	batch, err := e.client.SendBatch(e.ctx(t), &posthastev1.SendBatchRequest{Messages: []*posthastev1.SendMessageRequest{validRequest()}})
	if err != nil {
		t.Fatal(err)
	}
	if got := statuses(batch.GetResults()[0].GetAccepted().GetRecipients()); !slices.Equal(got, []string{"suppressed/manual", "queued/"}) {
		t.Errorf("batch receipt %v", got)
	}
}

func TestAddSuppressionsValidation(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	past := timestamppb.New(time.Now().Add(-time.Hour))
	_, err := e.client.AddSuppressions(e.ctx(t), &posthastev1.AddSuppressionsRequest{Suppressions: []*posthastev1.NewSuppression{
		{Address: "good@example.test"},
		{Address: "not an address"},
		{Address: "*@"},
		{Address: "x@[127.0.0.1]"},
		{Address: "y@example.test", Reason: "complaint"},
		{Address: "z@example.test", ExpiresAt: past},
		{Address: ""},
	}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("err %v", err)
	}
	want := []string{"suppressions[1].address", "suppressions[2].address", "suppressions[3].address",
		"suppressions[4].reason", "suppressions[5].expires_at", "suppressions[6].address"}
	if got := violations(err); !slices.Equal(got, want) {
		t.Errorf("violations %v, want %v", got, want)
	}
	if l, err := e.client.ListSuppressions(e.ctx(t), &posthastev1.ListSuppressionsRequest{}); err != nil || len(l.GetSuppressions()) != 0 {
		t.Errorf("stored on error: %v, %v", l, err)
	}
	for name, req := range map[string]*posthastev1.AddSuppressionsRequest{
		"empty":    {},
		"too many": {Suppressions: make([]*posthastev1.NewSuppression, 1001)},
	} {
		if _, err := e.client.AddSuppressions(e.ctx(t), req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v", name, err)
		}
	}
	_, err = e.client.ListSuppressions(e.ctx(t), &posthastev1.ListSuppressionsRequest{Reason: "spam", PageSize: 101, PageToken: "x"})
	if got := violations(err); !slices.Equal(got, []string{"page_size", "reason", "page_token"}) {
		t.Errorf("list violations %v", got)
	}
	admin, _ := createScopedKey(t, e.store, db.DefaultProjectID(), "admin", db.ScopeAdmin)
	_, err = e.client.DeleteSuppressions(withKey(t.Context(), admin), &posthastev1.DeleteSuppressionsRequest{Addresses: []string{"a@example.test", "bad"}})
	if got := violations(err); !slices.Equal(got, []string{"addresses[1]"}) {
		t.Errorf("delete violations %v", got)
	}
}

func TestSuppressionCalls(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	added := addEntries(t, e, "b@example.test", "A@Example.test", "a@example.test", "*@Example.NET")
	var addrs []string
	for _, s := range added.GetSuppressions() {
		addrs = append(addrs, s.GetAddress())
		if s.GetReason() != "manual" {
			t.Errorf("entry %v", s)
		}
	}
	if !slices.Equal(addrs, []string{"b@example.test", "a@example.test", "*@example.net"}) {
		t.Errorf("added %v", addrs)
	}
	got, err := e.client.GetSuppression(e.ctx(t), &posthastev1.GetSuppressionRequest{Address: "*@example.net"})
	if err != nil || got.GetAddress() != "*@example.net" {
		t.Errorf("get domain entry %v, %v", got, err)
	}
	if _, err := e.client.GetSuppression(e.ctx(t), &posthastev1.GetSuppressionRequest{Address: "c@example.net"}); status.Code(err) != codes.NotFound {
		t.Errorf("an address under a domain entry has no entry of its own: %v", err)
	}

	// Paging, newest first, and the prefix filter.
	var pages [][]string
	tok := ""
	for {
		l, err := e.client.ListSuppressions(e.ctx(t), &posthastev1.ListSuppressionsRequest{PageSize: 2, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		var p []string
		for _, s := range l.GetSuppressions() {
			p = append(p, s.GetAddress())
		}
		pages = append(pages, p)
		if tok = l.GetNextPageToken(); tok == "" {
			break
		}
	}
	if len(pages) != 2 || len(pages[0]) != 2 || len(pages[1]) != 1 {
		t.Errorf("pages %v", pages)
	}
	for prefix, want := range map[string][]string{
		"A@":      {"a@example.test"},
		"*@":      {"*@example.net"},
		"*@exa":   {"*@example.net"},
		"example": nil,
	} {
		l, err := e.client.ListSuppressions(e.ctx(t), &posthastev1.ListSuppressionsRequest{AddressPrefix: prefix})
		var got []string
		for _, s := range l.GetSuppressions() {
			got = append(got, s.GetAddress())
		}
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("prefix %q: %v, %v", prefix, got, err)
		}
	}
	future := timestamppb.New(time.Now().Add(time.Hour))
	if l, _ := e.client.ListSuppressions(e.ctx(t), &posthastev1.ListSuppressionsRequest{CreatedAfter: future}); len(l.GetSuppressions()) != 0 {
		t.Errorf("created_after in the future: %v", l)
	}
	if l, _ := e.client.ListSuppressions(e.ctx(t), &posthastev1.ListSuppressionsRequest{Reason: "complaint"}); len(l.GetSuppressions()) != 0 {
		t.Errorf("reason complaint: %v", l)
	}

	// Scopes: a send-and-read key may not delete; an admin key may.
	if _, err := e.client.DeleteSuppression(e.ctx(t), &posthastev1.DeleteSuppressionRequest{Address: "a@example.test"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("delete with the send scope: %v", err)
	}
	admin, _ := createScopedKey(t, e.store, db.DefaultProjectID(), "admin", db.ScopeAdmin)
	actx := withKey(t.Context(), admin)
	if _, err := e.client.DeleteSuppression(actx, &posthastev1.DeleteSuppressionRequest{Address: "a@example.test"}); err != nil {
		t.Errorf("delete: %v", err)
	}
	if _, err := e.client.DeleteSuppression(actx, &posthastev1.DeleteSuppressionRequest{Address: "a@example.test"}); status.Code(err) != codes.NotFound {
		t.Errorf("delete again: %v", err)
	}
	del, err := e.client.DeleteSuppressions(actx, &posthastev1.DeleteSuppressionsRequest{Addresses: []string{"B@example.test", "*@example.net", "none@example.test"}})
	if err != nil || !slices.Equal(del.GetDeleted(), []string{"b@example.test", "*@example.net"}) && !slices.Equal(del.GetDeleted(), []string{"*@example.net", "b@example.test"}) {
		t.Errorf("bulk delete %v, %v", del.GetDeleted(), err)
	}

	// A read-only key lists but may not add.
	reader, _ := createScopedKey(t, e.store, db.DefaultProjectID(), "reader", db.ScopeRead)
	rctx := withKey(t.Context(), reader)
	if _, err := e.client.ListSuppressions(rctx, &posthastev1.ListSuppressionsRequest{}); err != nil {
		t.Errorf("list with the read scope: %v", err)
	}
	if _, err := e.client.AddSuppressions(rctx, &posthastev1.AddSuppressionsRequest{Suppressions: []*posthastev1.NewSuppression{{Address: "x@example.test"}}}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("add with the read scope: %v", err)
	}
}

// Another project's entries are invisible, cannot be deleted, and do not
// suppress this project's sends.
func TestSuppressionsArePerProject(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	addEntries(t, e, "bob@example.test")
	keyB, _ := otherProject(t, e, "b", db.ScopeSend, db.ScopeRead, db.ScopeAdmin)
	ctxB := withKey(t.Context(), keyB)
	if l, err := e.client.ListSuppressions(ctxB, &posthastev1.ListSuppressionsRequest{}); err != nil || len(l.GetSuppressions()) != 0 {
		t.Errorf("B lists %v, %v", l, err)
	}
	if _, err := e.client.GetSuppression(ctxB, &posthastev1.GetSuppressionRequest{Address: "bob@example.test"}); status.Code(err) != codes.NotFound {
		t.Errorf("B gets: %v", err)
	}
	if _, err := e.client.DeleteSuppression(ctxB, &posthastev1.DeleteSuppressionRequest{Address: "bob@example.test"}); status.Code(err) != codes.NotFound {
		t.Errorf("B deletes: %v", err)
	}
	resp, err := e.client.SendMessage(ctxB, validRequest())
	if err != nil {
		t.Fatal(err)
	}
	if r := resp.GetRecipients()[0]; r.GetStatus() != "queued" {
		t.Errorf("B's send suppressed by A's entry: %v", r)
	}
	if _, err := e.client.GetSuppression(e.ctx(t), &posthastev1.GetSuppressionRequest{Address: "bob@example.test"}); err != nil {
		t.Errorf("A's entry after B's delete: %v", err)
	}
}
