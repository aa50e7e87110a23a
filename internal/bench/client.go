package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// outMessage is what the load generator sends; the rest of the request is
// the same for every message of a run.
type outMessage struct {
	id      string // IDHeader's value
	subject string
	to      []string
}

// sender sends messages over one of the two APIs, or over SMTP to a relay.
type sender interface {
	// check makes one cheap authenticated call, so that a wrong address or
	// key stops the run before it sends anything.
	check(ctx context.Context) error
	// send queues one message; a refusal is a *sendError.
	send(ctx context.Context, m outMessage) error
	close() error
}

// sendError is a failed send, with the kind it is counted under.
type sendError struct {
	kind string
	err  error
}

func (e *sendError) Error() string { return e.kind + ": " + e.err.Error() }
func (e *sendError) Unwrap() error { return e.err }

// errorKind names err for the report's error counts: "http_503",
// "grpc_Unavailable", "item_FIELD_INVALID" (one message of a batch),
// "smtp_451", "timeout", "connection", "other".
func errorKind(err error) string {
	var se *sendError
	if errors.As(err, &se) {
		return se.kind
	}
	var ne net.Error
	switch {
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.As(err, &ne), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "connection"
	}
	return "other"
}

// messageTemplate is the fixed part of every request.
type messageTemplate struct {
	from string
	text string
}

// bodyText returns size bytes of plain ASCII text in lines short enough to
// need no encoding, so the size on the wire is close to size.
func bodyText(size int) string {
	const line = "The quick brown fox jumps over the lazy dog, 0123456789 times over.\n"
	var b strings.Builder
	b.Grow(size)
	for b.Len() < size {
		b.WriteString(line[:min(len(line), size-b.Len())])
	}
	return b.String()
}

// zeroID is a well-formed message id that never exists.
const zeroID = "00000000-0000-0000-0000-000000000000"

// restSender posts JSON to the REST API.
type restSender struct {
	base   string
	auth   string
	tmpl   messageTemplate
	client *http.Client
}

func newRESTSender(baseURL, apiKey string, conns int, timeout time.Duration, tmpl messageTemplate) *restSender {
	tr := &http.Transport{
		// One keep-alive connection per concurrent caller, as a web
		// backend's connection pool would hold.
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     90 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
	}
	return &restSender{
		base:   strings.TrimRight(baseURL, "/"),
		auth:   "Bearer " + apiKey,
		tmpl:   tmpl,
		client: &http.Client{Transport: tr, Timeout: timeout},
	}
}

type restAddress struct {
	Address string `json:"address"`
}

type restHeader struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

type restSend struct {
	From    restAddress   `json:"from"`
	To      []restAddress `json:"to"`
	Subject string        `json:"subject"`
	Text    string        `json:"text"`
	Headers []restHeader  `json:"headers"`
}

func (s *restSender) check(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base+"/v1/messages/"+zeroID, nil)
	if err != nil {
		return fmt.Errorf("check rest api at %s: %w", s.base, err)
	}
	req.Header.Set("Authorization", s.auth)
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("check rest api at %s: %w", s.base, err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	switch resp.StatusCode {
	case http.StatusNotFound, http.StatusForbidden:
		// The key was accepted; a key allowed to send but not to read
		// is fine for a benchmark.
		return nil
	case http.StatusUnauthorized:
		return fmt.Errorf("check rest api at %s: the API key was refused (401)", s.base)
	default:
		return fmt.Errorf("check rest api at %s: unexpected answer %s to a GET of an unknown message", s.base, resp.Status)
	}
}

func (s *restSender) send(ctx context.Context, m outMessage) error {
	if err := s.post(ctx, "/v1/messages", s.request(m), nil); err != nil {
		return fmt.Errorf("send message %s: %w", m.id, err)
	}
	return nil
}

// request is m as the body of a send call.
func (s *restSender) request(m outMessage) restSend {
	body := restSend{
		From:    restAddress{Address: s.tmpl.from},
		To:      make([]restAddress, len(m.to)),
		Subject: m.subject,
		Text:    s.tmpl.text,
		Headers: []restHeader{{Name: IDHeader, Value: m.id}},
	}
	for i, a := range m.to {
		body.To[i].Address = a
	}
	return body
}

// post sends body as JSON to path and decodes a successful answer into
// out, when not nil; an answer other than 2xx is a *sendError.
func (s *restSender) post(ctx context.Context, path string, body, out any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return fmt.Errorf("encode request: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", s.auth)
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	// Read to the end so the connection is reused.
	respBody, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode/100 != 2 {
		return &sendError{
			kind: fmt.Sprintf("http_%d", resp.StatusCode),
			err:  fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(respBody)),
		}
	}
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(respBody, out); err != nil {
		return fmt.Errorf("decode answer: %w", err)
	}
	return nil
}

func (s *restSender) close() error {
	s.client.CloseIdleConnections()
	return nil
}

// grpcSender calls SendMessage over one client connection; HTTP/2 carries
// the concurrent calls as streams on it, which is how a gRPC client is
// normally used.
type grpcSender struct {
	addr   string
	auth   string
	tmpl   messageTemplate
	conn   *grpc.ClientConn
	client posthastev1.MailServiceClient
}

func newGRPCSender(addr, apiKey string, tmpl messageTemplate) (*grpcSender, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("grpc client for %s: %w", addr, err)
	}
	return &grpcSender{
		addr:   addr,
		auth:   "Bearer " + apiKey,
		tmpl:   tmpl,
		conn:   conn,
		client: posthastev1.NewMailServiceClient(conn),
	}, nil
}

func (s *grpcSender) withAuth(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", s.auth)
}

func (s *grpcSender) check(ctx context.Context) error {
	_, err := s.client.GetMessage(s.withAuth(ctx), &posthastev1.GetMessageRequest{Id: zeroID})
	switch status.Code(err) {
	case codes.NotFound, codes.PermissionDenied:
		return nil // see restSender.check
	case codes.Unauthenticated:
		return fmt.Errorf("check grpc api at %s: the API key was refused: %w", s.addr, err)
	default:
		return fmt.Errorf("check grpc api at %s: unexpected answer to a GetMessage of an unknown message: %w", s.addr, err)
	}
}

func (s *grpcSender) send(ctx context.Context, m outMessage) error {
	if _, err := s.client.SendMessage(s.withAuth(ctx), s.request(m)); err != nil {
		return grpcError(fmt.Errorf("send message %s: %w", m.id, err))
	}
	return nil
}

// request is m as a SendMessage request.
func (s *grpcSender) request(m outMessage) *posthastev1.SendMessageRequest {
	req := &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: s.tmpl.from},
		To:      make([]*posthastev1.Address, len(m.to)),
		Subject: m.subject,
		Text:    s.tmpl.text,
		Headers: []*posthastev1.Header{{Name: IDHeader, Value: m.id}},
	}
	for i, a := range m.to {
		req.To[i] = &posthastev1.Address{Address: a}
	}
	return req
}

// grpcError is a failed call's error with the kind of its status code.
func grpcError(err error) error {
	st, _ := status.FromError(err)
	kind := "grpc_" + st.Code().String()
	switch st.Code() {
	case codes.DeadlineExceeded:
		kind = "timeout"
	case codes.Canceled:
		kind = "canceled"
	}
	return &sendError{kind: kind, err: err}
}

func (s *grpcSender) close() error {
	if err := s.conn.Close(); err != nil {
		return fmt.Errorf("close grpc client: %w", err)
	}
	return nil
}
