package service

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// SendRawMessage stores a complete RFC 5322 message with an explicit
// envelope. The message is checked (From present, line lengths, CRLF line
// endings) and a Date (and Message-ID) added when missing; otherwise it is
// sent as given.
func (s *Server) SendRawMessage(ctx context.Context, req *posthastev1.SendRawMessageRequest) (*posthastev1.SendMessageResponse, error) {
	resp, err := s.sendRawMessage(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) sendRawMessage(ctx context.Context, req *posthastev1.SendRawMessageRequest) (*posthastev1.SendMessageResponse, error) {
	caller, err := requireScope(ctx, db.ScopeSend)
	if err != nil {
		return nil, err
	}
	raw, err := base64.StdEncoding.DecodeString(req.GetRaw())
	if err == nil && int64(len(raw)) > s.cfg.MaxMessageBytes {
		// Checking adds headers, never removes bytes: refuse before parsing.
		return nil, &messageTooLargeError{size: int64(len(raw)), limit: s.cfg.MaxMessageBytes, estimate: true}
	}
	now := time.Now()
	var (
		v           violations
		p           pending
		fromDomains []string
	)
	switch {
	case err != nil:
		v.add("raw", "is not valid standard base64: %v", err)
	case len(raw) == 0:
		v.add("raw", "is required")
	}

	envFrom, fromDomain, fromOK := v.mailbox("envelope_from", req.GetEnvelopeFrom())
	p.envelopeFrom = envFrom
	p.senders = []senderAddr{{"envelope_from", envFrom}}

	var rcpts envelopeRecipients
	switch n := len(req.GetRecipients()); {
	case n == 0:
		v.add("recipients", "at least one recipient is required")
	case n > s.cfg.MaxRecipients:
		v.add("recipients", "too many recipients: at most %d", s.cfg.MaxRecipients)
	default:
		for i, r := range req.GetRecipients() {
			if addr, domain, ok := v.recipient(fmt.Sprintf("recipients[%d]", i), r); ok {
				rcpts.add(addr, domain, db.KindEnvelope)
			}
		}
	}
	p.recipients = rcpts.list

	v.tags(req.GetTags())
	p.tags = req.GetTags()
	v.metadata(req.GetMetadata())
	p.metadata = req.GetMetadata()
	p.sendAt = v.sendAt(req.GetSendAt(), now)
	p.idempotencyKey = v.idempotencyKey(req.GetIdempotencyKey(), idempotencyKeyFromMetadata(ctx))

	// The raw message is only checked when the envelope is usable, since
	// the Message-ID domain comes from it; its problems are reported with
	// the others.
	if len(raw) > 0 && fromOK {
		idDomain := fromDomain
		if strings.HasPrefix(idDomain, "[") {
			idDomain = s.cfg.Hostname // see checkSendMessage
		}
		date := now
		if p.sendAt.After(now) {
			date = p.sendAt
		}
		out, info, err := message.CheckRaw(raw, date, idDomain)
		var fe *message.FieldError
		switch {
		case errors.As(err, &fe):
			v.add(fe.Field, "%s", fe.Reason)
		case err != nil:
			return nil, fmt.Errorf("check raw message: %w", err)
		default:
			p.raw = out
			p.messageIDHeader = info.MessageID
			for _, a := range info.FromAddresses {
				p.senders = append(p.senders, senderAddr{"raw", a})
			}
			p.fromHeader = summaryText(info.From)
			p.subject = summaryText(info.Subject)
			fromDomains = info.FromDomains
		}
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	// The From header's domains must be the project's; the message is
	// signed for the first.
	if p.raw, err = s.signer.seal(ctx, caller.projectID, "raw", fromDomains, p.raw); err != nil {
		return nil, err
	}
	if size := int64(len(p.raw)); size > s.cfg.MaxMessageBytes {
		return nil, &messageTooLargeError{size: size, limit: s.cfg.MaxMessageBytes}
	}
	return s.commit(ctx, caller, req, p, now)
}

// summaryText makes a header decoded for display fit to store and show as
// one line. RFC 2047 encoded words in a 7-bit header can still decode to
// anything: NUL and invalid UTF-8, which PostgreSQL text refuses, or CR and
// LF. Each such character becomes U+FFFD; the message itself is sent as
// the caller wrote it.
func summaryText(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	return strings.Map(func(r rune) rune {
		if r != '\t' && (r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0) {
			return '\uFFFD'
		}
		return r
	}, s)
}
