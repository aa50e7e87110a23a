package service_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// everyMethod calls each MailService method with a request that would
// succeed while the database is up.
func everyMethod(client posthastev1.MailServiceClient, id string) map[string]func(context.Context) error {
	return map[string]func(context.Context) error{
		"SendMessage": func(ctx context.Context) error {
			_, err := client.SendMessage(ctx, validRequest())
			return err
		},
		"SendRawMessage": func(ctx context.Context) error {
			_, err := client.SendRawMessage(ctx, &posthastev1.SendRawMessageRequest{
				Raw:          b64("From: ada@example.test\r\nSubject: x\r\n\r\nhi\r\n"),
				EnvelopeFrom: "ada@example.test",
				Recipients:   []string{"bob@example.test"},
			})
			return err
		},
		"GetMessage": func(ctx context.Context) error {
			_, err := client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: id})
			return err
		},
		"ListMessages": func(ctx context.Context) error {
			_, err := client.ListMessages(ctx, &posthastev1.ListMessagesRequest{})
			return err
		},
		"CancelMessage": func(ctx context.Context) error {
			_, err := client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: id})
			return err
		},
	}
}

// wantUnavailable checks that every method answers Unavailable with the
// generic text, never the cause (addresses, driver messages).
func wantUnavailable(t *testing.T, ctx context.Context, calls map[string]func(context.Context) error) {
	t.Helper()
	for name, call := range calls {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		err := call(ctx)
		cancel()
		st := status.Convert(err)
		if st.Code() != codes.Unavailable {
			t.Errorf("%s: got %v, want Unavailable", name, err)
			continue
		}
		if msg := st.Message(); !strings.Contains(msg, "temporarily unavailable") ||
			strings.Contains(msg, "127.0.0.1") || strings.Contains(msg, "connect") {
			t.Errorf("%s: message %q is not the generic one", name, msg)
		}
	}
}

// sendOne stores a message while the database is up and returns its id.
func (e *env) sendOne(t *testing.T) string {
	t.Helper()
	resp, err := e.client.SendMessage(e.ctx(t), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetId()
}

// healthOf asks the health service about service.
func healthOf(t *testing.T, conn *grpc.ClientConn, service string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	resp, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatalf("health of %q: %v", service, err)
	}
	return resp.GetStatus()
}

// waitHealth polls MailService's health until it is want, failing after
// 10s. A health answer is reused for a second, so a change shows within one.
func waitHealth(t *testing.T, conn *grpc.ClientConn, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := healthOf(t, conn, posthastev1.MailService_ServiceDesc.ServiceName)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("MailService health is %v, want %v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The database goes down: authentication cannot look the key up, and every
// method answers Unavailable, which REST turns into 503.
func TestDatabaseDownIsUnavailable(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	id := e.sendOne(t)
	mailService := posthastev1.MailService_ServiceDesc.ServiceName
	if got := healthOf(t, e.conn, mailService); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("MailService health with the database up: %v", got)
	}

	e.proxy.Stop()
	wantUnavailable(t, e.ctx(t), everyMethod(e.client, id))
	waitHealth(t, e.conn, healthpb.HealthCheckResponse_NOT_SERVING)
	// The process itself is fine: restarting it would not bring the
	// database back.
	if got := healthOf(t, e.conn, ""); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("overall health with the database down: %v, want SERVING", got)
	}
	if m, r := e.counts(t); m != 1 || r != 2 {
		t.Errorf("stored %d messages, %d recipients; want only the first message's 1, 2", m, r)
	}
}

// The database goes down after a call was authenticated: the methods' own
// database errors are mapped too. Authentication here uses a database
// connection that stays up.
func TestDatabaseDownAfterAuthIsUnavailable(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	id := e.sendOne(t)
	srv, err := service.New(service.Config{Hostname: "mta.posthaste.test", AllowUnverifiedDomains: true, Logger: e.logger}, e.store, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start(t.Context())
	t.Cleanup(srv.Stop)
	conn := serve(t, service.NewGRPCServer(srv, open(t, e.direct), e.logger))
	client := posthastev1.NewMailServiceClient(conn)
	if _, err := client.GetMessage(e.ctx(t), &posthastev1.GetMessageRequest{Id: id}); err != nil {
		t.Fatalf("GetMessage with the database up: %v", err)
	}

	e.proxy.Stop()
	wantUnavailable(t, e.ctx(t), everyMethod(client, id))
	if m, _ := e.counts(t); m != 1 {
		t.Errorf("stored %d messages, want only the first", m)
	}
}

// A request that arrives while the process shuts down, its database pool
// already closed, is Unavailable too.
func TestClosedStoreIsUnavailable(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	id := e.sendOne(t)
	e.store.Close()
	wantUnavailable(t, e.ctx(t), everyMethod(e.client, id))
	waitHealth(t, e.conn, healthpb.HealthCheckResponse_NOT_SERVING)
}
