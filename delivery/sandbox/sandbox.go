// Package sandbox owns the sandbox SMTP server: an in-process mail exchanger
// that `posthaste serve --sandbox` puts behind every recipient domain. The
// dispatcher reaches it through its ordinary SMTP client path, and the
// recipient's local part picks the answer (bounce@, defer@, full@,
// reject-data@, slow@; see Outcomes), in the spirit of a mailbox simulator,
// so every delivery state can be produced without sending mail anywhere.
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/internal/smtpserve"
)

const (
	// keepReceived bounds the list of recent accepted messages.
	keepReceived = 1000
	// maxPendingDefers bounds the remembered (recipient, MAIL FROM) pairs that
	// were deferred once and not yet retried.
	maxPendingDefers = 10000
	// commandTimeout is the server's idle timeout between commands, the
	// minimum RFC 5321 section 4.5.3.2.7 asks a server to wait.
	commandTimeout = 5 * time.Minute
)

// Config configures the sandbox server.
type Config struct {
	// Addr is the TCP address to listen on. Defaults to "127.0.0.1:0".
	Addr string
	// Hostname is the name the server gives in its greeting and EHLO reply.
	// Defaults to "sandbox.posthaste.invalid".
	Hostname string
	// SlowDelay is how long the reply to DATA waits when a recipient is
	// slow@. Defaults to 2s.
	SlowDelay time.Duration
	// MaxMessageBytes is the largest message accepted, advertised with the
	// SIZE extension (RFC 1870). Defaults to 40 MiB.
	MaxMessageBytes int64
	// ReportAddr is the host:port the reports that follow bounce-async@ and
	// complaint@ recipients are sent to: the bounce listener. They go to the
	// transaction's MAIL FROM address (a VERP address) over SMTP, whatever
	// its domain. Defaults to "": those recipients are then accepted like
	// any other and nothing follows.
	ReportAddr string
	// ReportDelay is how long after accepting a message its reports are
	// sent. Defaults to 500ms.
	ReportDelay time.Duration
	// Logger receives a line per accepted message and per refused recipient.
	// Defaults to discarding.
	Logger *slog.Logger
}

// WithDefaults returns the config with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Addr == "" {
		c.Addr = "127.0.0.1:0"
	}
	if c.Hostname == "" {
		c.Hostname = "sandbox.posthaste.invalid"
	}
	if c.SlowDelay == 0 {
		c.SlowDelay = 2 * time.Second
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = 40 << 20
	}
	if c.ReportDelay == 0 {
		c.ReportDelay = 500 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

func (c Config) validate() error {
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return fmt.Errorf("Addr: %q is not host:port: %w", c.Addr, err)
	}
	if c.Hostname == "" {
		return errors.New("Hostname: must not be empty")
	}
	if c.SlowDelay < 0 {
		return fmt.Errorf("SlowDelay: must not be negative, got %s", c.SlowDelay)
	}
	if c.MaxMessageBytes < 0 {
		return fmt.Errorf("MaxMessageBytes: must not be negative, got %d", c.MaxMessageBytes)
	}
	if c.ReportAddr != "" {
		if _, _, err := net.SplitHostPort(c.ReportAddr); err != nil {
			return fmt.Errorf("ReportAddr: %q is not host:port: %w", c.ReportAddr, err)
		}
	}
	if c.ReportDelay < 0 {
		return fmt.Errorf("ReportDelay: must not be negative, got %s", c.ReportDelay)
	}
	return nil
}

// Received describes one message the sandbox accepted.
type Received struct {
	// From is the MAIL FROM address ("" for the null reverse-path).
	From string
	// To lists the recipients accepted for the message, in RCPT order.
	To []string
	// Size is the message size in bytes as received.
	Size int
	// At is when the sandbox accepted the message.
	At time.Time
	// QueueID is the id given in the 250 reply to DATA.
	QueueID string
}

// Server is the sandbox SMTP server.
type Server struct {
	cfg Config
	log *slog.Logger

	// stopping is closed by Stop; slow replies give up waiting on it.
	stopping chan struct{}
	stopOnce sync.Once
	// reportCtx ends when Stop begins: reports waiting or being sent give
	// up. reports tracks their goroutines.
	reportCtx     context.Context
	cancelReports context.CancelFunc
	reports       sync.WaitGroup

	mu       sync.Mutex
	started  bool
	stopped  bool
	running  *smtpserve.Running
	received []Received // ring buffer, next holds the oldest entry once full
	next     int
	defers   pendingDefers
}

// New returns a server for cfg; zero fields take their defaults. Start
// reports an invalid config.
func New(cfg Config) *Server {
	cfg = cfg.WithDefaults()
	reportCtx, cancelReports := context.WithCancel(context.Background())
	return &Server{
		cfg:           cfg,
		log:           cfg.Logger,
		stopping:      make(chan struct{}),
		reportCtx:     reportCtx,
		cancelReports: cancelReports,
		defers:        pendingDefers{seq: make(map[pair]uint64)},
	}
}

// Start listens on the configured address and serves in the background. It
// returns as soon as the listener is up. ctx bounds only the listen; the
// server runs until Stop.
func (s *Server) Start(ctx context.Context) error {
	if err := s.cfg.validate(); err != nil {
		return fmt.Errorf("sandbox config: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errors.New("sandbox: start after stop")
	}
	if s.started {
		return errors.New("sandbox: already started")
	}

	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("sandbox listen on %s: %w", s.cfg.Addr, err)
	}
	ln := smtpserve.NewListener(l, 0, nil)

	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &session{srv: s, remote: c.Conn().RemoteAddr().String()}, nil
	}))
	srv.Domain = s.cfg.Hostname
	srv.MaxMessageBytes = s.cfg.MaxMessageBytes
	srv.ReadTimeout = commandTimeout
	srv.WriteTimeout = commandTimeout
	srv.ErrorLog = smtpserve.ErrorLog{Log: s.log, Prefix: "sandbox smtp: "}

	s.started = true
	s.running = smtpserve.Serve(srv, ln, s.log, "sandbox smtp server")
	s.log.Info("sandbox smtp server listening", "addr", ln.Addr().String())
	return nil
}

// Addr returns the address the server listens on, as "host:port", or "" before
// Start.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running == nil {
		return ""
	}
	return s.running.Addr()
}

// Stop closes the listener and every connection, and returns once all of the
// server's goroutines are done. A reply to DATA still waiting for a slow@
// recipient is abandoned, and so are reports not sent yet. Stop may be
// called more than once, and before Start.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		close(s.stopping)
		s.cancelReports()
		defer s.reports.Wait()
		s.mu.Lock()
		s.stopped = true
		running := s.running
		s.mu.Unlock()
		if running == nil {
			return
		}
		running.Stop(nil)
	})
}

// Received returns the most recently accepted messages, oldest first, up to
// the last 1000.
func (s *Server) Received() []Received {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Received, 0, len(s.received))
	n := len(s.received)
	for i := range n {
		r := s.received[(s.next+i)%n]
		r.To = append([]string(nil), r.To...)
		out = append(out, r)
	}
	return out
}

func (s *Server) record(r Received) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.received) < keepReceived {
		s.received = append(s.received, r)
		return
	}
	s.received[s.next] = r
	s.next = (s.next + 1) % keepReceived
}

// deferNow reports whether a defer@ recipient is refused this time: the first
// try of a (recipient, MAIL FROM) pair is, the next one is not, and the pair
// is forgotten after that so a later message is deferred once again.
func (s *Server) deferNow(rcpt, from string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.defers.toggle(pair{rcpt: normalize(rcpt), from: normalize(from)})
}

// waitSlow waits out the slow@ delay; it returns false if the server is
// stopping first.
func (s *Server) waitSlow() bool {
	t := time.NewTimer(s.cfg.SlowDelay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.stopping:
		return false
	}
}

// pair identifies a deferral: RFC 5321 addresses, lowercased.
type pair struct{ rcpt, from string }

// pendingDefers remembers pairs that were deferred once and not retried yet,
// bounded by forgetting the oldest.
type pendingDefers struct {
	seq   map[pair]uint64
	order []pendingEntry // insertion order; entries whose seq no longer matches are stale
	n     uint64
}

type pendingEntry struct {
	key pair
	seq uint64
}

// toggle returns true (defer) when key is not pending and makes it pending,
// and false (accept) when it is pending and forgets it.
func (p *pendingDefers) toggle(key pair) bool {
	if _, ok := p.seq[key]; ok {
		delete(p.seq, key)
		return false
	}
	p.n++
	p.seq[key] = p.n
	p.order = append(p.order, pendingEntry{key: key, seq: p.n})
	for len(p.seq) > maxPendingDefers {
		oldest := p.order[0]
		p.order = p.order[1:]
		if p.seq[oldest.key] == oldest.seq {
			delete(p.seq, oldest.key)
		}
	}
	if len(p.order) > 2*maxPendingDefers {
		live := make([]pendingEntry, 0, len(p.seq))
		for _, e := range p.order {
			if p.seq[e.key] == e.seq {
				live = append(live, e)
			}
		}
		p.order = live
	}
	return true
}
