// Package smtpserve holds what Posthaste's SMTP servers (the sandbox MX and
// the bounce listener) share around go-smtp's server: a listener that
// remembers its connections, so that Stop can close them (go-smtp's
// Shutdown waits only for idle ones), and can cap how many are served at
// once; and an adapter of go-smtp's error log to slog.
package smtpserve

import (
	"fmt"
	"log/slog"
	"net"
	"sync"
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
