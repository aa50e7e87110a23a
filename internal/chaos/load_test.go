//go:build chaos && linux

package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// outcome is what one send request got.
type outcome int

const (
	accepted    outcome = iota // 2xx / OK: the message must be delivered
	unavailable                // 503 / Unavailable from the service
	noAnswer                   // no answer at all: refused, reset, timed out
	otherStatus                // anything else: a bug under these faults
)

// send is one request of the load and what it got.
type send struct {
	rcpt    string // unique per request, so deliveries can be matched
	id      string // the message id of an accepted request
	outcome outcome
	detail  string // status or error of a request that was not accepted
	began   time.Time
	ended   time.Time
}

// ledger records every request the load made.
type ledger struct {
	mu    sync.Mutex
	sends []send
}

func (l *ledger) add(s send) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sends = append(l.sends, s)
}

// all returns a copy of the requests recorded so far.
func (l *ledger) all() []send {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]send(nil), l.sends...)
}

// load sends messages to the service from a few concurrent senders, half
// over REST and half over gRPC, each message to a recipient of its own,
// until stopped.
type load struct {
	svc    *instance
	ledger *ledger
	seq    atomic.Int64
	prefix string

	cancel context.CancelFunc
	wg     sync.WaitGroup
	conn   *grpc.ClientConn
	http   *http.Client
}

// loadConfig shapes the load.
type loadConfig struct {
	senders int           // concurrent senders; even ones use REST
	every   time.Duration // pause between one sender's requests
	prefix  string        // local-part prefix of the recipients
}

func startLoad(ctx context.Context, svc *instance, cfg loadConfig) (*load, error) {
	conn, err := grpc.NewClient(svc.grpcAddr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// A restarted service is back within a fraction of a second; the
		// default backoff (up to two minutes) would idle the gRPC senders.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
			MinConnectTimeout: 2 * time.Second,
		}),
		// Calls wait for the connection instead of failing at once while
		// the service restarts; the 5s deadline still bounds them.
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))
	if err != nil {
		return nil, fmt.Errorf("grpc client for %s: %w", svc.grpcAddr, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	l := &load{
		svc:    svc,
		ledger: &ledger{},
		prefix: cfg.prefix,
		cancel: cancel,
		conn:   conn,
		// Short enough that a request to a killed process is given up
		// soon; long enough for a commit on a busy machine.
		http: &http.Client{Timeout: 5 * time.Second},
	}
	for i := range cfg.senders {
		l.wg.Go(func() { l.run(ctx, i%2 == 0, cfg.every) })
	}
	return l, nil
}

// stop ends the load and waits for requests in flight.
func (l *load) stop() {
	l.cancel()
	l.wg.Wait()
	_ = l.conn.Close()
	l.http.CloseIdleConnections()
}

func (l *load) run(ctx context.Context, rest bool, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rcpt := fmt.Sprintf("%s%d@chaos.test", l.prefix, l.seq.Add(1))
		s := send{rcpt: rcpt, began: time.Now()}
		if rest {
			s.id, s.outcome, s.detail = l.sendREST(ctx, rcpt)
		} else {
			s.id, s.outcome, s.detail = l.sendGRPC(ctx, rcpt)
		}
		s.ended = time.Now()
		if ctx.Err() != nil && s.outcome != accepted {
			// Cut off by the end of the load, not by a fault.
			s.outcome, s.detail = noAnswer, "load stopped"
		}
		l.ledger.add(s)
	}
}

func (l *load) sendREST(ctx context.Context, rcpt string) (string, outcome, string) {
	body, _ := json.Marshal(map[string]any{
		"from":    map[string]string{"address": "chaos@posthaste.test"},
		"to":      []map[string]string{{"address": rcpt}},
		"subject": "chaos",
		"text":    "message for " + rcpt,
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+l.svc.httpAddr+"/v1/messages", bytes.NewReader(body))
	if err != nil {
		return "", otherStatus, err.Error()
	}
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := l.http.Do(req)
	if err != nil {
		return "", noAnswer, err.Error()
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	switch {
	case err != nil:
		// The answer was cut: whether it said 202 is unknown.
		return "", noAnswer, fmt.Sprintf("status %d, body cut: %v", resp.StatusCode, err)
	case resp.StatusCode == http.StatusServiceUnavailable:
		return "", unavailable, "503"
	case resp.StatusCode/100 != 2:
		return "", otherStatus, fmt.Sprintf("status %d: %s", resp.StatusCode, raw)
	}
	var out struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(raw, &out); err != nil || out.ID == "" {
		return "", otherStatus, fmt.Sprintf("status %d without an id: %s", resp.StatusCode, raw)
	}
	return out.ID, accepted, ""
}

func (l *load) sendGRPC(ctx context.Context, rcpt string) (string, outcome, string) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+apiKey)
	resp, err := posthastev1.NewMailServiceClient(l.conn).SendMessage(ctx, &posthastev1.SendMessageRequest{
		From:    &posthastev1.Address{Address: "chaos@posthaste.test"},
		To:      []*posthastev1.Address{{Address: rcpt}},
		Subject: "chaos",
		Text:    "message for " + rcpt,
	})
	if err == nil {
		return resp.GetId(), accepted, ""
	}
	st, _ := status.FromError(err)
	switch {
	case st.Code() == codes.Unavailable && isTransport(st.Message()):
		return "", noAnswer, st.Message()
	case st.Code() == codes.Unavailable:
		return "", unavailable, st.Message()
	case st.Code() == codes.DeadlineExceeded || st.Code() == codes.Canceled || errors.Is(err, context.DeadlineExceeded):
		return "", noAnswer, st.Message()
	default:
		return "", otherStatus, st.String()
	}
}

// isTransport tells a connection failure, which gRPC also reports as
// Unavailable, from the service's own Unavailable (the database is down),
// whose message service/errors.go fixes.
func isTransport(msg string) bool {
	return !strings.Contains(msg, "temporarily unavailable")
}
