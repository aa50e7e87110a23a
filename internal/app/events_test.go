package app_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// The whole process: WatchMessage follows a message through the sandbox
// dispatcher to the end, the feed answers over REST, and stopping the
// process ends an open stream instead of waiting for it.
func TestEventsThroughTheProcess(t *testing.T) {
	t.Parallel()
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Sandbox:         true,
		// Long enough that a stream left open would make Stop fail.
		ShutdownTimeout: time.Minute,
	}
	// Tests send from domains nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = a.Stop(context.Background())
		}
	})
	b := &bundle{app: a, base: "http://" + a.HTTPAddr()}
	conn, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := posthastev1.NewMailServiceClient(conn)
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+testKey), time.Minute)
	defer cancel()

	code, resp := b.do(t, "POST", "/v1/messages", map[string]any{
		"from":    map[string]any{"address": "sender@posthaste.test"},
		"to":      []any{map[string]any{"address": "someone@example.com"}, map[string]any{"address": "bounce@example.com"}},
		"subject": "events",
		"text":    "hello",
	})
	if code != 202 {
		t.Fatalf("send: %d %v", code, resp)
	}
	id := resp["id"].(string)

	watch, err := client.WatchMessage(ctx, &posthastev1.WatchMessageRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for {
		ev, err := watch.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("WatchMessage: %v", err)
		}
		types = append(types, ev.GetType())
	}
	// bounce@'s 550 5.1.1 suppresses its address in the same transaction
	// as the bounce, so the suppressed event comes before the watch ends.
	slices.Sort(types)
	if !slices.Equal(types, []string{"accepted", "bounced", "delivered", "suppressed"}) {
		t.Errorf("watched %v, want accepted, delivered, bounced and suppressed", types)
	}

	code, resp = b.do(t, "GET", "/v1/messages/"+id+"/events", nil)
	if code != 200 || len(resp["events"].([]any)) != 4 {
		t.Errorf("timeline over REST: %d %v", code, resp)
	}
	code, resp = b.do(t, "GET", "/v1/events?types=accepted,bounced&limit=10", nil)
	if code != 200 || resp["next_cursor"] == nil {
		t.Errorf("feed over REST: %d %v", code, resp)
	}
	for query, field := range map[string]string{"types=opened": "types", "limit=abc": "limit", "after=nope": "after"} {
		code, resp = b.do(t, "GET", "/v1/events?"+query, nil)
		var named string
		if e, ok := resp["error"].(map[string]any); ok {
			if vs, ok := e["field_violations"].([]any); ok && len(vs) > 0 {
				named, _ = vs[0].(map[string]any)["field"].(string)
			}
		}
		if code != 400 || named != field {
			t.Errorf("feed with %s: %d %v, want 400 naming %s", query, code, resp, field)
		}
	}

	stream, err := client.StreamEvents(ctx, &posthastev1.StreamEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	stopCtx, cancelStop := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancelStop()
	stopped = true
	if err := a.Stop(stopCtx); err != nil {
		t.Fatalf("stop with a stream open: %v", err)
	}
	if stopCtx.Err() != nil {
		t.Error("stop waited for the open stream until its deadline")
	}
	for err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Unavailable {
		t.Errorf("stream after stop: %v, want Unavailable", err)
	}
}
