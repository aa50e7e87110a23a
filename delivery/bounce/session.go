package bounce

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/emersion/go-smtp"
)

// Replies of the listener. Refusals at RCPT are permanent: a token that
// does not verify never will.
var (
	// RFC 5321 section 3.6.2: a server that is not a relay refuses other
	// domains; RFC 3463 X.7.1: delivery not authorized.
	errRelay = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "relay not permitted"}
	// RFC 3463 X.1.1: bad destination mailbox address.
	errNoToken = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such bounce address"}
	// RFC 3463 X.3.0 in a 451: the sender keeps the message and retries.
	errHandler = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "report not recorded, try again later"}
)

// session is one SMTP connection's state. go-smtp calls its methods from
// the connection's goroutine only.
type session struct {
	l      *Listener
	remote string

	from   string
	tokens []Token
}

func (s *session) Reset() {
	s.from = ""
	s.tokens = nil
}

func (s *session) Logout() error { return nil }

// Mail accepts any reverse-path: bounces come with the null sender
// (RFC 5321 section 4.5.5, RFC 3464 section 2), complaints and
// auto-replies with whatever their sender uses.
func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	s.Reset()
	s.from = from
	return nil
}

// Rcpt accepts only valid VERP addresses at the bounce domain.
func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	tok, err := s.l.cfg.VERP.Parse(to)
	if err != nil {
		refusal := errNoToken
		if errors.Is(err, ErrWrongDomain) {
			refusal = errRelay
		}
		s.l.log.Info("bounce listener refused recipient",
			"from", s.from, "to", to, "code", refusal.Code, "err", err, "remote", s.remote)
		s.l.observe("refused")
		return refusal
	}
	s.tokens = append(s.tokens, tok)
	return nil
}

// Data reads the message, parses it and hands it to the Handler once per
// accepted recipient.
func (s *session) Data(r io.Reader) error {
	// go-smtp stops the read at MaxMessageBytes with ErrDataTooLarge (552
	// 5.3.4), which is passed on as is; the extra byte of the limit here
	// only guards against a reader that does not.
	raw, err := io.ReadAll(io.LimitReader(r, s.l.cfg.MaxMessageBytes+1))
	if err != nil {
		return err
	}
	if int64(len(raw)) > s.l.cfg.MaxMessageBytes {
		return smtp.ErrDataTooLarge
	}
	report := ParseReport(raw)
	for _, tok := range s.tokens {
		if err := s.handle(tok, report); err != nil {
			s.l.log.Error("bounce listener handler failed",
				"message", tok.Message, "kind", report.Kind, "err", err, "remote", s.remote)
			return errHandler
		}
	}
	s.l.observe(string(report.Kind))
	s.l.log.Info("bounce listener accepted report",
		"kind", report.Kind, "tokens", len(s.tokens), "size", len(raw), "from", s.from, "remote", s.remote)
	return nil
}

func (s *session) handle(tok Token, report Report) error {
	ctx, cancel := context.WithTimeout(s.l.ctx, s.l.cfg.HandlerTimeout)
	defer cancel()
	if err := s.l.cfg.Handler.HandleReport(ctx, tok, report); err != nil {
		return fmt.Errorf("handle %s report for message %s: %w", report.Kind, tok.Message, err)
	}
	return nil
}

// observe tells the configured observer about a report or a refusal.
func (l *Listener) observe(kind string) {
	if l.cfg.Observe != nil {
		l.cfg.Observe(kind)
	}
}
