//go:build chaos && linux

package chaos

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// stepTimeout is every SMTP timeout of the in-process service below: a
// worker stuck on a misbehaving server must be free again after it.
const stepTimeout = time.Second

// TestSMTPFaults points delivery at servers that misbehave in one way
// each, with a single delivery worker (Concurrency 1): the attempt must end
// within its step timeout, be recorded as what it was, and the worker must
// then deliver a message to a well-behaved server. The service runs in
// this process, so leaked goroutines are caught.
func TestSMTPFaults(t *testing.T) {
	cl := startCluster(t)
	// 12 MB: more than the socket buffers hold, so a server that stops
	// reading blocks the client in the middle of the message.
	big := bytes.Repeat([]byte("0123456789abcdef"), 9<<20/16)

	cases := []struct {
		name   string
		opts   []testenv.SMTPOption
		rcpts  int    // recipients at the misbehaving server
		attach []byte // attachment, to make the message large
		// check looks at the misbehaving server's recipients once done
		// says they are; it reports what it saw.
		done  func(m db.Message) bool
		check func(t *testing.T, m db.Message, bad *testenv.SMTPServer) string
	}{
		{
			name:  "greeting 421",
			opts:  []testenv.SMTPOption{testenv.WithGreeting(&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "busy"})},
			rcpts: 1,
			done:  attempts(2),
			check: func(t *testing.T, m db.Message, _ *testenv.SMTPServer) string {
				for _, a := range m.Attempts {
					if a.Code != 421 || a.Outcome != db.StatusDeferred || a.Source != "remote" {
						t.Errorf("attempt %+v, want a remote 421 deferral", a)
					}
				}
				return fmt.Sprintf("%d attempts, each a remote 421, recipient %s", len(m.Attempts), m.Recipients[0].Status)
			},
		},
		{
			name:  "drop after the final dot",
			opts:  []testenv.SMTPOption{testenv.WithDropAfterData()},
			rcpts: 1,
			done:  attempts(2),
			check: func(t *testing.T, m db.Message, _ *testenv.SMTPServer) string {
				for _, a := range m.Attempts {
					if a.Outcome != "ambiguous" || a.Source != "local" {
						t.Errorf("attempt %+v, want a local ambiguous outcome", a)
					}
				}
				if st := m.Recipients[0].Status; st != db.StatusDeferred && st != db.StatusSending {
					t.Errorf("recipient %s, want it retried", st)
				}
				return fmt.Sprintf("%d attempts, each ambiguous and retried", len(m.Attempts))
			},
		},
		{
			name:  "no reply after the final dot",
			opts:  []testenv.SMTPOption{testenv.WithNoReplyAfterData()},
			rcpts: 1,
			done:  attempts(1),
			check: func(t *testing.T, m db.Message, _ *testenv.SMTPServer) string {
				a := m.Attempts[0]
				if a.Outcome != "ambiguous" {
					t.Errorf("attempt %+v, want ambiguous: the data timeout ran out after the end of the data", a)
				}
				return fmt.Sprintf("ambiguous after %s", a.Duration.Round(time.Millisecond))
			},
		},
		{
			name:   "stops reading mid-message",
			opts:   []testenv.SMTPOption{testenv.WithStalledData()},
			rcpts:  1,
			attach: big,
			done:   attempts(1),
			check: func(t *testing.T, m db.Message, _ *testenv.SMTPServer) string {
				a := m.Attempts[0]
				if a.Outcome != db.StatusDeferred {
					t.Errorf("attempt %+v, want deferred: the end of the data was never sent", a)
				}
				return fmt.Sprintf("deferred after %s (%s)", a.Duration.Round(time.Millisecond), a.Text)
			},
		},
		{
			name:  "TLS handshake failure",
			opts:  []testenv.SMTPOption{testenv.WithBrokenTLS()},
			rcpts: 1,
			done:  hasStatus(db.StatusDelivered),
			check: func(t *testing.T, m db.Message, bad *testenv.SMTPServer) string {
				last := m.Attempts[len(m.Attempts)-1]
				if last.TLS || len(bad.Messages()) != 1 {
					t.Errorf("last attempt %+v, %d messages at the server; want one delivery in plain text", last, len(bad.Messages()))
				}
				return fmt.Sprintf("delivered in plain text after the failed handshake, %d attempt rows", len(m.Attempts))
			},
		},
		{
			name:  "452 after 100 recipients",
			opts:  []testenv.SMTPOption{testenv.WithRcptLimit(100, &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "too many recipients"})},
			rcpts: 120,
			done:  hasStatus(db.StatusDelivered),
			check: func(t *testing.T, m db.Message, bad *testenv.SMTPServer) string {
				got := make(map[string]int)
				for _, msg := range bad.Messages() {
					for _, r := range msg.To {
						got[r]++
					}
				}
				var deferred452 int
				for _, a := range m.Attempts {
					if a.Code == 452 {
						deferred452++
					}
				}
				if len(got) != 120 || deferred452 != 20 {
					t.Errorf("%d distinct recipients delivered, %d attempts answered 452; want 120 and 20", len(got), deferred452)
				}
				for r, n := range got {
					if n != 1 {
						t.Errorf("%s delivered %d times", r, n)
					}
				}
				return fmt.Sprintf("%d transactions, %d recipients deferred with 452 and delivered on the retry", len(bad.Messages()), deferred452)
			},
		},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// Registered first, so it runs after every other cleanup.
			ignore := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()

			bad := testenv.StartSMTP(t, tc.opts...)
			good := startSink(t, 0)
			databaseURL, err := cl.newDatabase(ctx, fmt.Sprintf("faults_%d", i))
			if err != nil {
				t.Fatal(err)
			}
			store, client := startInProcess(t, databaseURL, map[string]string{"bad.test": bad.Addr, "good.test": good.addr})

			began := time.Now()
			var to []string
			for n := range tc.rcpts {
				to = append(to, fmt.Sprintf("r%d@bad.test", n))
			}
			id, err := sendTo(ctx, client, to, tc.attach)
			if err != nil {
				t.Fatal(err)
			}
			var m db.Message
			wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
			err = poll(wctx, 50*time.Millisecond, func() (bool, error) {
				var err error
				m, err = store.GetMessage(wctx, db.DefaultProjectID(), id)
				return err == nil && tc.done(m), err
			})
			wcancel()
			if err != nil {
				t.Fatalf("message to the misbehaving server: %v; last state %+v", err, m)
			}
			for _, at := range m.Attempts {
				// Each step has its timeout; an attempt is at most a
				// connect, a few commands and the data, and the slack is
				// for a busy machine.
				if at.Duration > 3*stepTimeout+2*time.Second {
					t.Errorf("attempt took %s, past its timeouts (%s each)", at.Duration, stepTimeout)
				}
			}
			seen := tc.check(t, m, bad)

			// The one worker must be free: a message to a good server goes
			// out within a step timeout and a retry's pause.
			freeAt := time.Now()
			if _, err := sendTo(ctx, client, []string{"ok@good.test"}, nil); err != nil {
				t.Fatal(err)
			}
			wctx, wcancel = context.WithTimeout(ctx, stepTimeout+5*time.Second)
			missing := waitDelivered(wctx, good, []string{"ok@good.test"})
			wcancel()
			if len(missing) > 0 {
				t.Fatalf("the worker is still busy: a message to a well-behaved server was not delivered within %s", stepTimeout+5*time.Second)
			}
			t.Logf("%s: %s; fault seen after %s; next message delivered %s later",
				tc.name, seen, freeAt.Sub(began).Round(time.Millisecond), time.Since(freeAt).Round(time.Millisecond))
		})
	}
}

// attempts is done once the message has n attempt rows.
func attempts(n int) func(db.Message) bool {
	return func(m db.Message) bool { return len(m.Attempts) >= n }
}

// hasStatus is done once the message has the status.
func hasStatus(st string) func(db.Message) bool {
	return func(m db.Message) bool { return m.Status == st }
}

// startInProcess runs the service in this process with one delivery
// worker, short SMTP timeouts and quick retries, routed as given; it is
// stopped when the test ends.
func startInProcess(t *testing.T, databaseURL string, routes map[string]string) (*db.DB, posthastev1.MailServiceClient) {
	t.Helper()
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     databaseURL,
		BootstrapAPIKey: apiKey,
		Service:         service.Config{MaxRecipients: 150, MaxMessageBytes: 20 << 20},
		Delivery: delivery.Config{
			Routes:                      routes,
			Concurrency:                 1,
			MaxRecipientsPerTransaction: 150,
			PollInterval:                100 * time.Millisecond,
			LeaseDuration:               lease,
			Retry:                       delivery.RetryConfig{InitialInterval: 200 * time.Millisecond, MaxInterval: 500 * time.Millisecond},
			SMTP: delivery.SMTPConfig{
				Hostname:       "posthaste.test",
				ConnectTimeout: stepTimeout,
				CommandTimeout: stepTimeout,
				DataTimeout:    stepTimeout,
			},
		},
		ShutdownTimeout: 5 * time.Second,
	}
	// Tests send from domains nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.Stop(ctx); err != nil {
			t.Errorf("stop service: %v", err)
		}
	})
	store, err := db.Open(ctx, databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	conn, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return store, posthastev1.NewMailServiceClient(conn)
}

// sendTo sends one message over gRPC and returns its id.
func sendTo(ctx context.Context, client posthastev1.MailServiceClient, to []string, attach []byte) (uuid.UUID, error) {
	req := &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: "chaos@posthaste.test"},
		Subject: "fault",
		Text:    "hello",
	}
	for _, r := range to {
		req.To = append(req.To, &posthastev1.Address{Address: r})
	}
	if attach != nil {
		req.Attachments = []*posthastev1.Attachment{{
			Filename: "big.bin", ContentType: "application/octet-stream",
			Content: base64.StdEncoding.EncodeToString(attach),
		}}
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+apiKey)
	resp, err := client.SendMessage(ctx, req)
	if err != nil {
		return uuid.Nil, fmt.Errorf("send to %v: %w", to[0], err)
	}
	id, err := uuid.Parse(resp.GetId())
	if err != nil {
		return uuid.Nil, fmt.Errorf("message id %q: %w", resp.GetId(), err)
	}
	return id, nil
}
