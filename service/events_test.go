package service_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// eventsEnv is a MailService with an event hub on a real gRPC server on
// loopback, backed by a fresh database, with a key of the default project
// and a key of another project.
type eventsEnv struct {
	store  *db.DB
	hub    *service.EventHub
	gs     *grpc.Server
	served chan struct{}
	client posthastev1.MailServiceClient
	key    string
	other  string // a send and read key of project "other"
}

func setupEvents(t *testing.T) *eventsEnv {
	t.Helper()
	e := &eventsEnv{store: open(t, testenv.Database(t)), served: make(chan struct{})}
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	var err error
	// A short poll only makes the tests quicker; nothing waits on it.
	e.hub, err = service.NewEventHub(e.store, service.EventHubConfig{PollInterval: 20 * time.Millisecond, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	e.hub.Start(t.Context())
	t.Cleanup(e.hub.Stop)
	srv, err := service.New(service.Config{Hostname: "mta.posthaste.test", AllowUnverifiedDomains: true, Logger: logger}, e.store, e.hub.Wake, service.WithEventHub(e.hub))
	if err != nil {
		t.Fatal(err)
	}
	srv.Start(t.Context())
	t.Cleanup(srv.Stop)
	e.gs = service.NewGRPCServer(srv, e.store, logger)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(e.served)
		_ = e.gs.Serve(lis)
	}()
	t.Cleanup(func() {
		e.hub.Stop() // else a graceful stop would wait for open streams
		e.gs.GracefulStop()
		<-e.served
	})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.client = posthastev1.NewMailServiceClient(conn)
	e.key, _ = createKey(t, e.store, "test")
	p, err := e.store.CreateProject(t.Context(), "other")
	if err != nil {
		t.Fatal(err)
	}
	e.other, _ = createScopedKey(t, e.store, p.ID, "other", db.ScopeSend, db.ScopeRead)
	return e
}

func (e *eventsEnv) ctx(t *testing.T) context.Context { return withKey(t.Context(), e.key) }

// send stores a message with the given recipients through the API and
// returns its id.
func (e *eventsEnv) send(t *testing.T, ctx context.Context, tags []string, to ...string) string {
	t.Helper()
	req := validRequest()
	req.To = nil
	for _, a := range to {
		req.To = append(req.To, &posthastev1.Address{Address: a})
	}
	req.Tags = tags
	resp, err := e.client.SendMessage(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetId()
}

// finish claims every due recipient and records status for each, the way
// a dispatcher would, and waits for nothing.
func (e *eventsEnv) finish(t *testing.T, status string) {
	t.Helper()
	claimed, err := e.store.ClaimRecipients(t.Context(), db.ClaimParams{Owner: "test-" + uuid.NewString(), Limit: 100, LeaseFor: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	var outs []db.Outcome
	for _, c := range claimed {
		outs = append(outs, db.Outcome{RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: status, Code: 250, Text: "ok"})
	}
	if _, err := e.store.RecordOutcomes(t.Context(), outs); err != nil {
		t.Fatal(err)
	}
}

// feed reads ListEvents from after, page by page, until it has read at
// least n events. Transactions of other tests' databases hold the feed
// back for a moment (transaction ids are server-wide), so it polls, with
// a deadline.
func feed(t *testing.T, client posthastev1.MailServiceClient, ctx context.Context, req *posthastev1.ListEventsRequest, n int) ([]*posthastev1.Event, string) {
	t.Helper()
	var all []*posthastev1.Event
	deadline := time.After(30 * time.Second)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for {
		resp, err := client.ListEvents(ctx, req)
		if err != nil {
			t.Fatalf("ListEvents: %v", err)
		}
		if resp.GetNextCursor() == "" {
			t.Fatal("ListEvents answered without next_cursor")
		}
		all = append(all, resp.GetEvents()...)
		req.After = resp.GetNextCursor()
		if len(all) >= n && !resp.GetHasMore() {
			return all, req.After
		}
		if resp.GetHasMore() {
			continue
		}
		select {
		case <-deadline:
			t.Fatalf("read %d events, want %d", len(all), n)
		case <-poll.C:
		}
	}
}

func eventKeys(events []*posthastev1.Event) []string {
	out := make([]string, len(events))
	for i, e := range events {
		out[i] = e.GetType() + ":" + e.GetMessageId() + ":" + e.GetRecipientId()
	}
	return out
}

func TestListEventsFeed(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	otherCtx := withKey(t.Context(), e.other)
	var ids []string
	for i := range 4 {
		ids = append(ids, e.send(t, ctx, nil, "a@example.test", "b@example.test"))
		e.send(t, otherCtx, nil, "x@example.test")
		if i%2 == 1 {
			if _, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: ids[i]}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// 4 accepted, 2 x 2 canceled.
	all, end := feed(t, e.client, ctx, &posthastev1.ListEventsRequest{Limit: 3}, 8)
	if len(all) != 8 {
		t.Fatalf("%d events, want 8: %v", len(all), eventKeys(all))
	}
	seen := map[int64]bool{}
	for _, ev := range all {
		if !slices.Contains(ids, ev.GetMessageId()) {
			t.Errorf("the feed holds an event of another project's message %s", ev.GetMessageId())
		}
		if seen[ev.GetId()] {
			t.Errorf("event %d read twice", ev.GetId())
		}
		seen[ev.GetId()] = true
		if ev.GetCursor() == "" {
			t.Errorf("event %d has no cursor", ev.GetId())
		}
	}
	if got := all[0]; got.GetType() != "accepted" || got.GetMessageId() != ids[0] || got.GetRecipients() != 2 {
		t.Errorf("first event %v, want the first message accepted with 2 recipients", got)
	}

	// From the cursor of any event, exactly the later ones.
	for _, i := range []int{0, 4, 7} {
		rest, _ := feed(t, e.client, ctx, &posthastev1.ListEventsRequest{After: all[i].GetCursor(), Limit: 2}, 7-i)
		if !slices.Equal(eventKeys(rest), eventKeys(all[i+1:])) {
			t.Errorf("after event %d: %v, want %v", i, eventKeys(rest), eventKeys(all[i+1:]))
		}
	}
	// At the end, an empty page still has a cursor to poll from.
	resp, err := e.client.ListEvents(ctx, &posthastev1.ListEventsRequest{After: end})
	if err != nil || len(resp.GetEvents()) != 0 || resp.GetNextCursor() != end {
		t.Errorf("at the end: %v, %v; want no events and next_cursor %s", resp, err, end)
	}

	// A type filter, in the REST form too, keeps the cursor moving.
	for _, types := range [][]string{{"canceled"}, {"canceled,complained"}, {"canceled", "delayed"}} {
		got, next := feed(t, e.client, ctx, &posthastev1.ListEventsRequest{Types: types, Limit: 1}, 4)
		if len(got) != 4 {
			t.Errorf("types %v: %v", types, eventKeys(got))
		}
		for _, ev := range got {
			if ev.GetType() != "canceled" {
				t.Errorf("types %v: got %s", types, ev.GetType())
			}
		}
		if next != end {
			t.Errorf("types %v: ends at %s, want the position of the last event looked at, %s", types, next, end)
		}
	}

	// The other project sees its own four and nothing else.
	theirs, _ := feed(t, e.client, otherCtx, &posthastev1.ListEventsRequest{}, 4)
	for _, ev := range theirs {
		if slices.Contains(ids, ev.GetMessageId()) {
			t.Errorf("the other project's feed holds %s of %s", ev.GetType(), ev.GetMessageId())
		}
	}
	if len(theirs) != 4 {
		t.Errorf("the other project's feed: %d events, want 4", len(theirs))
	}
}

func TestListMessageEvents(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	id := e.send(t, ctx, nil, "a@example.test", "b@example.test")
	if _, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.client.ListMessageEvents(ctx, &posthastev1.ListMessageEventsRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, ev := range resp.GetEvents() {
		types = append(types, ev.GetType())
		if ev.GetMessageId() != id || ev.GetCursor() != "" {
			t.Errorf("event %v: want message %s and no cursor", ev, id)
		}
	}
	if !slices.Equal(types, []string{"accepted", "canceled", "canceled"}) || resp.GetStatus() != "canceled" {
		t.Errorf("timeline %v, status %s", types, resp.GetStatus())
	}

	// Another project's message answers exactly like an unknown id.
	otherCtx := withKey(t.Context(), e.other)
	_, foreign := e.client.ListMessageEvents(otherCtx, &posthastev1.ListMessageEventsRequest{Id: id})
	_, missing := e.client.ListMessageEvents(otherCtx, &posthastev1.ListMessageEventsRequest{Id: uuid.NewString()})
	f, m := status.Convert(foreign), status.Convert(missing)
	if f.Code() != codes.NotFound || f.Code() != m.Code() || f.Message() != m.Message() {
		t.Errorf("another project's message: %v; unknown: %v; want the same NotFound", f, m)
	}
}

func TestEventCallsRefuseBadInput(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	stream := func(req *posthastev1.StreamEventsRequest) error {
		s, err := e.client.StreamEvents(ctx, req)
		if err != nil {
			return err
		}
		_, err = s.Recv()
		return err
	}
	manyTags := make([]string, 21)
	for i := range manyTags {
		manyTags[i] = "t"
	}
	for _, tc := range []struct {
		name  string
		call  func() error
		field string
	}{
		{"after", func() error {
			_, err := e.client.ListEvents(ctx, &posthastev1.ListEventsRequest{After: "yesterday"})
			return err
		}, "after"},
		{"types", func() error {
			_, err := e.client.ListEvents(ctx, &posthastev1.ListEventsRequest{Types: []string{"delivered,opened"}})
			return err
		}, "types"},
		{"limit negative", func() error {
			_, err := e.client.ListEvents(ctx, &posthastev1.ListEventsRequest{Limit: -1})
			return err
		}, "limit"},
		{"limit too large", func() error {
			_, err := e.client.ListEvents(ctx, &posthastev1.ListEventsRequest{Limit: 1001})
			return err
		}, "limit"},
		{"message id", func() error {
			_, err := e.client.ListMessageEvents(ctx, &posthastev1.ListMessageEventsRequest{Id: "42"})
			return err
		}, "id"},
		{"stream after", func() error { return stream(&posthastev1.StreamEventsRequest{After: "1.x"}) }, "after"},
		{"stream types", func() error { return stream(&posthastev1.StreamEventsRequest{Types: []string{"sent"}}) }, "types"},
		{"stream tags", func() error { return stream(&posthastev1.StreamEventsRequest{Tags: manyTags}) }, "tags"},
		{"stream empty tag", func() error { return stream(&posthastev1.StreamEventsRequest{Tags: []string{""}}) }, "tags[0]"},
		{"stream message id", func() error { return stream(&posthastev1.StreamEventsRequest{MessageId: "m1"}) }, "message_id"},
		{"watch id", func() error {
			s, err := e.client.WatchMessage(ctx, &posthastev1.WatchMessageRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}, "id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if status.Code(err) != codes.InvalidArgument || !slices.Contains(violations(err), tc.field) {
				t.Errorf("got %v (fields %v), want InvalidArgument naming %s", err, violations(err), tc.field)
			}
		})
	}

	// The read scope is needed.
	sendOnly, _ := createScopedKey(t, e.store, uuid.Nil, "send-only", db.ScopeSend)
	_, err := e.client.ListEvents(withKey(t.Context(), sendOnly), &posthastev1.ListEventsRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("ListEvents with a send key: %v, want PermissionDenied", err)
	}
}

// recvEvent receives the next event of a stream, skipping checkpoints.
func recvEvent(t *testing.T, s grpc.ServerStreamingClient[posthastev1.StreamEventsResponse]) *posthastev1.StreamEventsResponse {
	t.Helper()
	for {
		resp, err := s.Recv()
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if resp.GetEvent() != nil {
			return resp
		}
	}
}

// A stream resumed from the last cursor it delivered misses nothing that
// was committed while it was away and repeats nothing.
func TestStreamEventsResume(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	// The longest a receive may block before the test is declared stuck.
	streamCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	first, err := e.client.StreamEvents(streamCtx, &posthastev1.StreamEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	a := e.send(t, ctx, nil, "a@example.test")
	got := recvEvent(t, first)
	if got.GetEvent().GetType() != "accepted" || got.GetEvent().GetMessageId() != a || got.GetCursor() != got.GetEvent().GetCursor() {
		t.Fatalf("first event %v, want %s accepted", got, a)
	}
	// Written while the stream is open, after it caught up.
	e.finish(t, db.StatusDelivered)
	got = recvEvent(t, first)
	if got.GetEvent().GetType() != "delivered" || got.GetEvent().GetMessageId() != a {
		t.Fatalf("second event %v, want %s delivered", got, a)
	}
	cursor := got.GetCursor()
	cancel()
	if _, err := first.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("after cancel: %v", err)
	}

	// Written while nobody listens.
	b := e.send(t, ctx, nil, "b@example.test")
	c := e.send(t, ctx, nil, "c@example.test")
	e.send(t, withKey(t.Context(), e.other), nil, "x@example.test")

	streamCtx, cancel = context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	second, err := e.client.StreamEvents(streamCtx, &posthastev1.StreamEventsRequest{After: cursor})
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for range 2 {
		keys = append(keys, eventKeys([]*posthastev1.Event{recvEvent(t, second).GetEvent()})...)
	}
	d := e.send(t, ctx, nil, "d@example.test")
	keys = append(keys, eventKeys([]*posthastev1.Event{recvEvent(t, second).GetEvent()})...)
	want := []string{"accepted:" + b + ":", "accepted:" + c + ":", "accepted:" + d + ":"}
	if !slices.Equal(keys, want) {
		t.Errorf("resumed stream: %v, want %v", keys, want)
	}
}

// Filters: types, tags and one message.
func TestStreamEventsFilters(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	plain := e.send(t, ctx, nil, "a@example.test")
	tagged := e.send(t, ctx, []string{"receipt"}, "b@example.test")
	e.finish(t, db.StatusBounced)

	streamCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		req  *posthastev1.StreamEventsRequest
		want []string
	}{
		{"types", &posthastev1.StreamEventsRequest{Types: []string{"bounced"}}, []string{"bounced:" + plain, "bounced:" + tagged}},
		{"tags", &posthastev1.StreamEventsRequest{Tags: []string{"receipt"}}, []string{"accepted:" + tagged, "bounced:" + tagged}},
		{"message", &posthastev1.StreamEventsRequest{MessageId: plain}, []string{"accepted:" + plain, "bounced:" + plain}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := e.client.StreamEvents(streamCtx, tc.req)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for range tc.want {
				ev := recvEvent(t, s).GetEvent()
				got = append(got, ev.GetType()+":"+ev.GetMessageId())
			}
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestWatchMessageEndsWhenFinal(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	id := e.send(t, ctx, nil, "a@example.test", "b@example.test")
	streamCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	s, err := e.client.WatchMessage(streamCtx, &posthastev1.WatchMessageRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	ev, err := s.Recv()
	if err != nil || ev.GetType() != "accepted" {
		t.Fatalf("first: %v, %v", ev, err)
	}
	e.finish(t, db.StatusDelivered)
	var types []string
	for {
		ev, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break // ended with OK
		}
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		types = append(types, ev.GetType())
	}
	if !slices.Equal(types, []string{"delivered", "delivered"}) {
		t.Errorf("after accepted: %v, want two delivered", types)
	}

	// Another project's message is not found.
	w, err := e.client.WatchMessage(withKey(t.Context(), e.other), &posthastev1.WatchMessageRequest{Id: id})
	if err == nil {
		_, err = w.Recv()
	}
	if status.Code(err) != codes.NotFound {
		t.Errorf("watching another project's message: %v, want NotFound", err)
	}
}

// Stopping the hub ends every open stream, so a graceful stop of the gRPC
// server returns; the clients learn to resume elsewhere (Unavailable).
func TestStreamsEndAtShutdown(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	id := e.send(t, ctx, nil, "a@example.test")
	streamCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	events, err := e.client.StreamEvents(streamCtx, &posthastev1.StreamEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	recvEvent(t, events)
	watch, err := e.client.WatchMessage(streamCtx, &posthastev1.WatchMessageRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Recv(); err != nil {
		t.Fatal(err)
	}

	e.hub.Stop()
	e.gs.GracefulStop()
	<-e.served
	for name, recv := range map[string]func() error{
		"StreamEvents": func() error { _, err := events.Recv(); return err },
		"WatchMessage": func() error { _, err := watch.Recv(); return err },
	} {
		var err error
		for err == nil {
			err = recv() // checkpoints may come first
		}
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s after shutdown: %v, want Unavailable", name, err)
		}
	}
}

// A transaction that wrote an event first but commits last: the stream
// must deliver its event, and in feed order before the later one.
func TestStreamEventsCommitOrder(t *testing.T) {
	t.Parallel()
	e := setupEvents(t)
	ctx := e.ctx(t)
	a := e.send(t, ctx, nil, "a@example.test")
	streamCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	s, err := e.client.StreamEvents(streamCtx, &posthastev1.StreamEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	recvEvent(t, s) // a accepted

	written, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- e.store.InTx(t.Context(), func(tx *db.DB) error {
			if _, _, err := tx.CancelMessage(t.Context(), db.DefaultProjectID(), uuid.MustParse(a)); err != nil {
				return err
			}
			close(written)
			<-release
			return nil
		})
	}()
	<-written
	b := e.send(t, ctx, nil, "b@example.test") // commits first, with a higher event id
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var keys []string
	for range 2 {
		ev := recvEvent(t, s).GetEvent()
		keys = append(keys, ev.GetType()+":"+ev.GetMessageId())
	}
	if want := []string{"canceled:" + a, "accepted:" + b}; !slices.Equal(keys, want) {
		t.Errorf("stream: %v, want %v", keys, want)
	}
}
