package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/mail"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// clientFlags are the flags of every command that talks to a running
// server over gRPC.
type clientFlags struct {
	server string
	apiKey string
	tls    bool
	json   bool
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.server, "server", "127.0.0.1:9090", "address (host:port) of the server's gRPC API")
	fs.StringVar(&c.apiKey, "api-key", "", "API key; prefer POSTHASTE_API_KEY, which the process list does not show")
	fs.BoolVar(&c.tls, "tls", false, "connect with TLS, checking the server's certificate against the system's roots")
	fs.BoolVar(&c.json, "json", false, "print JSON (one object per line for streams) instead of tables")
}

// bearer sends the API key with every call. It allows plain connections
// too, because a server on loopback commonly runs without TLS.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// dial opens the connection to the server; the caller closes it.
func (c *clientFlags) dial() (posthastev1.MailServiceClient, *grpc.ClientConn, error) {
	if c.apiKey == "" {
		return nil, nil, fmt.Errorf("no API key: give %s", flagRef("api-key"))
	}
	creds := insecure.NewCredentials()
	if c.tls {
		creds = credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})
	}
	conn, err := grpc.NewClient(c.server,
		grpc.WithTransportCredentials(creds),
		grpc.WithPerRPCCredentials(bearer(c.apiKey)))
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", c.server, err)
	}
	return posthastev1.NewMailServiceClient(conn), conn, nil
}

// callError turns a gRPC error into one that shows the server's message
// rather than the status's Go formatting.
func callError(what string, err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %s: %s", what, st.Code(), st.Message())
}

// writeJSON writes m as one line of JSON with the API's field names.
func writeJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	b = append(b, '\n')
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// parseAddress reads "Ada <ada@example.com>" or a bare address.
func parseAddress(s string) (*posthastev1.Address, error) {
	a, err := mail.ParseAddress(s)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", s, err)
	}
	return &posthastev1.Address{Address: a.Address, Name: a.Name}, nil
}

// formatTime shows a timestamp in local time, or "-" when it is unset.
func formatTime(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return "-"
	}
	return ts.AsTime().Local().Format(time.DateTime)
}

// formatReply shows an SMTP reply on one line.
func formatReply(r *posthastev1.SmtpReply) string {
	if r == nil {
		return ""
	}
	parts := []string{}
	if r.GetCode() != 0 {
		parts = append(parts, fmt.Sprint(r.GetCode()))
	}
	if r.GetEnhancedCode() != "" {
		parts = append(parts, r.GetEnhancedCode())
	}
	if r.GetText() != "" {
		parts = append(parts, r.GetText())
	}
	return strings.Join(parts, " ")
}

// finalStatus reports whether a recipient's status can no longer change.
func finalStatus(s string) bool {
	switch s {
	case "delivered", "bounced", "failed", "canceled":
		return true
	}
	return false
}

// repeatedFlag collects a flag given several times, taking each value as
// it is: header values may contain commas.
type repeatedFlag []string

func (r *repeatedFlag) String() string { return strings.Join(*r, "; ") }

func (r *repeatedFlag) Set(v string) error {
	*r = append(*r, v)
	return nil
}

// errNotDelivered reports a waited-for message that was not delivered to
// every recipient, so that scripts see it in the exit status.
var errNotDelivered = errors.New("not every recipient was delivered")
