package testenv

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func dialClient(t *testing.T, s *SMTPServer) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	return c
}

func send(c *smtp.Client, from string, to []string, body string) error {
	if err := c.Mail(from, &smtp.MailOptions{Size: int64(len(body))}); err != nil {
		return err
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return err
		}
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write([]byte(body)); err != nil {
		return err
	}
	return w.Close()
}

func TestSMTPServerRecords(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t)
	if s.Host != "127.0.0.1" || s.Port == 0 || s.Addr != net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) {
		t.Fatalf("address %q host %q port %d", s.Addr, s.Host, s.Port)
	}
	c := dialClient(t, s)
	if ok, param := c.Extension("SIZE"); !ok || param == "" {
		t.Fatalf("SIZE not advertised (%v %q)", ok, param)
	}
	body := "Subject: hi\r\n\r\nhello\r\n"
	if err := send(c, "a@client.test", []string{"b@mx.test", "c@mx.test"}, body); err != nil {
		t.Fatal(err)
	}
	if err := send(c, "d@client.test", []string{"e@mx.test"}, body); err != nil {
		t.Fatal(err)
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}
	msgs := s.WaitMessages(t, 2, 5*time.Second)
	m := msgs[0]
	if m.From != "a@client.test" || !slices.Equal(m.To, []string{"b@mx.test", "c@mx.test"}) ||
		string(m.Data) != body || m.Size != len(body) || m.Helo != "client.test" || m.TLS {
		t.Fatalf("message %+v", m)
	}
	if msgs[1].From != "d@client.test" || !slices.Equal(msgs[1].To, []string{"e@mx.test"}) {
		t.Fatalf("second message %+v", msgs[1])
	}
	if s.Connections() != 1 || s.Commands("MAIL") != 2 || s.Commands("QUIT") != 1 || s.Commands("EHLO") != 1 {
		t.Fatalf("connections %d MAIL %d QUIT %d EHLO %d", s.Connections(), s.Commands("MAIL"), s.Commands("QUIT"), s.Commands("EHLO"))
	}
}

func TestSMTPServerReplyRules(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t,
		WithRcptReply(func(to string) *smtp.SMTPError {
			if strings.HasPrefix(to, "unknown@") {
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
			}
			return nil
		}),
		WithDataReply(func(from string, to []string, data []byte) *smtp.SMTPError {
			if strings.Contains(string(data), "spam") {
				return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "rejected"}
			}
			return nil
		}))
	c := dialClient(t, s)
	err := send(c, "a@client.test", []string{"unknown@mx.test"}, "x\r\n")
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 550 || se.EnhancedCode != (smtp.EnhancedCode{5, 1, 1}) {
		t.Fatalf("RCPT: %v", err)
	}
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
	err = send(c, "a@client.test", []string{"ok@mx.test"}, "spam\r\n")
	if !errors.As(err, &se) || se.Code != 554 {
		t.Fatalf("DATA: %v", err)
	}
	if err := send(c, "a@client.test", []string{"ok@mx.test"}, "fine\r\n"); err != nil {
		t.Fatal(err)
	}
	if msgs := s.Messages(); len(msgs) != 1 || string(msgs[0].Data) != "fine\r\n" {
		t.Fatalf("messages %+v", msgs)
	}
}

func TestSMTPServerSTARTTLS(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t, WithTLS())
	c, err := smtp.DialStartTLS(s.Addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The handshake runs with the first command after STARTTLS.
	if err := c.Noop(); err != nil {
		t.Fatal(err)
	}
	state, ok := c.TLSConnectionState()
	if !ok || state.Version != tls.VersionTLS13 {
		t.Fatalf("TLS state %v %v", ok, state.Version)
	}
	if len(state.PeerCertificates) != 1 || state.PeerCertificates[0].VerifyHostname("127.0.0.1") != nil {
		t.Fatal("certificate does not name 127.0.0.1")
	}
	if err := send(c, "a@client.test", []string{"b@mx.test"}, "x\r\n"); err != nil {
		t.Fatal(err)
	}
	if msgs := s.Messages(); len(msgs) != 1 || !msgs[0].TLS {
		t.Fatalf("messages %+v", msgs)
	}

	plain := dialClient(t, StartSMTP(t))
	if ok, _ := plain.Extension("STARTTLS"); ok {
		t.Fatal("STARTTLS offered without WithTLS")
	}
}

func TestSMTPServerBrokenTLS(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t, WithBrokenTLS())
	c, err := smtp.DialStartTLS(s.Addr, &tls.Config{InsecureSkipVerify: true})
	if err == nil {
		defer c.Close()
		err = c.Noop() // the handshake runs with the first command
	}
	if err == nil {
		t.Fatal("handshake succeeded")
	}
}

func TestSMTPServerGreeting(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t, WithGreeting(&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "busy"}))
	c, err := smtp.Dial(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Hello("client.test")
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 421 || se.Message != "busy" {
		t.Fatalf("greeting: %v", err)
	}
	if s.Connections() != 1 {
		t.Fatalf("connections %d", s.Connections())
	}
}

func TestSMTPServerGreetingWithoutEnhancedCode(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t, WithGreeting(&smtp.SMTPError{Code: 554, Message: "go away"}))
	c, err := smtp.Dial(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Hello("client.test")
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 554 || se.Message != "go away" {
		t.Fatalf("greeting: %v", err)
	}
}

func TestSMTPServerHeloReply(t *testing.T) {
	t.Parallel()
	for _, code := range []int{554, 502} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			t.Parallel()
			reply := &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "not you"}
			s := StartSMTP(t, WithHeloReply(reply))
			c, err := smtp.Dial(s.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// go-smtp's client falls back to HELO after a 502 to EHLO;
			// that is refused the same way.
			err = c.Hello("client.test")
			var se *smtp.SMTPError
			if !errors.As(err, &se) || se.Code != code || se.Message != "not you" {
				t.Fatalf("EHLO: %v", err)
			}
			if code == 502 && s.Commands("HELO") != 1 {
				t.Fatalf("%d HELO after the 502, want 1", s.Commands("HELO"))
			}
		})
	}
}

func TestSMTPServerDropConnections(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t)
	c := dialClient(t, s)
	s.DropConnections()
	if err := c.Noop(); err == nil {
		t.Fatal("connection still usable after DropConnections")
	}
}

func TestSMTPServerWaitMessagesFails(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t)
	ft := &fakeT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.WaitMessages(ft, 1, 50*time.Millisecond)
	}()
	<-done
	if !ft.failed {
		t.Fatal("WaitMessages returned without a message and without failing")
	}
}

// fakeT records Fatalf instead of stopping the test.
type fakeT struct {
	testing.TB
	failed bool
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(string, ...any) {
	f.failed = true
}

func TestSMTPServerStopsAtCleanup(t *testing.T) {
	var addr string
	t.Run("server", func(t *testing.T) {
		s := StartSMTP(t, WithStalledData())
		addr = s.Addr
		c := dialClient(t, s)
		if err := c.Mail("a@client.test", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Rcpt("b@mx.test", nil); err != nil {
			t.Fatal(err)
		}
		w, err := c.Data()
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte("stalled\r\n"))
		// Cleanup must not hang on the stalled session.
	})
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("SMTP server still listening after cleanup")
	}
}

func TestSMTPServerRcptLimit(t *testing.T) {
	t.Parallel()
	full := &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "too many recipients"}
	s := StartSMTP(t, WithRcptLimit(2, full))
	c := dialClient(t, s)
	if err := c.Mail("a@client.test", nil); err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{0, 0, 452, 452} {
		err := c.Rcpt(fmt.Sprintf("r%d@mx.test", i), nil)
		var se *smtp.SMTPError
		switch {
		case want == 0 && err != nil:
			t.Fatalf("RCPT %d: %v", i, err)
		case want != 0 && (!errors.As(err, &se) || se.Code != want):
			t.Fatalf("RCPT %d: %v, want %d", i, err, want)
		}
	}
	// The limit is per transaction: after RSET the count starts again.
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
	if err := send(c, "a@client.test", []string{"x@mx.test", "y@mx.test"}, "hi\r\n"); err != nil {
		t.Fatal(err)
	}
	if msgs := s.Messages(); len(msgs) != 1 || len(msgs[0].To) != 2 {
		t.Fatalf("messages %+v", msgs)
	}
}

func TestSMTPServerNoReplyAfterData(t *testing.T) {
	t.Parallel()
	s := StartSMTP(t, WithNoReplyAfterData())
	c := dialClient(t, s)
	c.SubmissionTimeout = 300 * time.Millisecond
	start := time.Now()
	err := send(c, "a@client.test", []string{"b@mx.test"}, "hello\r\n")
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("end of data: %v, want a timeout", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("took %s", took)
	}
	if len(s.Messages()) != 0 {
		t.Fatalf("recorded %+v", s.Messages())
	}
}
