package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// smtpSender submits messages over SMTP to a relay, such as a local
// Postfix, so that the relay is measured with the same harness as
// Posthaste. A message counts as accepted when the relay answers 250 to
// the end of its data, which Postfix does only once the queue file is on
// disk.
//
// It keeps up to conns connections open and reuses them, one transaction
// at a time each, as a submission client with a connection pool does; a
// connection that failed is closed and replaced by a new one on demand.
type smtpSender struct {
	addr    string
	timeout time.Duration
	from    string
	body    []byte // the message body, CRLF line ends, ending in CRLF

	idle  chan *smtpConn // connections ready for a transaction
	slots chan struct{}  // one per open connection, idle or busy
}

// smtpHelloName is what the load generator says in EHLO.
const smtpHelloName = "client.bench.test"

func newSMTPSender(addr string, conns int, timeout time.Duration, tmpl messageTemplate) *smtpSender {
	body := strings.ReplaceAll(tmpl.text, "\n", "\r\n")
	if !strings.HasSuffix(body, "\r\n") {
		body += "\r\n"
	}
	return &smtpSender{
		addr:    addr,
		timeout: timeout,
		from:    tmpl.from,
		body:    []byte(body),
		idle:    make(chan *smtpConn, conns),
		slots:   make(chan struct{}, conns),
	}
}

// smtpConn is one open session with the relay.
type smtpConn struct {
	conn   net.Conn
	client *smtp.Client
}

// check opens every connection the run will use, so that the first
// transactions do not pay for the connection and its greeting, and so that
// an address where no relay answers stops the run before it sends
// anything.
func (s *smtpSender) check(ctx context.Context) error {
	for range cap(s.slots) {
		s.slots <- struct{}{}
		c, err := s.dial(ctx)
		if err != nil {
			<-s.slots
			return fmt.Errorf("check smtp relay at %s: %w", s.addr, err)
		}
		s.idle <- c
	}
	return nil
}

// dial opens a connection and says EHLO.
func (s *smtpSender) dial(ctx context.Context) (*smtpConn, error) {
	d := net.Dialer{Timeout: s.timeout}
	conn, err := d.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return nil, err
	}
	c := &smtpConn{conn: conn, client: smtp.NewClient(conn)}
	c.client.CommandTimeout = s.timeout
	c.client.SubmissionTimeout = s.timeout
	if err := c.client.Hello(smtpHelloName); err != nil {
		_ = c.client.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	return c, nil
}

// take returns an idle connection, or a new one while fewer than conns are
// open, else waits for one to come back.
func (s *smtpSender) take(ctx context.Context) (*smtpConn, error) {
	select {
	case c := <-s.idle:
		return c, nil
	default:
	}
	select {
	case c := <-s.idle:
		return c, nil
	case s.slots <- struct{}{}:
		c, err := s.dial(ctx)
		if err != nil {
			<-s.slots
			return nil, fmt.Errorf("connect to %s: %w", s.addr, err)
		}
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// drop closes a connection that is no longer usable and frees its slot.
func (s *smtpSender) drop(c *smtpConn) {
	_ = c.client.Close()
	<-s.slots
}

func (s *smtpSender) send(ctx context.Context, m outMessage) error {
	c, err := s.take(ctx)
	if err != nil {
		return fmt.Errorf("send message %s: %w", m.id, err)
	}
	// go-smtp takes no context: closing the connection is what ends a
	// transaction that outlives the call's deadline or the run.
	stop := context.AfterFunc(ctx, func() { _ = c.conn.Close() })
	err = c.transaction(s.from, m.to, s.message(m, time.Now()))
	if !stop() {
		if err != nil {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		s.drop(c)
		return wrapSMTP(m.id, err)
	}
	var se *smtp.SMTPError
	switch {
	case err == nil:
		// The reply to the dot ends the transaction (RFC 5321 section
		// 4.1.1.4), so the next MAIL needs no RSET first; go-smtp would
		// also send a new EHLO after one, two round trips per message that
		// the relay would be charged for.
		s.idle <- c
	case errors.As(err, &se):
		// A refusal leaves the session usable once the transaction is
		// reset.
		if c.client.Reset() == nil && c.client.Hello(smtpHelloName) == nil {
			s.idle <- c
		} else {
			s.drop(c)
		}
	default:
		s.drop(c)
	}
	return wrapSMTP(m.id, err)
}

// wrapSMTP gives a failed transaction its kind: "smtp_<code>" for a reply
// of the relay, else what errorKind makes of a network error.
func wrapSMTP(id string, err error) error {
	if err == nil {
		return nil
	}
	err = fmt.Errorf("send message %s: %w", id, err)
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return &sendError{kind: fmt.Sprintf("smtp_%d", se.Code), err: err}
	}
	return err
}

// transaction sends one message: MAIL, RCPT per recipient, DATA.
func (c *smtpConn) transaction(from string, to []string, msg []byte) error {
	if err := c.client.Mail(from, nil); err != nil {
		return fmt.Errorf("MAIL: %w", err)
	}
	for _, rcpt := range to {
		if err := c.client.Rcpt(rcpt, nil); err != nil {
			return fmt.Errorf("RCPT %s: %w", rcpt, err)
		}
	}
	w, err := c.client.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(msg); err != nil {
		_ = w.Close()
		return fmt.Errorf("write data: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("end of data: %w", err)
	}
	return nil
}

// message is m as an RFC 5322 message with the same header fields and body
// the API senders ask Posthaste for.
func (s *smtpSender) message(m outMessage, now time.Time) []byte {
	var b bytes.Buffer
	b.Grow(len(s.body) + 512)
	fmt.Fprintf(&b, "Date: %s\r\n", now.Format(time.RFC1123Z))
	fmt.Fprintf(&b, "Message-ID: <%s@%s>\r\n", m.id, domainOf(s.from))
	fmt.Fprintf(&b, "From: <%s>\r\n", s.from)
	fmt.Fprintf(&b, "To: <%s>\r\n", strings.Join(m.to, ">,\r\n <"))
	fmt.Fprintf(&b, "Subject: %s\r\n", m.subject)
	fmt.Fprintf(&b, "%s: %s\r\n", IDHeader, m.id)
	b.WriteString("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n")
	b.Write(s.body)
	return b.Bytes()
}

func domainOf(addr string) string {
	_, domain, _ := strings.Cut(addr, "@")
	return domain
}

// close ends every idle session with QUIT. The run calls it after the last
// call returned, when every connection still open is idle.
func (s *smtpSender) close() error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
drain:
	for {
		select {
		case c := <-s.idle:
			wg.Go(func() {
				c.client.CommandTimeout = 5 * time.Second
				if err := c.client.Quit(); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					_ = c.client.Close()
				}
			})
		default:
			break drain
		}
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close smtp sessions with %s: %w", s.addr, err)
	}
	return nil
}
