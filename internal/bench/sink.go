package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/textproto"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// IDHeader is the header field the load generator sets on every message:
// the run and the message's index, for whoever reads the messages at the
// receiving end. The sink itself identifies arrivals by recipient, which
// also covers a message whose recipients arrive in separate transactions.
const IDHeader = "X-Bench-Id"

// SinkConfig configures a Sink.
type SinkConfig struct {
	// Addr is the listen address. Defaults to "127.0.0.1:0".
	Addr string
	// OnArrival, when set, is called after each accepted message, from the
	// session's goroutine; it must be safe for concurrent use and quick.
	// Defaults to nil.
	OnArrival func(Arrival)
	// Logger receives the SMTP server's errors. Defaults to a discarding
	// logger.
	Logger *slog.Logger
}

// Arrival is one message the sink accepted (250 after DATA).
type Arrival struct {
	// At is when the end of the data arrived.
	At time.Time
	// From is the envelope sender.
	From string
	// To are the envelope recipients, as given in RCPT TO.
	To []string
	// ID is the value of IDHeader, "" when absent.
	ID string
	// Bytes is the size of the message data.
	Bytes int64
}

// SinkStats counts what a sink accepted.
type SinkStats struct {
	// Messages counts SMTP transactions that ended in 250.
	Messages int `json:"messages"`
	// Recipients counts their envelope recipients.
	Recipients int `json:"recipients"`
	// Bytes is the sum of their sizes.
	Bytes int64 `json:"bytes"`
	// First and Last are the first and the last arrival; zero when none.
	First time.Time `json:"first"`
	Last  time.Time `json:"last"`
}

// Sink is an SMTP server on loopback that accepts every message, counts it
// and throws it away. It does as little as a receiver can, so that what is
// measured is the sender.
type Sink struct {
	cfg SinkConfig

	srv       *smtp.Server
	ln        *trackingListener
	serveDone chan struct{}
	stopOnce  sync.Once

	mu      sync.Mutex
	stats   SinkStats
	changed chan struct{} // closed and replaced when stats change
}

// NewSink returns a sink that is not listening yet.
func NewSink(cfg SinkConfig) *Sink {
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Sink{cfg: cfg, changed: make(chan struct{})}
}

// Start listens and serves in the background; it returns once the listener
// accepts connections.
func (s *Sink) Start(ctx context.Context) error {
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("sink: listen on %s: %w", s.cfg.Addr, err)
	}
	s.ln = &trackingListener{Listener: l, conns: make(map[net.Conn]struct{})}
	s.srv = smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) {
		return &sinkSession{sink: s}, nil
	}))
	s.srv.Domain = "sink.bench.test"
	s.srv.MaxMessageBytes = 64 << 20
	s.srv.ReadTimeout = 5 * time.Minute
	s.srv.WriteTimeout = 5 * time.Minute
	s.srv.ErrorLog = slog.NewLogLogger(s.cfg.Logger.Handler(), slog.LevelWarn)
	s.serveDone = make(chan struct{})
	go func() {
		defer close(s.serveDone)
		if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, net.ErrClosed) {
			s.cfg.Logger.Error("sink stopped", "err", err)
		}
	}()
	return nil
}

// Addr is the address the sink listens on, "" before Start.
func (s *Sink) Addr() string {
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}

// Stop closes the listener and every connection and waits for the sessions
// to end. It is idempotent.
func (s *Sink) Stop() {
	s.stopOnce.Do(func() {
		if s.srv == nil {
			return
		}
		// go-smtp's Shutdown waits for sessions but does not end them, and
		// Close ends them without waiting; closing the connections first and
		// then shutting down does both.
		_ = s.ln.Close()
		<-s.serveDone
		s.ln.closeConns()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil && !errors.Is(err, smtp.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			s.cfg.Logger.Warn("sink shutdown", "err", err)
		}
	})
}

// Stats returns what the sink has accepted so far.
func (s *Sink) Stats() SinkStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// WaitMessages returns once the sink has accepted at least n messages, or
// with ctx's error when ctx ends first.
func (s *Sink) WaitMessages(ctx context.Context, n int) error {
	for {
		s.mu.Lock()
		got, changed := s.stats.Messages, s.changed
		s.mu.Unlock()
		if got >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("sink: %d of %d messages arrived: %w", got, n, ctx.Err())
		case <-changed:
		}
	}
}

func (s *Sink) record(a Arrival) {
	s.mu.Lock()
	st := &s.stats
	st.Messages++
	st.Recipients += len(a.To)
	st.Bytes += a.Bytes
	if st.First.IsZero() {
		st.First = a.At
	}
	st.Last = a.At
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	if s.cfg.OnArrival != nil {
		s.cfg.OnArrival(a)
	}
}

// sinkSession is one SMTP connection's transaction state.
type sinkSession struct {
	sink *Sink
	from string
	to   []string
}

func (ss *sinkSession) Reset() {
	ss.from = ""
	ss.to = nil
}

func (ss *sinkSession) Logout() error { return nil }

func (ss *sinkSession) Mail(from string, _ *smtp.MailOptions) error {
	ss.from = from
	return nil
}

func (ss *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.to = append(ss.to, to)
	return nil
}

func (ss *sinkSession) Data(r io.Reader) error {
	cr := &countingReader{r: r}
	br := bufio.NewReader(cr)
	// Only the header is parsed; a malformed one is not the sink's business.
	hdr, _ := textproto.NewReader(br).ReadMIMEHeader()
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("sink: read data: %w", err)
	}
	ss.sink.record(Arrival{
		At:    time.Now(),
		From:  ss.from,
		To:    ss.to,
		ID:    hdr.Get(IDHeader),
		Bytes: cr.n,
	})
	ss.to = nil
	return nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// trackingListener remembers open connections so Stop can close them.
type trackingListener struct {
	net.Listener
	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{}
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_ = c.Close()
		return nil, net.ErrClosed
	}
	tc := &trackedConn{Conn: c, l: l}
	l.conns[tc] = struct{}{}
	return tc, nil
}

func (l *trackingListener) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	return l.Listener.Close()
}

func (l *trackingListener) closeConns() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c := range l.conns {
		_ = c.(*trackedConn).Conn.Close()
	}
	clear(l.conns)
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
