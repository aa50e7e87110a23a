package service

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

const (
	defaultPageSize = 20
	maxPageSize     = 100
)

// messageStatuses are the derived statuses ListMessages can filter on.
var messageStatuses = map[string]bool{
	db.StatusScheduled: true, db.StatusQueued: true, db.StatusSending: true,
	db.StatusDeferred: true, db.StatusDelivered: true, db.StatusBounced: true,
	db.StatusFailed: true, db.StatusCanceled: true, db.MessagePartiallyDelivered: true,
}

// finalStatuses are recipient states nothing more happens to.
var finalStatuses = map[string]bool{
	db.StatusDelivered: true, db.StatusBounced: true, db.StatusFailed: true, db.StatusCanceled: true,
	db.StatusSuppressed: true,
}

// callerAndID checks that the caller's key has scope and parses the id of
// one of its project's resources, the first steps of every call on one.
func callerAndID(ctx context.Context, scope, rawID string) (principal, uuid.UUID, error) {
	caller, err := requireScope(ctx, scope)
	if err != nil {
		return principal{}, uuid.Nil, err
	}
	id, err := parseID(rawID)
	if err != nil {
		return principal{}, uuid.Nil, err
	}
	return caller, id, nil
}

// GetMessage returns one message with its recipients and attempts.
func (s *Server) GetMessage(ctx context.Context, req *posthastev1.GetMessageRequest) (*posthastev1.Message, error) {
	m, err := s.getMessage(ctx, req.GetId())
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return m, nil
}

func (s *Server) getMessage(ctx context.Context, rawID string) (*posthastev1.Message, error) {
	caller, id, err := callerAndID(ctx, db.ScopeRead, rawID)
	if err != nil {
		return nil, err
	}
	m, err := s.store.GetMessage(ctx, caller.projectID, id)
	if err != nil {
		return nil, fmt.Errorf("get message %s: %w", id, err)
	}
	return messageToProto(m), nil
}

// CancelMessage cancels every recipient of a message that is not final yet
// and returns the message as it stands afterwards. It needs the send scope,
// not read: canceling changes what is delivered, which a read-only key (a
// dashboard, a support tool) must not do.
func (s *Server) CancelMessage(ctx context.Context, req *posthastev1.CancelMessageRequest) (*posthastev1.Message, error) {
	m, err := s.cancelMessage(ctx, req.GetId())
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return m, nil
}

func (s *Server) cancelMessage(ctx context.Context, rawID string) (*posthastev1.Message, error) {
	caller, id, err := callerAndID(ctx, db.ScopeSend, rawID)
	if err != nil {
		return nil, err
	}
	m, canceled, err := s.store.CancelMessage(ctx, caller.projectID, id)
	if err != nil {
		return nil, fmt.Errorf("cancel message %s: %w", id, err)
	}
	s.countEnded(db.StatusCanceled, canceled)
	return messageToProto(m), nil
}

// GetMessageRaw returns a message of the caller's project as it is sent:
// its envelope and its bytes. It needs the read scope, like GetMessage: it
// shows nothing the caller did not send.
func (s *Server) GetMessageRaw(ctx context.Context, req *posthastev1.GetMessageRawRequest) (*posthastev1.GetMessageRawResponse, error) {
	resp, err := s.getMessageRaw(ctx, req.GetId())
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) getMessageRaw(ctx context.Context, rawID string) (*posthastev1.GetMessageRawResponse, error) {
	caller, id, err := callerAndID(ctx, db.ScopeRead, rawID)
	if err != nil {
		return nil, err
	}
	m, err := s.store.GetMessageRaw(ctx, caller.projectID, id)
	if err != nil {
		return nil, fmt.Errorf("get raw message %s: %w", id, err)
	}
	return &posthastev1.GetMessageRawResponse{
		Id:           m.ID.String(),
		EnvelopeFrom: m.EnvelopeFrom,
		Recipients:   m.Recipients,
		Raw:          m.Raw,
	}, nil
}

// ListMessages returns a page of messages, newest first.
func (s *Server) ListMessages(ctx context.Context, req *posthastev1.ListMessagesRequest) (*posthastev1.ListMessagesResponse, error) {
	resp, err := s.listMessages(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) listMessages(ctx context.Context, req *posthastev1.ListMessagesRequest) (*posthastev1.ListMessagesResponse, error) {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return nil, err
	}
	var v violations
	p := db.ListMessagesParams{ProjectID: caller.projectID, Limit: defaultPageSize}
	// A page size over the maximum is taken as the maximum (AIP-158): the
	// caller asked for "as many as you give", and paging works either way.
	switch n := req.GetPageSize(); {
	case n < 0:
		v.add("page_size", "must not be negative")
	case n > 0:
		p.Limit = int(min(n, maxPageSize))
	}
	// The singular fields came first and still work; they add to the
	// repeated ones.
	if st := req.GetStatus(); st != "" {
		p.Statuses = listStatuses(&v, "status", []string{st}, p.Statuses)
	}
	p.Statuses = listStatuses(&v, "statuses", req.GetStatuses(), p.Statuses)
	if r := req.GetRecipient(); r != "" {
		// Stored addresses are in envelope form; compare like with like.
		if addr, _, ok := v.mailbox("recipient", r); ok {
			p.Recipient = addr
		}
	}
	if t := req.GetTag(); t != "" {
		p.Tags = listTags(&v, "tag", []string{t}, p.Tags)
	}
	p.Tags = listTags(&v, "tags", req.GetTags(), p.Tags)
	p.CreatedAfter = optionalTime(&v, "created_after", req.GetCreatedAfter())
	p.CreatedBefore = optionalTime(&v, "created_before", req.GetCreatedBefore())
	p.After = pageAfter(&v, req.GetPageToken())
	if err := v.err(); err != nil {
		return nil, err
	}

	want := p.Limit
	p.Limit++ // see cutPage
	ms, err := s.store.ListMessages(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	resp := &posthastev1.ListMessagesResponse{}
	ms, resp.NextPageToken = cutPage(ms, want, func(m db.Message) db.Cursor { return db.Cursor{CreatedAt: m.CreatedAt, ID: m.ID} })
	for _, m := range ms {
		resp.Messages = append(resp.Messages, messageToProto(m))
	}
	return resp, nil
}

// listStatuses checks the statuses of a filter and adds them to into,
// each once.
func listStatuses(v *violations, field string, in, into []string) []string {
	for i, st := range in {
		if !messageStatuses[st] {
			f := field
			if field != "status" {
				f = fmt.Sprintf("%s[%d]", field, i)
			}
			v.add(f, "must be one of scheduled, queued, sending, deferred, delivered, bounced, failed, canceled, partially_delivered")
			continue
		}
		if !slices.Contains(into, st) {
			into = append(into, st)
		}
	}
	return into
}

// listTags checks the tags of a filter and adds them to into, each once.
func listTags(v *violations, field string, in, into []string) []string {
	for i, t := range in {
		f := field
		if field != "tag" {
			f = fmt.Sprintf("%s[%d]", field, i)
		}
		if t == "" {
			v.add(f, "must not be empty")
			continue
		}
		if v.line(f, t, maxTagLen) && !slices.Contains(into, t) {
			into = append(into, t)
		}
	}
	if len(into) > maxTags {
		v.add(field, "at most %d tags can be filtered on, got %d", maxTags, len(into))
	}
	return into
}

func optionalTime(v *violations, field string, ts *timestamppb.Timestamp) *time.Time {
	if ts == nil {
		return nil
	}
	if err := ts.CheckValid(); err != nil {
		v.add(field, "is not a valid timestamp")
		return nil
	}
	t := ts.AsTime()
	return &t
}

func parseID(s string) (uuid.UUID, error) {
	if s == "" {
		return uuid.Nil, invalidField("id", "is required")
	}
	id, err := uuid.Parse(s)
	if err != nil {
		return uuid.Nil, invalidField("id", "must be a UUID")
	}
	return id, nil
}

// Page tokens are opaque to callers: a version byte, the creation time in
// Unix nanoseconds and the id of the last message of the previous page, in
// unpadded base64url. The version lets the format change without old
// tokens being misread.
const (
	pageTokenV1  = 1
	pageTokenLen = 1 + 8 + 16
)

// pageAfter reads the page token of a list call: the position to go on
// after, nil for the first page. A token this API did not make is a
// violation of page_token.
func pageAfter(v *violations, token string) *db.Cursor {
	if token == "" {
		return nil
	}
	c, err := decodePageToken(token)
	if err != nil {
		v.add("page_token", "is not a page token from this API")
		return nil
	}
	return c
}

// cutPage takes the rows of a list call that asked the database for one
// row more than the page holds, which tells whether another page follows
// without a count query. It returns the page and the next page's token,
// "" after the last page.
func cutPage[T any](rows []T, size int, position func(T) db.Cursor) ([]T, string) {
	if len(rows) <= size {
		return rows, ""
	}
	rows = rows[:size]
	return rows, encodePageToken(position(rows[size-1]))
}

func encodePageToken(c db.Cursor) string {
	b := make([]byte, 0, pageTokenLen)
	b = append(b, pageTokenV1)
	b = binary.BigEndian.AppendUint64(b, uint64(c.CreatedAt.UnixNano()))
	b = append(b, c.ID[:]...)
	return base64.RawURLEncoding.EncodeToString(b)
}

func decodePageToken(s string) (*db.Cursor, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("decode page token: %w", err)
	}
	if len(b) != pageTokenLen || b[0] != pageTokenV1 {
		return nil, fmt.Errorf("page token: unknown format")
	}
	id, err := uuid.FromBytes(b[9:])
	if err != nil {
		return nil, fmt.Errorf("page token id: %w", err)
	}
	return &db.Cursor{
		CreatedAt: time.Unix(0, int64(binary.BigEndian.Uint64(b[1:9]))).UTC(),
		ID:        id,
	}, nil
}

func messageToProto(m db.Message) *posthastev1.Message {
	out := &posthastev1.Message{
		Id:              m.ID.String(),
		MessageIdHeader: m.MessageIDHeader,
		Status:          m.Status,
		EnvelopeFrom:    m.EnvelopeFrom,
		From:            m.FromHeader,
		Subject:         m.Subject,
		SizeBytes:       m.Size,
		Tags:            m.Tags,
		Metadata:        m.Metadata,
		SendAt:          optionalTimestamp(m.SendAt),
		CreatedAt:       timestamppb.New(m.CreatedAt),
		UpdatedAt:       timestamppb.New(m.UpdatedAt),
	}
	for _, r := range m.Recipients {
		out.Recipients = append(out.Recipients, recipientToProto(r))
	}
	for _, a := range m.Attempts {
		out.Attempts = append(out.Attempts, &posthastev1.Attempt{
			Id:               a.ID.String(),
			RecipientId:      a.RecipientID.String(),
			StartedAt:        timestamppb.New(a.StartedAt),
			Duration:         durationpb.New(a.Duration),
			MxHost:           a.MXHost,
			Ip:               a.IP,
			Tls:              a.TLS,
			TlsVersion:       a.TLSVersion,
			Reply:            &posthastev1.SmtpReply{Code: int32(a.Code), EnhancedCode: a.EnhancedCode, Text: a.Text},
			Outcome:          a.Outcome,
			Source:           a.Source,
			TlsCipher:        a.TLSCipher,
			TlsVerified:      a.TLSVerified,
			TlsPolicy:        a.TLSPolicy,
			TlsPolicyFailure: a.TLSPolicyFailure,
		})
	}
	return out
}

func recipientToProto(r db.Recipient) *posthastev1.Recipient {
	out := &posthastev1.Recipient{
		Id:                r.ID.String(),
		Address:           r.Address,
		Kind:              r.Kind,
		Status:            r.Status,
		AttemptCount:      int32(r.Attempts),
		DeliveredAt:       optionalTimestamp(r.DeliveredAt),
		UpdatedAt:         timestamppb.New(r.UpdatedAt),
		SuppressionReason: string(r.SuppressionReason),
	}
	if !finalStatuses[r.Status] {
		out.NextAttemptAt = optionalTimestamp(r.NextAttemptAt)
	}
	if r.LastCode != 0 || r.LastEnhancedCode != "" || r.LastText != "" {
		out.LastReply = &posthastev1.SmtpReply{Code: int32(r.LastCode), EnhancedCode: r.LastEnhancedCode, Text: r.LastText}
	}
	return out
}

func optionalTimestamp(t *time.Time) *timestamppb.Timestamp {
	if t == nil {
		return nil
	}
	return timestamppb.New(*t)
}
