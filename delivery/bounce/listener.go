package bounce

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/internal/smtpserve"
)

// Handler receives every message the listener accepts. HandleReport runs
// before the reply to DATA: an error answers 451, so the sending MTA keeps
// the message and retries. A retry delivers the same report again, so
// HandleReport must be idempotent. It is called once per accepted recipient
// (token) of the message, from many connections at once.
type Handler interface {
	HandleReport(ctx context.Context, token Token, report Report) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, token Token, report Report) error

// HandleReport calls f.
func (f HandlerFunc) HandleReport(ctx context.Context, token Token, report Report) error {
	return f(ctx, token, report)
}

// Config configures the bounce listener.
type Config struct {
	// Addr is the TCP address to listen on. Defaults to ":2525".
	Addr string
	// Domain is the name the server gives in its greeting and EHLO reply.
	// Defaults to the VERP's bounce domain.
	Domain string
	// VERP checks the recipients: only its valid addresses are accepted.
	// Required.
	VERP *VERP
	// Handler receives the accepted reports. Required.
	Handler Handler
	// MaxMessageBytes is the largest message accepted, advertised with the
	// SIZE extension (RFC 1870); bounces return at most the original's
	// header or a short copy. Defaults to 1 MiB.
	MaxMessageBytes int64
	// MaxConnections bounds the connections served at once; others are
	// answered 421 and closed (RFC 5321 section 3.8). Defaults to 100.
	MaxConnections int
	// MaxRecipients bounds the RCPT commands accepted per message; a
	// bounce has one. Defaults to 10.
	MaxRecipients int
	// ReadTimeout bounds the wait for each command, and for the whole
	// message once DATA is accepted. Defaults to 1 minute.
	ReadTimeout time.Duration
	// WriteTimeout bounds each reply's write. Defaults to 1 minute.
	WriteTimeout time.Duration
	// HandlerTimeout bounds each call to the Handler. Defaults to 30s.
	HandlerTimeout time.Duration
	// TLSConfig, when it holds a certificate, enables STARTTLS (RFC
	// 3207). Defaults to none.
	TLSConfig *tls.Config
	// Logger receives a line per accepted report and per refusal.
	// Defaults to discarding.
	Logger *slog.Logger
	// Observe is told the kind of every report handed to the Handler
	// (dsn, complaint, auto_reply, unstructured_bounce, unknown), and
	// "refused" for every recipient refused, for metrics. Defaults to nil:
	// nothing is told.
	Observe func(kind string)
}

// WithDefaults returns the config with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Addr == "" {
		c.Addr = ":2525"
	}
	if c.Domain == "" && c.VERP != nil {
		c.Domain = c.VERP.Domain()
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = 1 << 20
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = 100
	}
	if c.MaxRecipients == 0 {
		c.MaxRecipients = 10
	}
	if c.ReadTimeout == 0 {
		c.ReadTimeout = time.Minute
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = time.Minute
	}
	if c.HandlerTimeout == 0 {
		c.HandlerTimeout = 30 * time.Second
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
	if c.VERP == nil {
		return errors.New("VERP: required")
	}
	if c.Handler == nil {
		return errors.New("Handler: required")
	}
	if c.Domain == "" {
		return errors.New("Domain: must not be empty")
	}
	if c.MaxMessageBytes < 0 {
		return fmt.Errorf("MaxMessageBytes: must not be negative, got %d", c.MaxMessageBytes)
	}
	if c.MaxConnections < 0 {
		return fmt.Errorf("MaxConnections: must not be negative, got %d", c.MaxConnections)
	}
	if c.MaxRecipients < 0 {
		return fmt.Errorf("MaxRecipients: must not be negative, got %d", c.MaxRecipients)
	}
	if c.ReadTimeout < 0 || c.WriteTimeout < 0 || c.HandlerTimeout < 0 {
		return errors.New("ReadTimeout, WriteTimeout, HandlerTimeout: must not be negative")
	}
	if c.TLSConfig != nil && len(c.TLSConfig.Certificates) == 0 && c.TLSConfig.GetCertificate == nil {
		return errors.New("TLSConfig: has no certificate")
	}
	return nil
}

// Listener is the SMTP server that receives bounces, complaints and
// auto-replies at the bounce domain. It accepts mail only for valid VERP
// addresses, so it is never a relay, and it never sends mail.
type Listener struct {
	cfg Config
	log *slog.Logger

	// ctx is the parent of every Handler call; Stop cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	started  bool
	stopped  bool
	running  *smtpserve.Running
	stopOnce sync.Once
}

// New returns a listener for cfg; zero fields take their defaults. Start
// reports an invalid config.
func New(cfg Config) *Listener {
	cfg = cfg.WithDefaults()
	return &Listener{cfg: cfg, log: cfg.Logger}
}

// Start listens on the configured address and serves in the background. It
// returns as soon as the listener is up. ctx bounds only the listen, and
// lends its values to the Handler calls; the listener runs until Stop.
func (l *Listener) Start(ctx context.Context) error {
	if err := l.cfg.validate(); err != nil {
		return fmt.Errorf("bounce listener config: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return errors.New("bounce listener: start after stop")
	}
	if l.started {
		return errors.New("bounce listener: already started")
	}
	var lc net.ListenConfig
	nl, err := lc.Listen(ctx, "tcp", l.cfg.Addr)
	if err != nil {
		return fmt.Errorf("bounce listener: listen on %s: %w", l.cfg.Addr, err)
	}
	ln := smtpserve.NewListener(nl, l.cfg.MaxConnections, refuseConn(l.cfg.Domain, l.cfg.WriteTimeout))

	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &session{l: l, remote: c.Conn().RemoteAddr().String()}, nil
	}))
	srv.Domain = l.cfg.Domain
	srv.MaxMessageBytes = l.cfg.MaxMessageBytes
	srv.MaxRecipients = l.cfg.MaxRecipients
	srv.ReadTimeout = l.cfg.ReadTimeout
	srv.WriteTimeout = l.cfg.WriteTimeout
	srv.TLSConfig = l.cfg.TLSConfig
	srv.ErrorLog = smtpserve.ErrorLog{Log: l.log, Prefix: "bounce listener smtp: "}

	l.ctx, l.cancel = context.WithCancel(context.WithoutCancel(ctx))
	l.started = true
	l.running = smtpserve.Serve(srv, ln, l.log, "bounce listener")
	l.log.Info("bounce listener listening", "addr", ln.Addr().String(), "domain", l.cfg.VERP.Domain())
	return nil
}

// Addr returns the address the listener listens on, as "host:port", or ""
// before Start.
func (l *Listener) Addr() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.running == nil {
		return ""
	}
	return l.running.Addr()
}

// Stop closes the listener and every connection, cancels the Handler calls
// in progress (their senders get no reply and retry), and returns once all
// of the listener's goroutines are done. It may be called more than once,
// and before Start.
func (l *Listener) Stop() {
	l.stopOnce.Do(func() {
		l.mu.Lock()
		l.stopped = true
		running, cancel := l.running, l.cancel
		l.mu.Unlock()
		if running == nil {
			return
		}
		running.Stop(cancel)
	})
}

// refuseConn answers a connection over the limit with 421, which RFC 5321
// section 3.1 allows in place of the greeting; the listener closes it.
func refuseConn(domain string, writeTimeout time.Duration) func(net.Conn) {
	return func(c net.Conn) {
		_ = c.SetWriteDeadline(time.Now().Add(min(writeTimeout, 10*time.Second)))
		_, _ = fmt.Fprintf(c, "421 4.7.0 %s too many connections, try again later\r\n", domain)
	}
}
