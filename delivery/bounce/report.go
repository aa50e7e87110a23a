package bounce

import (
	"bufio"
	"bytes"
	"io"
	"net/mail"
	"strings"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/textproto"
)

// Kind says what a received message is.
type Kind string

// The kinds of report.
const (
	// KindDSN is a delivery status notification (RFC 3464): a
	// multipart/report with a message/delivery-status part.
	KindDSN Kind = "dsn"
	// KindComplaint is an abuse feedback report (RFC 5965): a recipient
	// marked the message as spam at a mailbox provider.
	KindComplaint Kind = "complaint"
	// KindAutoReply is an automatic reply such as an out-of-office notice
	// (RFC 3834). It says nothing about delivery.
	KindAutoReply Kind = "auto_reply"
	// KindUnstructuredBounce is a bounce in plain text, from an MTA that
	// does not send RFC 3464 reports (qmail, Exim, old Sendmail). Its
	// status comes from the text when it can be found there.
	KindUnstructuredBounce Kind = "unstructured_bounce"
	// KindUnknown is anything else, including messages too broken to read.
	KindUnknown Kind = "unknown"
)

// Report is what ParseReport understood of one received message.
type Report struct {
	// Kind says what the message is.
	Kind Kind
	// Subject and From are the received message's own header fields,
	// decoded (RFC 2047).
	Subject string
	From    string

	// ReportingMTA is the per-message Reporting-MTA of a DSN (RFC 3464
	// section 2.2.2) or the Reporting-MTA of a feedback report, without
	// its type ("dns; mx.example.test" gives "mx.example.test").
	ReportingMTA string
	// ArrivalDate is the per-message Arrival-Date (RFC 3464 section
	// 2.2.5; RFC 5965 section 3.1 for feedback), zero when absent or
	// unreadable.
	ArrivalDate time.Time
	// OriginalEnvelopeID is the ENVID of the original transaction (RFC 3461
	// section 4.4), echoed by the reporting MTA.
	OriginalEnvelopeID string

	// OriginalMessageID is the Message-ID of the returned message or of its
	// returned header (the message/rfc822 or text/rfc822-headers part),
	// without angle brackets.
	OriginalMessageID string
	// OriginalMailFrom is the envelope sender of the original message: the
	// Original-Mail-From of a feedback report, or the Return-Path of the
	// returned header. It names the VERP token when the report itself was
	// sent to another address (feedback loops have one fixed address).
	OriginalMailFrom string

	// Recipients holds one entry per recipient the report speaks about: the
	// per-recipient fields of a DSN, the Original-Rcpt-To of a feedback
	// report, the addresses found in an unstructured bounce (one entry
	// with an empty FinalRecipient when the text names none).
	Recipients []RecipientReport

	// Feedback holds the fields of a feedback report; nil for other kinds.
	Feedback *Feedback
}

// RecipientReport is one recipient's part of a report.
type RecipientReport struct {
	// FinalRecipient is the address the reporting MTA tried (RFC 3464
	// section 2.3.2), without its address type.
	FinalRecipient string
	// OriginalRecipient is the address as the sender gave it (RFC 3464
	// section 2.3.1), when the report has it.
	OriginalRecipient string
	// Action is the lower-case action (RFC 3464 section 2.3.3): failed,
	// delayed, delivered, relayed or expanded. For an unstructured bounce
	// it is "failed" for a 5 status, "delayed" for a 4, else "".
	Action string
	// Status is the RFC 3463 enhanced status code such as "5.1.1", or "".
	Status string
	// ReplyCode is the SMTP reply code found in the diagnostic (RFC 5321
	// section 4.2), or 0.
	ReplyCode int
	// DiagnosticType is the Diagnostic-Code's type, usually "smtp".
	DiagnosticType string
	// Diagnostic is the Diagnostic-Code's text without its type (RFC 3464
	// section 2.3.6), unfolded; for an unstructured bounce, the text the
	// bounce gives for this recipient.
	Diagnostic string
	// RemoteMTA is the server that gave the diagnostic (RFC 3464 section
	// 2.3.5), without its type.
	RemoteMTA string
	// LastAttemptDate is when the reporting MTA last tried (RFC 3464
	// section 2.3.7), zero when absent.
	LastAttemptDate time.Time
}

// Feedback holds the fields of an RFC 5965 feedback report.
type Feedback struct {
	// Type is the lower-case Feedback-Type (RFC 5965 section 7.3): abuse,
	// fraud, virus, other, not-spam, ...
	Type string
	// UserAgent and Version identify the reporting software and the
	// format version (RFC 5965 section 3.1; Version is "1").
	UserAgent string
	Version   string
	// OriginalRcptTo lists the Original-Rcpt-To fields, the recipients
	// who complained (often redacted by the provider).
	OriginalRcptTo []string
	// SourceIP is the address the reported message came from.
	SourceIP string
	// ReportedDomain lists the Reported-Domain fields.
	ReportedDomain []string
}

// Limits on the work ParseReport does, so that a hostile message can
// neither exhaust memory beyond its own size nor recurse without end.
const (
	// maxDepth bounds the nesting of multiparts followed.
	maxDepth = 8
	// maxParts bounds the MIME parts looked at in one message.
	maxParts = 64
	// maxFieldBytes bounds the bytes read from a delivery-status or
	// feedback-report part, or from a returned header.
	maxFieldBytes = 64 << 10
	// maxTextBytes bounds the bytes of human-readable text kept for the
	// unstructured-bounce and auto-reply checks.
	maxTextBytes = 64 << 10
	// maxRecipients bounds the recipient entries of one report.
	maxRecipients = 100
	// maxDiagnostic bounds one diagnostic's length.
	maxDiagnostic = 2000
)

// ParseReport reads a received message and says what it is. It never fails:
// a message it cannot read, or reads only in part, is reported as far as it
// was understood, down to KindUnknown. The caller bounds raw's size (the
// listener's MaxMessageBytes); the work done is linear in it.
func ParseReport(raw []byte) Report {
	e, err := message.Read(bytes.NewReader(raw))
	if e == nil {
		_ = err // the header block itself is unreadable
		return Report{Kind: KindUnknown}
	}
	p := &parser{}
	p.header(e.Header)
	p.walk(e, 0)
	return p.finish()
}

// parser collects what the walk over the MIME tree finds.
type parser struct {
	rep   Report
	parts int

	topHeader   message.Header
	reportType  string // report-type of the top-level multipart/report
	status      []fieldBlock
	feedback    fieldBlock
	hasStatus   bool
	hasFeedback bool
	returned    bool
	text        strings.Builder
}

func (p *parser) header(h message.Header) {
	p.topHeader = h
	p.rep.Subject = headerText(h, "Subject")
	p.rep.From = headerText(h, "From")
	if t, params, err := h.ContentType(); err == nil && t == "multipart/report" {
		p.reportType = strings.ToLower(params["report-type"])
	}
}

// walk visits e and, for a multipart, its parts. It does not descend into a
// returned message (message/rfc822): that is the original mail, and a report
// quoted inside it is not this report.
func (p *parser) walk(e *message.Entity, depth int) {
	p.parts++
	t, _, err := e.Header.ContentType()
	if err != nil || t == "" {
		// RFC 2045 section 5.2: the default is text/plain.
		t = "text/plain"
	}
	switch {
	case strings.HasPrefix(t, "multipart/"):
		if depth >= maxDepth {
			return
		}
		mr := e.MultipartReader()
		if mr == nil {
			return
		}
		for p.parts < maxParts {
			part, err := mr.NextPart()
			if part == nil {
				// io.EOF or a broken multipart: keep what was read.
				_ = err
				return
			}
			p.walk(part, depth+1)
		}
	case t == "message/delivery-status", t == "message/global-delivery-status", t == "text/delivery-status":
		// RFC 6533 section 6.2 defines the global (UTF-8) variant; some
		// MTAs mislabel the part as text/.
		if p.hasStatus {
			return
		}
		p.hasStatus = true
		p.status = parseFieldBlocks(readBounded(e.Body, maxFieldBytes))
	case t == "message/feedback-report":
		if p.hasFeedback {
			return
		}
		p.hasFeedback = true
		blocks := parseFieldBlocks(readBounded(e.Body, maxFieldBytes))
		if len(blocks) > 0 {
			p.feedback = blocks[0]
		}
	case t == "message/rfc822", t == "message/global", t == "text/rfc822-headers", t == "message/rfc822-headers":
		if p.returned {
			return
		}
		p.returned = true
		p.returnedHeader(readBounded(e.Body, maxFieldBytes))
	case t == "text/plain" && p.text.Len() < maxTextBytes:
		b := readBounded(e.Body, maxTextBytes-p.text.Len())
		p.text.Write(b)
		p.text.WriteString("\n")
	}
}

// returnedHeader reads the header of the returned original message. The
// body may be cut off by the read bound; only the header matters.
func (p *parser) returnedHeader(b []byte) {
	h, err := textproto.ReadHeader(bufio.NewReader(io.MultiReader(bytes.NewReader(b), strings.NewReader("\r\n\r\n"))))
	if err != nil {
		return
	}
	mh := message.Header{Header: h}
	if id := strings.TrimSpace(mh.Get("Message-Id")); id != "" {
		p.rep.OriginalMessageID = strings.Trim(id, "<> \t")
	}
	if rp := strings.TrimSpace(mh.Get("Return-Path")); rp != "" && p.rep.OriginalMailFrom == "" {
		p.rep.OriginalMailFrom = strings.Trim(rp, "<> \t")
	}
}

func (p *parser) finish() Report {
	switch {
	case p.hasStatus && (p.reportType == "delivery-status" || p.reportType == "global-delivery-status" || !p.hasFeedback):
		p.rep.Kind = KindDSN
		p.dsn()
	case p.hasFeedback:
		p.rep.Kind = KindComplaint
		p.arf()
	case isBounceText(p.topHeader, p.text.String()):
		p.rep.Kind = KindUnstructuredBounce
		text := p.text.String()
		p.rep.Recipients = parseUnstructured(text)
		if _, copied := splitAtCopy(text); copied != "" && !p.returned {
			p.returnedHeader([]byte(copied))
		}
	case isAutoReply(p.topHeader):
		p.rep.Kind = KindAutoReply
	default:
		p.rep.Kind = KindUnknown
	}
	return p.rep
}

// dsn reads the delivery-status fields: one per-message block, then one
// block per recipient (RFC 3464 section 2.1).
func (p *parser) dsn() {
	if len(p.status) == 0 {
		return
	}
	msg := p.status[0]
	p.rep.ReportingMTA = mtaName(msg.get("Reporting-MTA"))
	p.rep.ArrivalDate = parseDate(msg.get("Arrival-Date"))
	p.rep.OriginalEnvelopeID = strings.TrimSpace(msg.get("Original-Envelope-Id"))
	for _, b := range p.status[1:] {
		if len(p.rep.Recipients) >= maxRecipients {
			break
		}
		r := RecipientReport{
			FinalRecipient:    address(typedValue(b.get("Final-Recipient"))),
			OriginalRecipient: address(typedValue(b.get("Original-Recipient"))),
			Action:            strings.ToLower(firstWord(b.get("Action"))),
			Status:            findStatus(b.get("Status")),
			RemoteMTA:         mtaName(b.get("Remote-MTA")),
			LastAttemptDate:   parseDate(b.get("Last-Attempt-Date")),
		}
		if r.FinalRecipient == "" && r.OriginalRecipient == "" && r.Action == "" && r.Status == "" {
			// Not a recipient block: some MTAs repeat per-message fields.
			continue
		}
		diag := b.get("Diagnostic-Code")
		// "smtp; 550 5.1.1 ..." has a type; "550 5.1.1 no; such user" does
		// not, although some MTAs send it so.
		if typ, text, ok := strings.Cut(diag, ";"); ok && len(strings.Fields(typ)) == 1 {
			r.DiagnosticType = strings.ToLower(strings.TrimSpace(typ))
			diag = text
		}
		r.Diagnostic = truncate(strings.TrimSpace(diag), maxDiagnostic)
		if r.DiagnosticType == "" || r.DiagnosticType == "smtp" {
			r.ReplyCode, _ = findReplyCode(r.Diagnostic)
		}
		if r.Status == "" {
			r.Status = findEnhanced(r.Diagnostic)
		}
		p.rep.Recipients = append(p.rep.Recipients, r)
	}
}

// arf reads the feedback-report fields (RFC 5965 section 3.1).
func (p *parser) arf() {
	b := p.feedback
	fb := &Feedback{
		Type:      strings.ToLower(firstWord(b.get("Feedback-Type"))),
		UserAgent: strings.TrimSpace(b.get("User-Agent")),
		Version:   strings.TrimSpace(b.get("Version")),
		SourceIP:  strings.TrimSpace(b.get("Source-IP")),
	}
	for _, v := range b.all("Original-Rcpt-To") {
		if a := address(v); a != "" && len(fb.OriginalRcptTo) < maxRecipients {
			fb.OriginalRcptTo = append(fb.OriginalRcptTo, a)
		}
	}
	for _, v := range b.all("Reported-Domain") {
		if d := strings.TrimSpace(v); d != "" && len(fb.ReportedDomain) < maxRecipients {
			fb.ReportedDomain = append(fb.ReportedDomain, d)
		}
	}
	p.rep.Feedback = fb
	p.rep.ReportingMTA = mtaName(b.get("Reporting-MTA"))
	// RFC 5965 section 3.1 names the field Arrival-Date; early reports
	// (draft ARF) used Received-Date.
	date := b.get("Arrival-Date")
	if date == "" {
		date = b.get("Received-Date")
	}
	p.rep.ArrivalDate = parseDate(date)
	p.rep.OriginalEnvelopeID = strings.TrimSpace(b.get("Original-Envelope-Id"))
	if from := address(b.get("Original-Mail-From")); from != "" {
		p.rep.OriginalMailFrom = from
	}
	for _, rcpt := range fb.OriginalRcptTo {
		p.rep.Recipients = append(p.rep.Recipients, RecipientReport{FinalRecipient: rcpt})
	}
}

// fieldBlock is one block of "Name: value" fields, names canonicalized.
type fieldBlock []field

type field struct{ name, value string }

func (b fieldBlock) get(name string) string {
	for _, f := range b {
		if strings.EqualFold(f.name, name) {
			return f.value
		}
	}
	return ""
}

func (b fieldBlock) all(name string) []string {
	var out []string
	for _, f := range b {
		if strings.EqualFold(f.name, name) {
			out = append(out, f.value)
		}
	}
	return out
}

// parseFieldBlocks splits the body of a delivery-status or feedback-report
// part into blocks separated by blank lines, each a list of header-style
// fields with folded lines unfolded (RFC 5322 section 2.2.3). Lines that
// are not fields are skipped rather than failing the report.
func parseFieldBlocks(b []byte) []fieldBlock {
	var blocks []fieldBlock
	var cur fieldBlock
	const maxFields = 1000
	n := 0
lines:
	for line := range strings.Lines(string(b)) {
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.TrimSpace(line) == "":
			if len(cur) > 0 {
				blocks = append(blocks, cur)
				cur = nil
			}
		case line[0] == ' ' || line[0] == '\t':
			if len(cur) > 0 {
				last := &cur[len(cur)-1]
				if len(last.value) < maxDiagnostic {
					last.value += " " + strings.TrimSpace(line)
				}
			}
		default:
			name, value, ok := strings.Cut(line, ":")
			if !ok || name == "" || strings.ContainsAny(name, " \t") {
				continue
			}
			n++
			if n > maxFields {
				break lines
			}
			cur = append(cur, field{name: name, value: strings.TrimSpace(value)})
		}
	}
	if len(cur) > 0 {
		blocks = append(blocks, cur)
	}
	return blocks
}

// typedValue strips the type of a "type; value" field (RFC 3464 section
// 2.1.2: address-type, mta-name-type, diagnostic-type).
func typedValue(v string) string {
	if _, after, ok := strings.Cut(v, ";"); ok {
		v = after
	}
	return strings.TrimSpace(v)
}

// mtaName reads an mta-name field (RFC 3464 section 2.2.2) without its type,
// a trailing dot, or the comment Gmail adds ("mx.test. (192.0.2.1, the
// server for the domain test.)").
func mtaName(v string) string {
	return strings.TrimSuffix(firstWord(typedValue(v)), ".")
}

// address strips angle brackets and a comment from an address field value.
func address(v string) string {
	v = strings.TrimSpace(v)
	if i := strings.IndexByte(v, '<'); i >= 0 {
		if j := strings.IndexByte(v[i:], '>'); j > 0 {
			return strings.TrimSpace(v[i+1 : i+j])
		}
	}
	if f := strings.Fields(v); len(f) > 0 {
		return strings.Trim(f[0], "<>")
	}
	return ""
}

func firstWord(v string) string {
	f := strings.FieldsFunc(v, func(r rune) bool { return r == ' ' || r == '\t' || r == '(' || r == ';' })
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

// parseDate reads an RFC 5322 date-time; zero when it cannot.
func parseDate(v string) time.Time {
	v = strings.TrimSpace(v)
	if v == "" {
		return time.Time{}
	}
	t, err := mail.ParseDate(v)
	if err != nil {
		return time.Time{}
	}
	return t
}

func headerText(h message.Header, key string) string {
	v, err := h.Text(key)
	if err != nil {
		return h.Get(key)
	}
	return v
}

// readBounded reads at most n bytes of r. A read error ends the read: what
// came before it is kept.
func readBounded(r io.Reader, n int) []byte {
	if n <= 0 {
		return nil
	}
	b, _ := io.ReadAll(io.LimitReader(r, int64(n)))
	return b
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
