package service_test

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// errorInfo returns the ErrorInfo of a status error, nil when it has none.
func errorInfo(err error) *errdetails.ErrorInfo {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info
		}
	}
	return nil
}

// Every error a call can get carries a google.rpc.ErrorInfo whose reason a
// program can branch on.
func TestErrorReasonsOverGRPC(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{MaxMessageBytes: 4096})
	ctx := e.ctx(t)
	sent, err := e.client.SendMessage(metadata.AppendToOutgoingContext(ctx, "idempotency-key", "k1"), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: sent.GetId()}); err != nil {
		t.Fatal(err)
	}
	readOnly, _ := createScopedKey(t, e.store, uuid.Nil, "reader", db.ScopeRead)
	other := validRequest()
	other.Subject = "another"
	big := validRequest()
	big.Text = strings.Repeat("x", 5000)

	for _, tc := range []struct {
		name   string
		call   func() error
		code   codes.Code
		reason string
		md     map[string]string
	}{
		{"no key", func() error {
			_, err := e.client.ListMessages(t.Context(), &posthastev1.ListMessagesRequest{})
			return err
		}, codes.Unauthenticated, "UNAUTHENTICATED", nil},
		{"missing scope", func() error {
			_, err := e.client.SendMessage(withKey(t.Context(), readOnly), validRequest())
			return err
		}, codes.PermissionDenied, "MISSING_SCOPE", map[string]string{"scope": "send"}},
		{"invalid field", func() error {
			_, err := e.client.SendMessage(ctx, &posthastev1.SendMessageRequest{})
			return err
		}, codes.InvalidArgument, "FIELD_INVALID", nil},
		{"not found", func() error {
			_, err := e.client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: uuid.NewString()})
			return err
		}, codes.NotFound, "NOT_FOUND", map[string]string{"resource": "message"}},
		{"idempotency conflict", func() error {
			_, err := e.client.SendMessage(metadata.AppendToOutgoingContext(ctx, "idempotency-key", "k1"), other)
			return err
		}, codes.AlreadyExists, "IDEMPOTENCY_CONFLICT", nil},
		{"nothing to cancel", func() error {
			_, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: sent.GetId()})
			return err
		}, codes.FailedPrecondition, "NOTHING_TO_CANCEL", nil},
		{"too large", func() error {
			_, err := e.client.SendMessage(ctx, big)
			return err
		}, codes.ResourceExhausted, "MESSAGE_TOO_LARGE", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			info := errorInfo(err)
			if status.Code(err) != tc.code || info.GetReason() != tc.reason || info.GetDomain() != service.ErrorDomain {
				t.Fatalf("got %v with %v, want %v %s", err, info, tc.code, tc.reason)
			}
			for k, v := range tc.md {
				if info.GetMetadata()[k] != v {
					t.Errorf("metadata %v, want %s=%s", info.GetMetadata(), k, v)
				}
			}
		})
	}
	// The field violations still come along.
	_, err = e.client.SendMessage(ctx, &posthastev1.SendMessageRequest{})
	if len(violations(err)) == 0 {
		t.Errorf("FIELD_INVALID without field violations: %v", err)
	}

	e.proxy.Stop()
	_, err = e.client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: sent.GetId()})
	if status.Code(err) != codes.Unavailable || errorInfo(err).GetReason() != "DATABASE_UNAVAILABLE" {
		t.Errorf("database down: %v, want Unavailable DATABASE_UNAVAILABLE", err)
	}
}

// Every call answers with its request id in the response headers: the
// client's when it is sane, else a new one; refusals too.
func TestRequestIDOverGRPC(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	for _, tc := range []struct {
		name, sent string
		keep       bool
	}{
		{"sane", "01HZX3-req_7.a:b/c+d=e@f", true},
		{"none", "", false},
		{"space", "a b", false},
		{"too long", strings.Repeat("x", 129), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, ctx := range []struct {
				name string
				key  string
			}{{"with key", e.key}, {"refused", "ph_wrong"}} {
				c := withKey(t.Context(), ctx.key)
				if tc.sent != "" {
					c = metadata.AppendToOutgoingContext(c, "x-request-id", tc.sent)
				}
				var header metadata.MD
				_, _ = e.client.ListMessages(c, &posthastev1.ListMessagesRequest{}, grpc.Header(&header))
				got := header.Get("x-request-id")
				if len(got) != 1 {
					t.Fatalf("%s: x-request-id %v, want one", ctx.name, got)
				}
				if tc.keep && got[0] != tc.sent {
					t.Errorf("%s: x-request-id %q, want %q", ctx.name, got[0], tc.sent)
				}
				if _, err := uuid.Parse(got[0]); !tc.keep && err != nil {
					t.Errorf("%s: x-request-id %q, want a generated UUID", ctx.name, got[0])
				}
			}
		})
	}
}

func TestListFiltersOverGRPC(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	ctx := e.ctx(t)
	send := func(to string, tags ...string) string {
		req := validRequest()
		req.To = []*posthastev1.Address{{Address: to}}
		req.Cc, req.Bcc = nil, nil
		req.Tags = tags
		resp, err := e.client.SendMessage(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetId()
	}
	a := send("bounce@example.test", "receipt")
	b := send("Someone@Example.test", "welcome")
	c := send("other@example.test")
	if _, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: c}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		req  *posthastev1.ListMessagesRequest
		want []string
	}{
		{"recipient in capitals", &posthastev1.ListMessagesRequest{Recipient: "BOUNCE@EXAMPLE.TEST"}, []string{a}},
		{"recipient stored in capitals", &posthastev1.ListMessagesRequest{Recipient: "someone@example.test"}, []string{b}},
		{"statuses", &posthastev1.ListMessagesRequest{Statuses: []string{"canceled", "queued"}}, []string{c, b, a}},
		{"status and statuses", &posthastev1.ListMessagesRequest{Status: "canceled", Statuses: []string{"bounced"}}, []string{c}},
		{"tags", &posthastev1.ListMessagesRequest{Tags: []string{"receipt", "welcome"}}, []string{b, a}},
		{"tag and tags", &posthastev1.ListMessagesRequest{Tag: "receipt", Tags: []string{"none"}}, []string{a}},
	} {
		resp, err := e.client.ListMessages(ctx, tc.req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		var ids []string
		for _, m := range resp.GetMessages() {
			ids = append(ids, m.GetId())
		}
		if !slices.Equal(ids, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, ids, tc.want)
		}
	}
	_, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{Statuses: []string{"queued", "lost"}})
	if status.Code(err) != codes.InvalidArgument || strings.Join(violations(err), ",") != "statuses[1]" {
		t.Errorf("unknown status: %v, want InvalidArgument naming statuses[1]", err)
	}
}

// A page size above the maximum is capped (AIP-158), not refused.
func TestPageSizeCapped(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	ctx := e.ctx(t)
	batch := &posthastev1.SendBatchRequest{}
	for range 101 {
		batch.Messages = append(batch.Messages, validRequest())
	}
	if _, err := e.client.SendBatch(ctx, batch); err != nil {
		t.Fatal(err)
	}
	resp, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{PageSize: 500})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMessages()) != 100 || resp.GetNextPageToken() == "" {
		t.Errorf("page of %d with next token %q, want 100 and a token", len(resp.GetMessages()), resp.GetNextPageToken())
	}
}

// GetMessageRaw returns the stored bytes and envelope, needs the read
// scope, and answers another project's message as NotFound.
func TestGetMessageRawOverGRPC(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	ctx := e.ctx(t)
	req := validRequest()
	req.Bcc = []*posthastev1.Address{{Address: "hidden@example.test"}}
	sent, err := e.client.SendMessage(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var stored []byte
	if err := e.raw.QueryRow(t.Context(), `SELECT raw FROM messages WHERE id = $1`, sent.GetId()).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	got, err := e.client.GetMessageRaw(ctx, &posthastev1.GetMessageRawRequest{Id: sent.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.GetRaw(), stored) || got.GetId() != sent.GetId() || got.GetEnvelopeFrom() != req.GetFrom().GetAddress() {
		t.Errorf("got %v, want the stored message", got)
	}
	var want []string
	for _, r := range sent.GetRecipients() {
		want = append(want, r.GetAddress())
	}
	if !slices.Equal(got.GetRecipients(), want) || !slices.Contains(want, "hidden@example.test") {
		t.Errorf("recipients %v, want %v with the Bcc", got.GetRecipients(), want)
	}
	if bytes.Contains(got.GetRaw(), []byte("hidden@example.test")) {
		t.Error("the Bcc address is in the message")
	}

	project, err := e.store.CreateProject(t.Context(), "other")
	if err != nil {
		t.Fatal(err)
	}
	foreign, _ := createScopedKey(t, e.store, project.ID, "other", db.ScopeRead)
	if _, err := e.client.GetMessageRaw(withKey(t.Context(), foreign), &posthastev1.GetMessageRawRequest{Id: sent.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("another project: %v, want NotFound", err)
	}
	sendOnly, _ := createScopedKey(t, e.store, uuid.Nil, "sender", db.ScopeSend)
	if _, err := e.client.GetMessageRaw(withKey(t.Context(), sendOnly), &posthastev1.GetMessageRawRequest{Id: sent.GetId()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("send-only key: %v, want PermissionDenied", err)
	}
}
