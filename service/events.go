package service

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

const (
	defaultEventLimit = db.DefaultReadEventsLimit
	maxEventLimit     = 1000
	// streamPageSize is how many events a stream reads at a time.
	streamPageSize = 500
)

// ListMessageEvents returns the timeline of one message of the caller's
// project.
func (s *Server) ListMessageEvents(ctx context.Context, req *posthastev1.ListMessageEventsRequest) (*posthastev1.ListMessageEventsResponse, error) {
	resp, err := s.listMessageEvents(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) listMessageEvents(ctx context.Context, req *posthastev1.ListMessageEventsRequest) (*posthastev1.ListMessageEventsResponse, error) {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return nil, err
	}
	id, err := parseID(req.GetId())
	if err != nil {
		return nil, err
	}
	tl, err := s.store.MessageTimeline(ctx, caller.projectID, id)
	if err != nil {
		return nil, fmt.Errorf("list events of message %s: %w", id, err)
	}
	resp := &posthastev1.ListMessageEventsResponse{Status: tl.Status}
	for _, e := range tl.Events {
		resp.Events = append(resp.Events, eventToProto(e, false))
	}
	return resp, nil
}

// ListEvents returns a page of the caller's project's event feed.
func (s *Server) ListEvents(ctx context.Context, req *posthastev1.ListEventsRequest) (*posthastev1.ListEventsResponse, error) {
	resp, err := s.listEvents(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) listEvents(ctx context.Context, req *posthastev1.ListEventsRequest) (*posthastev1.ListEventsResponse, error) {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return nil, err
	}
	var v violations
	p := db.ReadEventsParams{ProjectID: caller.projectID, Limit: defaultEventLimit}
	p.After = eventCursor(&v, "after", req.GetAfter())
	p.Types = eventTypes(&v, "types", req.GetTypes())
	switch n := req.GetLimit(); {
	case n < 0 || n > maxEventLimit:
		v.add("limit", "must be between 1 and %d", maxEventLimit)
	case n > 0:
		p.Limit = int(n)
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	page, err := s.store.ReadEventPage(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	resp := &posthastev1.ListEventsResponse{NextCursor: page.Next.String(), HasMore: page.More}
	for _, e := range page.Events {
		resp.Events = append(resp.Events, eventToProto(e, true))
	}
	return resp, nil
}

// StreamEvents sends the caller's project's events from a cursor on, and
// then new ones as the hub says the feed moved, until the client leaves or
// the hub stops.
func (s *Server) StreamEvents(req *posthastev1.StreamEventsRequest, stream grpc.ServerStreamingServer[posthastev1.StreamEventsResponse]) error {
	ctx := stream.Context()
	return s.streamStatus(ctx, s.streamEvents(ctx, req, stream))
}

func (s *Server) streamEvents(ctx context.Context, req *posthastev1.StreamEventsRequest, stream grpc.ServerStreamingServer[posthastev1.StreamEventsResponse]) error {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return err
	}
	var v violations
	p := db.ReadEventsParams{ProjectID: caller.projectID, Limit: streamPageSize}
	p.After = eventCursor(&v, "after", req.GetAfter())
	p.Types = eventTypes(&v, "types", req.GetTypes())
	if len(req.GetTags()) > maxTags {
		v.add("tags", "at most %d tags", maxTags)
	}
	for i, t := range req.GetTags() {
		if v.line(fmt.Sprintf("tags[%d]", i), t, maxTagLen) && t == "" {
			v.add(fmt.Sprintf("tags[%d]", i), "must not be empty")
		}
	}
	p.Tags = req.GetTags()
	if raw := req.GetMessageId(); raw != "" {
		id, err := uuid.Parse(raw)
		if err != nil {
			v.add("message_id", "must be a UUID")
		}
		p.MessageID = id
	}
	if err := v.err(); err != nil {
		return err
	}
	sub, err := s.subscribe()
	if err != nil {
		return err
	}
	defer s.events.unsubscribe(sub)

	// Subscribed before the first read: a wake that comes while a read
	// runs is kept for the wait that follows it, so nothing committed in
	// between is left waiting for the next one.
	for {
		page, err := s.store.ReadEventPage(ctx, p)
		if err != nil {
			return fmt.Errorf("stream events: %w", err)
		}
		for _, e := range page.Events {
			if err := stream.Send(&posthastev1.StreamEventsResponse{Event: eventToProto(e, true), Cursor: e.Cursor.String()}); err != nil {
				return fmt.Errorf("stream events: send: %w", err)
			}
		}
		// The filters left events out after the last one sent: say how far
		// the stream looked, so a client that resumes does not make the
		// server look at them again.
		if n := len(page.Events); page.Next != p.After && (n == 0 || page.Events[n-1].Cursor != page.Next) {
			if err := stream.Send(&posthastev1.StreamEventsResponse{Cursor: page.Next.String()}); err != nil {
				return fmt.Errorf("stream events: send: %w", err)
			}
		}
		p.After = page.Next
		if page.More {
			continue
		}
		if err := s.events.wait(ctx, sub); err != nil {
			return err
		}
	}
}

// WatchMessage sends the events of one message of the caller's project
// until every recipient is final.
func (s *Server) WatchMessage(req *posthastev1.WatchMessageRequest, stream grpc.ServerStreamingServer[posthastev1.Event]) error {
	ctx := stream.Context()
	return s.streamStatus(ctx, s.watchMessage(ctx, req, stream))
}

func (s *Server) watchMessage(ctx context.Context, req *posthastev1.WatchMessageRequest, stream grpc.ServerStreamingServer[posthastev1.Event]) error {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return err
	}
	id, err := parseID(req.GetId())
	if err != nil {
		return err
	}
	sub, err := s.subscribe()
	if err != nil {
		return err
	}
	defer s.events.unsubscribe(sub)

	// The timeline shows events as they commit, not in id order: an event
	// with a lower id can appear after one with a higher id was sent. So
	// the stream remembers what it sent rather than a position; a
	// message's events are few.
	sent := make(map[int64]bool)
	for {
		tl, err := s.store.MessageTimeline(ctx, caller.projectID, id)
		if err != nil {
			return fmt.Errorf("watch message %s: %w", id, err)
		}
		for _, e := range tl.Events {
			if sent[e.ID] {
				continue
			}
			if err := stream.Send(eventToProto(e, false)); err != nil {
				return fmt.Errorf("watch message %s: send: %w", id, err)
			}
			sent[e.ID] = true
		}
		// The status and the events are of one snapshot, so the final
		// status comes with the events that made it final.
		if tl.Final {
			return nil
		}
		if err := s.events.wait(ctx, sub); err != nil {
			return err
		}
	}
}

// errNoHub answers stream calls on a server built without an EventHub.
var errNoHub = errors.New("this server does not stream events; poll ListEvents")

// subscribe registers a stream with the hub.
func (s *Server) subscribe() (*subscription, error) {
	if s.events == nil {
		return nil, errNoHub
	}
	return s.events.subscribe()
}

// streamStatus is toStatus for the stream handlers, which also end for
// reasons of their own: a hub stopping (Unavailable, so the client resumes
// from its last cursor, here after a restart or at another instance) and a
// server without one.
func (s *Server) streamStatus(ctx context.Context, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errNoHub):
		return status.Error(codes.Unimplemented, errNoHub.Error())
	case errors.Is(err, errShuttingDown):
		return status.Error(codes.Unavailable, "server shutting down; resume from the last cursor")
	case ctx.Err() != nil:
		// The client left (or its deadline passed) while a read or a send
		// was in flight; what failed then is of no interest.
		return toStatus(ctx, s.log, ctx.Err())
	}
	return toStatus(ctx, s.log, err)
}

// eventCursor parses an optional feed position.
func eventCursor(v *violations, field, raw string) db.EventCursor {
	c, err := db.ParseEventCursor(raw)
	if err != nil {
		v.add(field, "is not a cursor from this API")
	}
	return c
}

// eventTypes parses event type names, each given alone or several
// separated by commas (the REST form types=a,b).
func eventTypes(v *violations, field string, raw []string) []db.EventType {
	var out []db.EventType
	for _, value := range raw {
		for name := range strings.SplitSeq(value, ",") {
			name = strings.TrimSpace(name)
			t, ok := db.ParseEventType(name)
			if !ok {
				v.add(field, "unknown event type %q; must be one of %s", name, eventTypeNames())
				continue
			}
			out = append(out, t)
		}
	}
	return out
}

func eventTypeNames() string {
	names := make([]string, len(db.EventTypes))
	for i, t := range db.EventTypes {
		names[i] = string(t)
	}
	return strings.Join(names, ", ")
}

// eventToProto maps a stored event; withCursor is for the feed, whose
// positions are safe to resume from (see db.MessageTimeline).
func eventToProto(e db.Event, withCursor bool) *posthastev1.Event {
	p := e.Payload
	out := &posthastev1.Event{
		Id:             e.ID,
		Type:           string(e.Type),
		MessageId:      e.MessageID.String(),
		CreatedAt:      timestamppb.New(e.CreatedAt),
		Recipients:     int32(p.Recipients),
		SendAt:         optionalTimestamp(p.SendAt),
		Outcome:        p.Outcome,
		Ambiguous:      p.Ambiguous,
		MxHost:         p.MXHost,
		NextAttemptAt:  optionalTimestamp(p.NextAttemptAt),
		Class:          p.Class,
		Permanent:      p.Permanent,
		Reason:         p.Reason,
		DsnAction:      p.DSNAction,
		DsnStatus:      p.DSNStatus,
		RemoteMta:      p.RemoteMTA,
		DiagnosticCode: p.DiagnosticCode,
	}
	if e.RecipientID != uuid.Nil {
		out.RecipientId = e.RecipientID.String()
	}
	if withCursor {
		out.Cursor = e.Cursor.String()
	}
	if p.Code != 0 || p.EnhancedCode != "" || p.Text != "" {
		out.Reply = &posthastev1.SmtpReply{Code: int32(p.Code), EnhancedCode: p.EnhancedCode, Text: p.Text}
	}
	return out
}
