//go:build chaos && linux

package chaos

import (
	"io"
	"log"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// sink is an SMTP server that accepts everything and counts, per envelope
// recipient, how many times a message reached it (250 to the end of the
// data). It also counts the sessions open at any moment: a kill can only
// duplicate messages whose transaction was on one of those.
type sink struct {
	addr  string
	srv   *smtp.Server
	delay time.Duration // before the reply to the end of the data

	mu        sync.Mutex
	delivered map[string]int
	messages  int
	open      int
	changed   chan struct{} // closed and replaced on every delivery
}

// startSink starts a sink that takes delay to answer the end of the data,
// like a receiver that scans and stores each message: the longer it takes,
// the more sessions are in flight when a fault strikes.
func startSink(t *testing.T, delay time.Duration) *sink {
	t.Helper()
	s := &sink{delay: delay, delivered: make(map[string]int), changed: make(chan struct{})}
	srv := smtp.NewServer(sinkBackend{s})
	srv.Domain = "sink.test"
	srv.MaxRecipients = 1000
	srv.ErrorLog = log.New(io.Discard, "", 0)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sink listen: %v", err)
	}
	s.addr, s.srv = ln.Addr().String(), srv
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		// Close, not Shutdown: a killed client's connections need not be
		// waited for.
		_ = srv.Close()
		<-served
	})
	return s
}

// count returns how many copies of the message to rcpt arrived.
func (s *sink) count(rcpt string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delivered[rcpt]
}

// openSessions returns the number of SMTP sessions open now.
func (s *sink) openSessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

// snapshot returns a copy of the per-recipient counts and a channel closed
// at the next delivery.
func (s *sink) snapshot() (map[string]int, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[string]int, len(s.delivered))
	for k, v := range s.delivered {
		m[k] = v
	}
	return m, s.changed
}

type sinkBackend struct{ s *sink }

func (b sinkBackend) NewSession(*smtp.Conn) (smtp.Session, error) {
	b.s.mu.Lock()
	b.s.open++
	b.s.mu.Unlock()
	return &sinkSession{s: b.s}, nil
}

type sinkSession struct {
	s  *sink
	to []string
}

func (ss *sinkSession) Reset() { ss.to = nil }

// Logout runs when the connection ends, however it ends.
func (ss *sinkSession) Logout() error {
	ss.s.mu.Lock()
	ss.s.open--
	ss.s.mu.Unlock()
	return nil
}

func (ss *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }

func (ss *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.to = append(ss.to, to)
	return nil
}

func (ss *sinkSession) Data(r io.Reader) error {
	// A message cut off by a kill never reaches the end of the data and
	// is not counted.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	if ss.s.delay > 0 {
		// Not waiting for async work: this is the receiver's own pace.
		// Counted after it, right before the 250, so a message counts
		// once the sender can learn it was taken.
		time.Sleep(ss.s.delay)
	}
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	for _, rcpt := range ss.to {
		ss.s.delivered[rcpt]++
	}
	ss.s.messages++
	close(ss.s.changed)
	ss.s.changed = make(chan struct{})
	return nil
}
