package delivery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"syscall"
	"testing"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
)

func TestAsSMTPError(t *testing.T) {
	t.Parallel()
	own := &SMTPError{Code: 556, EnhancedCode: "5.1.10", Message: "null MX"}
	tests := []struct {
		name      string
		err       error
		code      int
		enhanced  string
		message   string
		temporary bool
	}{
		{"go-smtp permanent", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"},
			550, "5.1.1", "no such user", false},
		{"go-smtp temporary", &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "mailbox full"},
			452, "4.2.2", "mailbox full", true},
		{"go-smtp without enhanced code", &smtp.SMTPError{Code: 554, Message: "go away"},
			554, "", "go away", false},
		{"wrapped go-smtp", fmt.Errorf("greeting: %w", &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "busy"}),
			421, "4.3.2", "busy", true},
		{"textproto", &textproto.Error{Code: 454, Msg: "4.7.0 TLS not available"}, 454, "4.7.0", "TLS not available", true},
		{"already converted", fmt.Errorf("x: %w", own), 556, "5.1.10", "null MX", false},
		{"dial refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, 451, "4.4.1", "connection failed", true},
		{"read reset", &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}, 451, "4.4.2", "connection lost", true},
		{"deadline", &net.OpError{Op: "write", Net: "tcp", Err: os.ErrDeadlineExceeded}, 451, "4.4.2", "timeout", true},
		{"context deadline", context.DeadlineExceeded, 451, "4.4.2", "timeout", true},
		{"context canceled", context.Canceled, 451, "4.4.2", "delivery interrupted", true},
		{"closed", net.ErrClosed, 451, "4.4.2", "connection lost", true},
		{"dns", &dnsError{Name: "x.test", Type: "MX", Rcode: dns.RcodeServerFailure}, 451, "4.4.3", "DNS lookup failed", true},
		{"TLS handshake", &errTLSHandshake{err: errors.New("tls: protocol version not supported")}, 451, "4.7.5", "TLS handshake failed", true},
		{"TLS handshake timeout", &errTLSHandshake{err: context.DeadlineExceeded}, 451, "4.4.2", "timeout", true},
		{"unknown", errors.New("something odd"), 451, "4.3.0", "delivery error", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := asSMTPError(tt.err)
			if got.Code != tt.code || got.EnhancedCode != tt.enhanced || got.Message != tt.message || got.Temporary() != tt.temporary {
				t.Fatalf("got %d %q %q temporary=%v, want %d %q %q temporary=%v",
					got.Code, got.EnhancedCode, got.Message, got.Temporary(), tt.code, tt.enhanced, tt.message, tt.temporary)
			}
		})
	}
	if asSMTPError(nil) != nil {
		t.Fatal("asSMTPError(nil) != nil")
	}
}

func TestSMTPErrorFormatAndUnwrap(t *testing.T) {
	t.Parallel()
	cause := syscall.ECONNREFUSED
	e := &SMTPError{Code: 451, EnhancedCode: "4.4.1", Message: "connection failed", Err: cause}
	if got, want := e.Error(), "451 4.4.1 connection failed: "+cause.Error(); got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(e, syscall.ECONNREFUSED) {
		t.Fatal("Unwrap does not reach the cause")
	}
	if got := (&SMTPError{Code: 550, Message: "no"}).Error(); got != "550 no" {
		t.Fatalf("Error() = %q", got)
	}
	if !(&SMTPError{}).Temporary() {
		t.Fatal("an error without a code must count as temporary")
	}
}

func TestAsGreetingError(t *testing.T) {
	t.Parallel()
	reply := &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "go away"}
	got := asGreetingError(fmt.Errorf("greeting from mx.test: %w", reply))
	if got.Code != 554 || got.EnhancedCode != "5.7.1" || !got.Greeting || !got.Temporary() {
		t.Fatalf("reply to the greeting: %+v temporary=%v, want a temporary 554 5.7.1", got, got.Temporary())
	}
	// A failure that is not a reply is classified as usual.
	refused := asGreetingError(&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
	if refused.Greeting || refused.EnhancedCode != "4.4.1" {
		t.Fatalf("dial error: %+v", refused)
	}
	if g := asGreetingError(&textproto.Error{Code: 550, Msg: "no"}); !g.Greeting || !g.Temporary() {
		t.Fatalf("textproto reply: %+v", g)
	}
	// An *SMTPError already made is copied, not changed.
	own := &SMTPError{Code: 550, Message: "no", Err: reply}
	if g := asGreetingError(own); g == own || !g.Greeting || own.Greeting || own.Temporary() {
		t.Fatalf("got %+v from %+v, want a marked copy", g, own)
	}
	if asGreetingError(nil) != nil {
		t.Fatal("asGreetingError(nil) != nil")
	}
}

func TestSplitEnhancedCode(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, code, rest string }{
		{"2.0.0 Ok: queued as 123", "2.0.0", "Ok: queued as 123"},
		{"2.6.0", "2.6.0", ""},
		{"Ok: queued", "", "Ok: queued"},
		{"1.2.3 not a class", "", "1.2.3 not a class"},
		{"2.0 short", "", "2.0 short"},
		{"", "", ""},
	}
	for _, tt := range tests {
		code, rest := splitEnhancedCode(tt.in)
		if code != tt.code || rest != tt.rest {
			t.Errorf("splitEnhancedCode(%q) = %q, %q; want %q, %q", tt.in, code, rest, tt.code, tt.rest)
		}
	}
}

func TestBrokenConnection(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{&smtp.SMTPError{Code: 550}, false},
		{&smtp.SMTPError{Code: 421}, true},
		{&textproto.Error{Code: 421}, true},
		{&textproto.Error{Code: 454}, false},
		{net.ErrClosed, true},
	}
	for _, tt := range tests {
		if got := brokenConnection(tt.err); got != tt.want {
			t.Errorf("brokenConnection(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
