// Package smtpserve holds what Posthaste's SMTP servers (the sandbox MX and
// the bounce listener) share around go-smtp's server: a listener that
// remembers its connections, so that Stop can close them (go-smtp's
// Shutdown waits only for idle ones), and can cap how many are served at
// once; an adapter of go-smtp's error log to slog; and the running of a
// server on such a listener, with the order its stop must follow.
package smtpserve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/emersion/go-smtp"
)

// Listener wraps a net.Listener. Build it with NewListener.
type Listener struct {
	net.Listener
	max    int
	refuse func(net.Conn)

	mu      sync.Mutex
	conns   map[*trackedConn]struct{}
	closed  bool
	refuses sync.WaitGroup
}

// NewListener remembers the connections l accepts. With max above zero, a
// connection accepted while max are open is handed to refuse, on a
// goroutine of its own so that a slow client cannot hold up Accept, and
// closed after it; refuse may be nil.
func NewListener(l net.Listener, max int, refuse func(net.Conn)) *Listener {
	return &Listener{Listener: l, max: max, refuse: refuse, conns: make(map[*trackedConn]struct{})}
}

// Accept returns the next connection to serve.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			_ = c.Close()
			return nil, net.ErrClosed
		}
		if l.max > 0 && len(l.conns) >= l.max {
			l.refuses.Add(1)
			l.mu.Unlock()
			go func() {
				defer l.refuses.Done()
				defer c.Close()
				if l.refuse != nil {
					l.refuse(c)
				}
			}()
			continue
		}
		tc := &trackedConn{Conn: c, l: l}
		l.conns[tc] = struct{}{}
		l.mu.Unlock()
		return tc, nil
	}
}

// Close stops accepting; connections already accepted stay open.
func (l *Listener) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	return l.Listener.Close()
}

// CloseConns closes every connection accepted and still open.
func (l *Listener) CloseConns() {
	l.mu.Lock()
	conns := make([]*trackedConn, 0, len(l.conns))
	for c := range l.conns {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
}

// Wait waits for the refusals in progress.
func (l *Listener) Wait() { l.refuses.Wait() }

type trackedConn struct {
	net.Conn
	l    *Listener
	once sync.Once
	err  error
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
		c.err = c.Conn.Close()
	})
	return c.err
}

// ErrorLog adapts go-smtp's internal error reports to slog, at warn level,
// each message after Prefix.
type ErrorLog struct {
	Log    *slog.Logger
	Prefix string
}

// Printf logs a formatted report.
func (e ErrorLog) Printf(format string, v ...any) {
	e.Log.Warn(e.Prefix + fmt.Sprintf(format, v...))
}

// Println logs a report.
func (e ErrorLog) Println(v ...any) {
	e.Log.Warn(e.Prefix + fmt.Sprint(v...))
}

// Running is a go-smtp server serving on a Listener, in the background.
type Running struct {
	srv  *smtp.Server
	ln   *Listener
	done chan struct{}
}

// Serve runs srv on ln until Stop. An error that ends Serve other than the
// listener's closing is logged to log as "<what> stopped".
func Serve(srv *smtp.Server, ln *Listener, log *slog.Logger, what string) *Running {
	r := &Running{srv: srv, ln: ln, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, net.ErrClosed) {
			log.Error(what+" stopped", "err", err)
		}
	}()
	return r
}

// Addr is the address the server listens on, as "host:port".
func (r *Running) Addr() string { return r.ln.Addr().String() }

// Stop stops the server and returns once its goroutines are done: it
// closes the listener first, so that no connection is accepted after the
// open ones are closed; then calls interrupt, when not nil, to cut short
// the work of the sessions in progress; closes every connection; and waits
// for the sessions and for connections being refused.
func (r *Running) Stop(interrupt func()) {
	_ = r.ln.Close()
	<-r.done
	if interrupt != nil {
		interrupt()
	}
	r.ln.CloseConns()
	// Shutdown waits for the connection handlers; its error only repeats
	// that the listener is already closed.
	_ = r.srv.Shutdown(context.Background())
	r.ln.Wait()
}
