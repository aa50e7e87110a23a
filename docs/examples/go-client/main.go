// Command go-client sends one message through Posthaste's gRPC API and
// follows it until every recipient has a final status.
//
//	POSTHASTE_API_KEY=ph_... go run ./docs/examples/go-client -addr localhost:9090 -to someone@example.com
//
// With -tls-ca it speaks TLS, trusting that CA file (a server started with
// --tls-cert-file); -tls alone trusts the system's CAs.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

func main() {
	addr := flag.String("addr", "localhost:9090", "Posthaste gRPC address")
	from := flag.String("from", "shop@example.com", "sender")
	to := flag.String("to", "someone@example.com", "recipient")
	useTLS := flag.Bool("tls", false, "connect with TLS, trusting the system's CAs")
	caFile := flag.String("tls-ca", "", "connect with TLS, trusting this PEM CA file")
	flag.Parse()

	creds := insecure.NewCredentials()
	if *useTLS || *caFile != "" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if *caFile != "" {
			pem, err := os.ReadFile(*caFile)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			cfg.RootCAs = x509.NewCertPool()
			cfg.RootCAs.AppendCertsFromPEM(pem)
		}
		creds = credentials.NewTLS(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := run(ctx, *addr, os.Getenv("POSTHASTE_API_KEY"), *from, *to, creds, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// run sends a message from from to to and prints each recipient's final
// status. key is the API key; every call carries it as a bearer token.
func run(ctx context.Context, addr, key, from, to string, creds credentials.TransportCredentials, out io.Writer) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	client := posthastev1.NewMailServiceClient(conn)
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)

	// The idempotency key makes the call safe to retry: a second call with
	// it stores nothing new and answers replayed=true.
	var header metadata.MD
	sent, err := client.SendMessage(ctx, &posthastev1.SendMessageRequest{
		From:           &posthastev1.Address{Address: from, Name: "Example Shop"},
		To:             []*posthastev1.Address{{Address: to}},
		Subject:        "Your receipt",
		Text:           "Thanks for your order.",
		Tags:           []string{"receipt"},
		IdempotencyKey: "example-receipt-" + to,
	}, grpc.Header(&header))
	if err != nil {
		return describe("send", err)
	}
	fmt.Fprintf(out, "sent %s (replayed %t, request id %s)\n", sent.GetId(), sent.GetReplayed(), first(header.Get("x-request-id")))

	// Poll until every recipient is final. WatchMessage streams the same
	// without polling; polling is shown because REST clients do it too.
	for {
		m, err := client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: sent.GetId()})
		if err != nil {
			return describe("get", err)
		}
		if final(m) {
			for _, r := range m.GetRecipients() {
				fmt.Fprintf(out, "%s: %s %d %s\n", r.GetAddress(), r.GetStatus(),
					r.GetLastReply().GetCode(), r.GetLastReply().GetEnhancedCode())
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", sent.GetId(), ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func final(m *posthastev1.Message) bool {
	for _, r := range m.GetRecipients() {
		switch r.GetStatus() {
		case "delivered", "bounced", "failed", "canceled":
		default:
			return false
		}
	}
	return true
}

// describe names an error by its code and reason (the reason is what a
// program should branch on, e.g. FIELD_INVALID or OVERLOADED).
func describe(op string, err error) error {
	st := status.Convert(err)
	reason := ""
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			reason = info.GetReason()
		}
	}
	if st.Code() == codes.Unavailable {
		return fmt.Errorf("%s: %s %s: %s (retry later with the same idempotency key)", op, st.Code(), reason, st.Message())
	}
	return fmt.Errorf("%s: %s %s: %s", op, st.Code(), reason, st.Message())
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}
