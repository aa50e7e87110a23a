package service

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"mime"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// SendMessage validates req, builds its MIME form and stores it for
// delivery. Nothing is stored when any check fails; every failed check is
// reported as a field violation.
func (s *Server) SendMessage(ctx context.Context, req *posthastev1.SendMessageRequest) (*posthastev1.SendMessageResponse, error) {
	resp, err := s.sendMessage(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) sendMessage(ctx context.Context, req *posthastev1.SendMessageRequest) (*posthastev1.SendMessageResponse, error) {
	caller, err := requireScope(ctx, db.ScopeSend)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	p, err := s.prepareMessage(ctx, caller.projectID, req, idempotencyKeyFromMetadata(ctx), now)
	if err != nil {
		return nil, err
	}
	return s.commit(ctx, caller, req, p, now)
}

// prepareMessage checks req and builds and signs its message: everything
// SendMessage does before storing. mdKey is the idempotency key sent as
// metadata.
func (s *Server) prepareMessage(ctx context.Context, projectID uuid.UUID, req *posthastev1.SendMessageRequest, mdKey string, now time.Time) (pending, error) {
	// Refuse what cannot fit before decoding attachments or building: the
	// bodies and the base64 attachments only grow when encoded.
	if lower := minEncodedSize(req); lower > s.cfg.MaxMessageBytes {
		return pending{}, &messageTooLargeError{size: lower, limit: s.cfg.MaxMessageBytes, estimate: true}
	}
	p, spec, err := s.checkSendMessage(req, mdKey, now)
	if err != nil {
		return pending{}, err
	}
	built, err := message.Build(spec)
	if err != nil {
		// Build has the last word on what fits in a message (folding, the
		// finer grammar of content ids); its field errors are the caller's.
		var fe *message.FieldError
		if errors.As(err, &fe) {
			return pending{}, invalidField(fe.Field, fe.Reason)
		}
		return pending{}, fmt.Errorf("build message: %w", err)
	}
	// The From domain must be the project's, and the message is signed for
	// it: the last change to the bytes before they are stored.
	raw, err := s.signer.seal(ctx, projectID, "from", []string{p.fromDomain}, built.Raw)
	if err != nil {
		return pending{}, err
	}
	if size := int64(len(raw)); size > s.cfg.MaxMessageBytes {
		return pending{}, &messageTooLargeError{size: size, limit: s.cfg.MaxMessageBytes}
	}
	p.raw = raw
	p.messageIDHeader = built.MessageID
	return p, nil
}

// minEncodedSize is a lower bound of the encoded size of req's message
// (exact as a bound when attachments are base64 the way MIME writes it):
// bodies are at least as long once quoted-printable or base64 encoded, and
// attachments are re-encoded in base64 with line breaks.
func minEncodedSize(req *posthastev1.SendMessageRequest) int64 {
	n := int64(len(req.GetText()) + len(req.GetHtml()))
	for _, a := range req.GetAttachments() {
		n += int64(len(a.GetContent()))
	}
	return n
}

// checkSendMessage validates req and returns what to store (less the built
// message) and what to build.
func (s *Server) checkSendMessage(req *posthastev1.SendMessageRequest, mdKey string, now time.Time) (pending, message.Spec, error) {
	var (
		v    violations
		p    pending
		spec message.Spec
	)

	from, fromDomain, fromOK := v.address("from", req.GetFrom())
	spec.From = from
	if fromOK {
		p.envelopeFrom = from.Address
		p.senders = []senderAddr{{"from", from.Address}}
		p.fromHeader = displayAddress(from)
		p.fromDomain = fromDomain
		spec.MessageIDDomain = fromDomain
		if strings.HasPrefix(fromDomain, "[") {
			// An address literal cannot be a Message-ID's id-right
			// (RFC 5322 section 3.6.4 wants a domain); use our host name.
			spec.MessageIDDomain = s.cfg.Hostname
		}
	}

	if len(req.GetReplyTo()) > maxReplyTo {
		v.add("reply_to", "must have at most %d entries, got %d", maxReplyTo, len(req.GetReplyTo()))
	} else {
		for i, a := range req.GetReplyTo() {
			if addr, _, ok := v.address(fmt.Sprintf("reply_to[%d]", i), a); ok {
				spec.ReplyTo = append(spec.ReplyTo, addr)
			}
		}
	}

	var rcpts envelopeRecipients
	total := 0
	for _, list := range []struct {
		field string
		kind  string
		addrs []*posthastev1.Address
		into  *[]message.Address
	}{
		{"to", db.KindTo, req.GetTo(), &spec.To},
		{"cc", db.KindCc, req.GetCc(), &spec.Cc},
		{"bcc", db.KindBcc, req.GetBcc(), nil},
	} {
		total += len(list.addrs)
		if total > s.cfg.MaxRecipients {
			v.add(list.field, "too many recipients: to, cc and bcc may hold at most %d addresses together", s.cfg.MaxRecipients)
			break
		}
		for i, a := range list.addrs {
			field := fmt.Sprintf("%s[%d]", list.field, i)
			addr, domain, ok := v.address(field, a)
			if !ok {
				continue
			}
			if _, literal := message.AddressLiteralIP(domain); literal {
				v.add(field+".address", "address literals are not accepted as recipients; use a domain name")
				continue
			}
			rcpts.add(addr.Address, domain, list.kind)
			if list.into != nil {
				*list.into = append(*list.into, addr)
			}
		}
	}
	if total == 0 {
		v.add("to", "at least one recipient is required in to, cc or bcc")
	}
	p.recipients = rcpts.list

	if v.line("subject", req.GetSubject(), maxSubjectLen) {
		spec.Subject = req.GetSubject()
		p.subject = req.GetSubject()
	}
	textOK := v.text("text", req.GetText(), 0)
	htmlOK := v.text("html", req.GetHtml(), 0)
	if textOK && htmlOK && req.GetText() == "" && req.GetHtml() == "" {
		v.add("text", "text or html is required")
	}
	spec.Text, spec.HTML = req.GetText(), req.GetHtml()

	if len(req.GetAttachments()) > maxAttachments {
		v.add("attachments", "must have at most %d entries, got %d", maxAttachments, len(req.GetAttachments()))
	} else {
		for i, a := range req.GetAttachments() {
			if att, ok := checkAttachment(&v, fmt.Sprintf("attachments[%d]", i), a); ok {
				spec.Attachments = append(spec.Attachments, att)
			}
		}
	}

	if len(req.GetHeaders()) > maxHeaders {
		v.add("headers", "must have at most %d entries, got %d", maxHeaders, len(req.GetHeaders()))
	} else {
		for i, h := range req.GetHeaders() {
			if hdr, ok := checkHeader(&v, fmt.Sprintf("headers[%d]", i), h); ok {
				spec.Headers = append(spec.Headers, hdr)
			}
		}
	}

	v.tags(req.GetTags())
	p.tags = req.GetTags()
	v.metadata(req.GetMetadata())
	p.metadata = req.GetMetadata()
	p.sendAt = v.sendAt(req.GetSendAt(), now)
	p.idempotencyKey = v.idempotencyKey(req.GetIdempotencyKey(), mdKey)

	// The Date header is when the message enters the mail system (RFC 5322
	// section 3.6.1), which for a scheduled message is its send time.
	spec.Date = now
	if p.sendAt.After(now) {
		spec.Date = p.sendAt
	}
	return p, spec, v.err()
}

func checkAttachment(v *violations, field string, a *posthastev1.Attachment) (message.Attachment, bool) {
	att := message.Attachment{
		Filename:    a.GetFilename(),
		ContentType: a.GetContentType(),
		ContentID:   a.GetContentId(),
	}
	ok := v.line(field+".filename", att.Filename, maxFilenameLen)
	if att.ContentType == "" {
		att.ContentType = "application/octet-stream"
	} else if v.line(field+".content_type", att.ContentType, 0) {
		mt, params, err := mime.ParseMediaType(att.ContentType)
		top, _, _ := strings.Cut(mt, "/")
		cs, hasCharset := params["charset"]
		switch {
		case len(att.ContentType) > maxContentTypeLen:
			v.add(field+".content_type", "must be at most %d bytes", maxContentTypeLen)
			ok = false
		case err != nil || !strings.Contains(mt, "/"):
			v.add(field+".content_type", "is not a valid MIME type (RFC 2045 section 5.1), e.g. application/pdf")
			ok = false
		case top == "multipart" || top == "message":
			v.add(field+".content_type", "%s parts cannot be attached", top)
			ok = false
		case hasCharset && !strings.EqualFold(cs, "utf-8") && !strings.EqualFold(cs, "us-ascii"):
			v.add(field+".content_type", "charset %q is not supported; use utf-8 or us-ascii", cs)
			ok = false
		}
	} else {
		ok = false
	}
	if att.ContentID != "" {
		if !v.line(field+".content_id", att.ContentID, 0) {
			ok = false
		} else if !contentID(att.ContentID) {
			v.add(field+".content_id", "must be at most %d printable ASCII characters without spaces, optionally in angle brackets", maxContentIDLen)
			ok = false
		}
	}
	content, err := base64.StdEncoding.DecodeString(a.GetContent())
	switch {
	case err != nil:
		v.add(field+".content", "is not valid standard base64: %v", err)
		ok = false
	case len(content) == 0:
		v.add(field+".content", "must not be empty")
		ok = false
	}
	att.Content = content
	return att, ok
}

func checkHeader(v *violations, field string, h *posthastev1.Header) (message.Header, bool) {
	name, value := h.GetName(), h.GetValue()
	ok := true
	switch {
	case name == "":
		v.add(field+".name", "is required")
		ok = false
	case !headerFieldName(name):
		v.add(field+".name", "must be printable ASCII without spaces or colons (RFC 5322 section 2.2)")
		ok = false
	case len(name) > maxHeaderNameLen:
		v.add(field+".name", "must be at most %d characters", maxHeaderNameLen)
		ok = false
	case message.IsReservedHeader(name):
		v.add(field+".name", "%s is set by the service and cannot be given", name)
		ok = false
	}
	if !v.line(field+".value", value, 0) {
		ok = false
	} else if len(value) > maxHeaderValueLen {
		v.add(field+".value", "must be at most %d bytes", maxHeaderValueLen)
		ok = false
	}
	return message.Header{Name: name, Value: value}, ok
}

// displayAddress renders a mailbox for the API's "from" field: readable
// (display names are not RFC 2047 encoded) yet unambiguous, since a name that
// is not a plain phrase is quoted (RFC 5322 section 3.4; UTF-8 allowed per
// RFC 6532).
func displayAddress(a message.Address) string {
	if a.Name == "" {
		return a.Address
	}
	name := a.Name
	if strings.ContainsAny(name, "()<>[]:;@\\,.\"") {
		name = `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(name) + `"`
	}
	return name + " <" + a.Address + ">"
}

// pending is a validated message on its way into the database.
type pending struct {
	messageIDHeader, envelopeFrom, fromHeader, subject string
	fromDomain                                         string
	raw                                                []byte
	tags                                               []string
	metadata                                           map[string]string
	sendAt                                             time.Time
	recipients                                         []recipientEntry
	idempotencyKey                                     string
	// senders are the addresses whose domains a key restricted to sender
	// domains must allow, with the field each came from.
	senders []senderAddr
}

// senderAddr is an address a message is sent from, and the request field
// that gave it.
type senderAddr struct{ field, addr string }

// checkSenders refuses p when the caller's key may not send from one of
// its sender addresses.
func checkSenders(caller principal, p pending) error {
	for _, a := range p.senders {
		if a.addr == "" {
			continue
		}
		if err := checkSender(caller, a.field, a.addr); err != nil {
			return err
		}
	}
	return nil
}

// commit stores p through the group commit and answers with its receipt
// once it is committed, or with the receipt of the first call when the
// idempotency key replays it.
//
// The sender restriction of the caller's key and its project's recipients
// per day are checked first; nothing is stored when either refuses.
func (s *Server) commit(ctx context.Context, caller principal, req idempotentRequest, p pending, now time.Time) (*posthastev1.SendMessageResponse, error) {
	if err := checkSenders(caller, p); err != nil {
		return nil, err
	}
	nm, resp, err := s.newMessage(caller, req, p, now)
	if err != nil {
		return nil, err
	}
	refund, err := s.reserveRecipients(ctx, caller, len(nm.Recipients), now)
	if err != nil {
		return nil, err
	}
	out, err := s.committer.Insert(ctx, []db.NewMessage{nm})
	if err != nil {
		refund(len(nm.Recipients))
		return nil, fmt.Errorf("insert message: %w", err)
	}
	if err := out[0].Err; err != nil {
		refund(len(nm.Recipients))
		return nil, err
	}
	if out[0].Result.Replayed {
		// A replay stores nothing; the first call counted.
		refund(len(nm.Recipients))
		return replayedResponse(out[0].Result.Response)
	}
	applySuppressed(resp, out[0].Result.Suppressed)
	s.countSuppressed(out[0].Result.Suppressed)
	s.onCommit()
	return resp, nil
}

// newMessage turns p into the row to store and the receipt to answer once
// it is stored.
func (s *Server) newMessage(caller principal, req idempotentRequest, p pending, now time.Time) (db.NewMessage, *posthastev1.SendMessageResponse, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return db.NewMessage{}, nil, fmt.Errorf("new message id: %w", err)
	}
	status := db.StatusQueued
	if p.sendAt.After(now) {
		status = db.StatusScheduled
	}
	resp := &posthastev1.SendMessageResponse{
		Id:              id.String(),
		MessageIdHeader: p.messageIDHeader,
		Recipients:      make([]*posthastev1.RecipientSummary, len(p.recipients)),
	}
	nm := db.NewMessage{
		ID:              id,
		ProjectID:       caller.projectID,
		APIKeyID:        caller.keyID,
		MessageIDHeader: p.messageIDHeader,
		EnvelopeFrom:    p.envelopeFrom,
		FromHeader:      p.fromHeader,
		Subject:         p.subject,
		Raw:             p.raw,
		Tags:            p.tags,
		Metadata:        p.metadata,
		SendAt:          p.sendAt,
		// The receipt's statuses were decided by now; the stored ones must
		// match them even if the database's clock differs a little.
		Now:        now,
		Recipients: make([]db.NewRecipient, len(p.recipients)),
	}
	// One allocation for all the summaries rather than one each.
	summaries := make([]posthastev1.RecipientSummary, len(p.recipients))
	for i, r := range p.recipients {
		rid, err := uuid.NewV7()
		if err != nil {
			return db.NewMessage{}, nil, fmt.Errorf("new recipient id: %w", err)
		}
		nm.Recipients[i] = db.NewRecipient{ID: rid, Address: r.address, Domain: r.domain, Kind: r.kind}
		sum := &summaries[i]
		sum.Id, sum.Address, sum.Status = rid.String(), r.address, status
		resp.Recipients[i] = sum
	}
	if p.idempotencyKey != "" {
		idem, err := s.idempotency(p.idempotencyKey, req, resp)
		if err != nil {
			return db.NewMessage{}, nil, err
		}
		nm.Idempotency = idem
	}
	return nm, resp, nil
}
