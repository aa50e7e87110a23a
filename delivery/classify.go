package delivery

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"strconv"
	"strings"

	"github.com/emersion/go-smtp"
)

// SMTPError is the one error type of delivery: every failure that decides a
// recipient's outcome (a server reply, a DNS answer, a network error) is
// turned into it by asSMTPError, so the outcome code reads a Code and an
// EnhancedCode instead of inspecting library error types.
//
// Failures that are not server replies carry a code chosen here: 4yz for
// conditions that may clear up (timeouts, refused connections, SERVFAIL), 5yz
// for the ones that will not (NXDOMAIN, null MX). The enhanced codes come from
// RFC 3463 and RFC 7505.
type SMTPError struct {
	// Code is the reply code (RFC 5321 section 4.2.3), or the one chosen for
	// a failure that was not a reply.
	Code int
	// EnhancedCode is the RFC 3463 status code such as "5.1.1", or "" when
	// the server sent none.
	EnhancedCode string
	// Message is the reply text (or a description of the failure).
	Message string
	// Err is the underlying cause; nil for a server reply.
	Err error
	// Greeting marks a reply received while the session was being opened:
	// to the greeting, to EHLO or HELO, or to STARTTLS and the EHLO after
	// it. Such a reply speaks for one host, not for the recipients, so it
	// is temporary whatever its code: the next host is tried, and when none
	// is left the recipients are deferred (Postfix's smtp_skip_5xx_greeting).
	// Only replies to MAIL, RCPT and DATA, and the DNS answers NXDOMAIN and
	// null MX, bounce mail.
	Greeting bool
	// Remote reports that Code, EnhancedCode and Message are the remote
	// server's reply. Everything else (DNS answers, network failures,
	// timeouts, refusals decided here such as a message over the server's
	// SIZE) is a reply made up locally, and is recorded as such so that
	// nobody mistakes it for the server's words.
	Remote bool
	// Ambiguous marks a failure after the end of the data was sent and
	// before the reply to it came: the server may have taken the message
	// (RFC 1047), so a retry may deliver it twice. It is temporary.
	Ambiguous bool
}

// Error formats the error like an SMTP reply followed by its cause.
func (e *SMTPError) Error() string {
	var b strings.Builder
	b.WriteString(strconv.Itoa(e.Code))
	if e.EnhancedCode != "" {
		b.WriteByte(' ')
		b.WriteString(e.EnhancedCode)
	}
	if e.Message != "" {
		b.WriteByte(' ')
		b.WriteString(e.Message)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the underlying cause.
func (e *SMTPError) Unwrap() error { return e.Err }

// Temporary reports whether a later attempt may succeed. Only 5yz replies are
// permanent (RFC 5321 section 4.2.1), and of those only the ones that are not
// about opening the session (see Greeting); anything else, including errors
// whose nature is unknown, is retried.
func (e *SMTPError) Temporary() bool { return e.Code/100 != 5 || e.Greeting }

// Codes chosen for failures that are not replies from the remote server.
const (
	codeTempFailure   = 451 // RFC 5321 4.2.3: local error in processing
	codePermFailure   = 550
	codeTooBig        = 552 // RFC 1870 section 6.1: message size exceeds the fixed maximum
	codeTransactionNo = 554 // RFC 5321 4.2.3: transaction failed
	codeNullMX        = 556 // RFC 7505 section 4: domain does not accept mail
)

// ambiguousError marks cause, a failure to get the reply to the end of the
// data, as an outcome nobody knows (see SMTPError.Ambiguous). The code is
// made up here: the server never answered.
func ambiguousError(cause error) *SMTPError {
	what := "connection lost after end of data"
	switch {
	case errors.Is(cause, context.DeadlineExceeded) || errors.Is(cause, os.ErrDeadlineExceeded):
		what = "timed out waiting for the reply to end of data"
	case errors.Is(cause, context.Canceled):
		what = "delivery interrupted after end of data"
	}
	return &SMTPError{
		Code:         codeTempFailure,
		EnhancedCode: "4.4.2", // RFC 3463 X.4.2: bad connection
		Message:      what + "; the receiver may have the message",
		Err:          cause,
		Ambiguous:    true,
	}
}

// asSMTPError is the boundary where go-smtp, net, TLS and DNS errors become
// an *SMTPError. It returns nil for nil.
func asSMTPError(err error) *SMTPError {
	if err == nil {
		return nil
	}
	if se, ok := errors.AsType[*SMTPError](err); ok {
		return se
	}
	if se, ok := errors.AsType[*smtp.SMTPError](err); ok {
		return &SMTPError{
			Code:         se.Code,
			EnhancedCode: formatEnhancedCode(se.Code, se.EnhancedCode),
			Message:      se.Message,
			Remote:       true,
		}
	}
	if pe, ok := errors.AsType[*textproto.Error](err); ok {
		code, msg := splitEnhancedCode(pe.Msg)
		return &SMTPError{Code: pe.Code, EnhancedCode: code, Message: msg, Remote: true}
	}
	if de, ok := errors.AsType[*dnsError](err); ok {
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.3", Message: "DNS lookup failed", Err: de}
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var certInvalid x509.CertificateInvalidError
	if errors.As(err, &certErr) || errors.As(err, &unknownAuth) || errors.As(err, &hostErr) || errors.As(err, &certInvalid) {
		// RFC 3463 X.7.5: cryptographic failure.
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.7.5", Message: "TLS certificate verification failed", Err: err}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.2", Message: "timeout", Err: err}
	}
	if errors.Is(err, context.Canceled) {
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.2", Message: "delivery interrupted", Err: err}
	}
	if oe, ok := errors.AsType[*net.OpError](err); ok {
		if oe.Timeout() {
			return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.2", Message: "timeout", Err: err}
		}
		if oe.Op == "dial" {
			// RFC 3463 X.4.1: no answer from host.
			return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.1", Message: "connection failed", Err: err}
		}
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.2", Message: "connection lost", Err: err}
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.2", Message: "timeout", Err: err}
	}
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.4.2", Message: "connection lost", Err: err}
	}
	if _, ok := errors.AsType[*errTLSHandshake](err); ok {
		return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.7.5", Message: "TLS handshake failed", Err: err}
	}
	// Unknown errors are retried: bouncing mail over an error we do not
	// understand loses it for good, while a retry costs a little time.
	return &SMTPError{Code: codeTempFailure, EnhancedCode: "4.3.0", Message: "delivery error", Err: err}
}

// asGreetingError converts an error from opening a session with a host
// (connect, greeting, EHLO/HELO, STARTTLS): a server reply among them is
// marked Greeting, so that it can never bounce mail.
func asGreetingError(err error) *SMTPError {
	se := asSMTPError(err)
	if se == nil || se.Greeting || !isReply(err) {
		return se
	}
	marked := *se
	marked.Greeting = true
	return &marked
}

// formatEnhancedCode renders go-smtp's enhanced code, "" when the server sent
// none. go-smtp leaves the zero value when the reply had no enhanced code.
func formatEnhancedCode(code int, ec smtp.EnhancedCode) string {
	if ec == smtp.EnhancedCodeNotSet || ec == smtp.NoEnhancedCode {
		return ""
	}
	// RFC 3463 section 2: the class digit matches the reply's class.
	if ec[0] != code/100 {
		return ""
	}
	return fmt.Sprintf("%d.%d.%d", ec[0], ec[1], ec[2])
}

// splitEnhancedCode splits "2.0.0 Ok: queued" into "2.0.0" and the text
// (RFC 2034 section 4); text without an enhanced code is returned unchanged.
func splitEnhancedCode(text string) (code, rest string) {
	first, after, found := strings.Cut(text, " ")
	if !found {
		first, after = text, ""
	}
	if !isEnhancedCode(first) {
		return "", text
	}
	return first, after
}

func isEnhancedCode(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return false
	}
	for i, p := range parts {
		if p == "" || len(p) > 3 {
			return false
		}
		for _, c := range p {
			if c < '0' || c > '9' {
				return false
			}
		}
		if i == 0 && p != "2" && p != "4" && p != "5" {
			return false
		}
	}
	return true
}

// brokenConnection reports whether the error leaves the SMTP connection
// unusable for another transaction: anything that is not a reply, and 421,
// which announces that the server is closing the channel (RFC 5321 3.8).
func brokenConnection(err error) bool {
	if err == nil {
		return false
	}
	if se, ok := errors.AsType[*smtp.SMTPError](err); ok {
		return se.Code == 421
	}
	if pe, ok := errors.AsType[*textproto.Error](err); ok {
		return pe.Code == 421
	}
	return true
}
