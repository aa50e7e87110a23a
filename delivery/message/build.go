package message

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"mime"
	"net/textproto"
	"strings"
	"time"
	"unicode/utf8"

	gomessage "github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"
)

// Address is a mailbox with an optional display name.
type Address struct {
	// Name is the display name. Non-ASCII text is encoded per RFC 2047 and
	// specials are quoted, so any UTF-8 text without control characters is
	// accepted.
	Name string
	// Address is the addr-spec, e.g. "ada@example.test". It must pass
	// NormalizeMailbox; header fields carry the normalized form.
	Address string
}

// Attachment is a file attached to the message, or an inline part when
// ContentID is set.
type Attachment struct {
	// Filename is the name shown to the recipient. Optional.
	Filename string
	// ContentType is the MIME type, e.g. "application/pdf". Defaults to
	// application/octet-stream.
	ContentType string
	// ContentID makes the part inline: it goes into multipart/related next to
	// the HTML body, which refers to it as "cid:<ContentID>" (RFC 2392).
	// Angle brackets around it are optional.
	ContentID string
	// Content is the file's bytes. Build does not modify or retain it.
	Content []byte
}

// Header is an extra header field given by the caller.
type Header struct {
	// Name is the field name. It must be printable ASCII without colon and
	// not reserved (see IsReservedHeader).
	Name string
	// Value is the field body. Non-ASCII text is encoded per RFC 2047.
	Value string
}

// Spec describes a message to build. Blind-copy recipients never appear in
// a Spec: they exist only in the SMTP envelope.
type Spec struct {
	From    Address
	ReplyTo []Address
	To      []Address
	Cc      []Address
	Subject string
	// Text is the plain-text body. At least one of Text and HTML is required.
	Text string
	// HTML is the HTML body.
	HTML        string
	Attachments []Attachment
	// Headers are extra header fields, written in the given order.
	Headers []Header
	// MessageIDDomain is the right-hand side of the generated Message-ID,
	// <random@MessageIDDomain>. Required.
	MessageIDDomain string
	// Date is the origination date (RFC 5322 section 3.6.1). Defaults to the
	// time Build is called.
	Date time.Time
}

// Built is a message ready to store and send.
type Built struct {
	// Raw is the complete message: CRLF line endings, no line over 998
	// octets, 7-bit headers.
	Raw []byte
	// MessageID is the Message-ID field's value, angle brackets included.
	MessageID string
}

// Build validates s and writes the message it describes.
//
// The MIME structure follows the content:
//
//	text only               text/plain
//	html only               text/html
//	text and html           multipart/alternative (text, then html: RFC 2046
//	                        section 5.1.4 puts the preferred form last)
//	inline parts            multipart/related (RFC 2387) around the above,
//	                        followed by the inline parts
//	attachments             multipart/mixed around all of the above,
//	                        followed by the attachments
//
// Text bodies are quoted-printable and attachments base64, so every line fits
// the 998-octet limit of RFC 5322 section 2.1.1 whatever the content.
//
// Errors about the content of s are *FieldError; any other error means the
// server could not build the message (for example an invalid
// MessageIDDomain).
func Build(s Spec) (Built, error) {
	msgDomain, err := normalizeDomain(s.MessageIDDomain)
	if err != nil {
		return Built{}, fmt.Errorf("message id domain %q: %w", s.MessageIDDomain, err)
	}

	addrs, err := checkHeaderText(&s)
	if err != nil {
		return Built{}, err
	}
	root, err := buildBody(&s)
	if err != nil {
		return Built{}, err
	}
	extra := make([]string, len(s.Headers))
	for i, x := range s.Headers {
		if r := checkHeaderName(x.Name); r != "" {
			return Built{}, fieldErrorf(fmt.Sprintf("headers[%d].name", i), "%s", r)
		}
		if r := checkText(x.Value, true); r != "" {
			return Built{}, fieldErrorf(fmt.Sprintf("headers[%d].value", i), "%s", r)
		}
		// An extra field may be structured (List-Unsubscribe, say), where
		// an encoded-word would not be read back: long words stay plain.
		field, r := unstructuredField(textproto.CanonicalMIMEHeaderKey(x.Name), x.Value, false)
		if r != "" {
			return Built{}, fieldErrorf(fmt.Sprintf("headers[%d].value", i), "%s", r)
		}
		extra[i] = field
	}

	date := s.Date
	if date.IsZero() {
		date = time.Now()
	}
	// RFC 5322 section 3.6.4: the left side only has to be unique; 128 bits
	// from crypto/rand make a collision practically impossible without
	// revealing anything about the sender.
	msgID := rand.Text() + "@" + msgDomain

	// go-message writes the most recently added field first, so the fields
	// are added from the bottom of the header up: the root part's content
	// fields, the caller's extra fields, then the originator and destination
	// fields ending with Date at the top. No Bcc field is ever written
	// (RFC 5322 section 3.6.3 allows leaving it out): blind copies exist only
	// in the envelope.
	var h mail.Header
	addContentFields(&h.Header, root)
	for i := len(extra) - 1; i >= 0; i-- {
		h.AddRaw([]byte(extra[i]))
	}
	h.Set("MIME-Version", "1.0")
	h.SetMessageID(msgID)
	if s.Subject != "" {
		// The subject is unstructured text (RFC 5322 section 3.6.5): any
		// word too long to fold is encoded, so every subject fits.
		field, _ := unstructuredField("Subject", s.Subject, true)
		h.AddRaw([]byte(field))
	}
	h.SetAddressList("Cc", addrs.cc)
	h.SetAddressList("To", addrs.to)
	h.SetAddressList("Reply-To", addrs.replyTo)
	h.SetAddressList("From", []*mail.Address{addrs.from})
	h.Set("Date", date.Format(dateLayout))
	// The header is final from here on: a DKIM signer (RFC 6376) signs these
	// bytes and prepends its DKIM-Signature field to Built.Raw; nothing below
	// may be rewritten after signing.

	buf := bytes.NewBuffer(make([]byte, 0, estimateSize(&s)))
	w, err := gomessage.CreateWriter(buf, h.Header)
	if err != nil {
		return Built{}, fmt.Errorf("write header: %w", err)
	}
	if err := writeBody(w, root); err != nil {
		return Built{}, err
	}
	if err := w.Close(); err != nil {
		return Built{}, fmt.Errorf("close message: %w", err)
	}
	if root.children == nil && !strings.HasSuffix(root.text, "\n") && !strings.HasSuffix(root.text, "\r") {
		// A single-part body that does not end in a line break would leave
		// the message without its final CRLF. A quoted-printable soft line
		// break (RFC 2045 section 6.7 rule 5) adds one that decodes to
		// nothing. Multiparts end with the close delimiter's CRLF.
		buf.WriteString("=\r\n")
	}
	return Built{Raw: buf.Bytes(), MessageID: "<" + msgID + ">"}, nil
}

// dateLayout is RFC 5322 section 3.3 date-time with a numeric zone.
const dateLayout = "Mon, 02 Jan 2006 15:04:05 -0700"

// addresses are the validated address fields of a Spec.
type addresses struct {
	from            *mail.Address
	replyTo, to, cc []*mail.Address
}

// checkHeaderText validates the addresses and the subject.
func checkHeaderText(s *Spec) (addresses, error) {
	var a addresses
	if s.Subject != "" {
		if r := checkText(s.Subject, true); r != "" {
			return a, fieldErrorf("subject", "%s", r)
		}
	}
	if s.From.Address == "" {
		return a, fieldErrorf("from.address", "is required")
	}
	var err error
	if a.from, err = headerAddress("from", "From", s.From); err != nil {
		return a, err
	}
	lists := []struct {
		field, header string
		in            []Address
		out           *[]*mail.Address
	}{
		{"reply_to", "Reply-To", s.ReplyTo, &a.replyTo},
		{"to", "To", s.To, &a.to},
		{"cc", "Cc", s.Cc, &a.cc},
	}
	for _, l := range lists {
		for i, in := range l.in {
			ma, err := headerAddress(fmt.Sprintf("%s[%d]", l.field, i), l.header, in)
			if err != nil {
				return a, err
			}
			*l.out = append(*l.out, ma)
		}
	}
	return a, nil
}

func headerAddress(field, header string, a Address) (*mail.Address, error) {
	m, err := parseMailbox(a.Address)
	if err != nil {
		return nil, &FieldError{Field: field + ".address", Reason: err.Error(), Err: err}
	}
	if r := checkText(a.Name, false); r != "" {
		return nil, fieldErrorf(field+".name", "%s", r)
	}
	ma := &mail.Address{Name: a.Name, Address: m.headerAddress()}
	if r := checkFoldable(header, ma.String()); r != "" {
		return nil, fieldErrorf(field+".name", "%s", r)
	}
	return ma, nil
}

// part is one MIME entity to write: a leaf with content, or a multipart
// with children.
type part struct {
	mediaType   string
	params      map[string]string
	encoding    string // Content-Transfer-Encoding of a leaf
	disposition string
	filename    string
	contentID   string // without angle brackets

	text     string // leaf content, for text bodies
	content  []byte // leaf content, for attachments
	children []*part
}

func textPart(mediaType, body string) *part {
	return &part{
		mediaType: mediaType,
		params:    map[string]string{"charset": "utf-8"},
		encoding:  "quoted-printable",
		text:      body,
	}
}

// multipart returns a multipart entity with its own random boundary. Setting
// the boundary here, rather than letting go-message pick one, keeps
// go-message from rewriting Content-Type and so reordering the header.
func multipart(subtype string, params map[string]string, children ...*part) *part {
	if params == nil {
		params = map[string]string{}
	}
	// 26 base32 characters cannot occur in base64 or quoted-printable output
	// except by a 2^-130 chance (RFC 2046 section 5.1.1).
	params["boundary"] = rand.Text()
	return &part{mediaType: "multipart/" + subtype, params: params, children: children}
}

// buildBody validates the bodies and attachments and arranges them into the
// MIME tree described on Build.
func buildBody(s *Spec) (*part, error) {
	if s.Text == "" && s.HTML == "" {
		return nil, fieldErrorf("text", "text or html is required")
	}
	if !utf8.ValidString(s.Text) {
		return nil, fieldErrorf("text", "is not valid UTF-8")
	}
	if !utf8.ValidString(s.HTML) {
		return nil, fieldErrorf("html", "is not valid UTF-8")
	}

	var body *part
	switch {
	case s.Text != "" && s.HTML != "":
		body = multipart("alternative", nil, textPart("text/plain", s.Text), textPart("text/html", s.HTML))
	case s.HTML != "":
		body = textPart("text/html", s.HTML)
	default:
		body = textPart("text/plain", s.Text)
	}

	var inline, attached []*part
	seenCID := map[string]int{}
	for i := range s.Attachments {
		p, err := attachmentPart(i, &s.Attachments[i])
		if err != nil {
			return nil, err
		}
		if p.contentID == "" {
			attached = append(attached, p)
			continue
		}
		field := fmt.Sprintf("attachments[%d].content_id", i)
		if s.HTML == "" {
			return nil, fieldErrorf(field, "an inline part needs an html body to refer to it")
		}
		if j, dup := seenCID[p.contentID]; dup {
			return nil, fieldErrorf(field, "%q is also the content_id of attachments[%d]", p.contentID, j)
		}
		seenCID[p.contentID] = i
		inline = append(inline, p)
	}

	if len(inline) > 0 {
		// RFC 2387 section 3.1: type names the root part's media type.
		body = multipart("related", map[string]string{"type": body.mediaType}, append([]*part{body}, inline...)...)
	}
	if len(attached) > 0 {
		body = multipart("mixed", nil, append([]*part{body}, attached...)...)
	}
	return body, nil
}

// maxFilename matches the common file system limit for a name.
const maxFilename = 255

func attachmentPart(i int, a *Attachment) (*part, error) {
	field := fmt.Sprintf("attachments[%d]", i)
	ct := a.ContentType
	if ct == "" {
		ct = "application/octet-stream"
	}
	mediaType, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return nil, &FieldError{Field: field + ".content_type", Reason: fmt.Sprintf("%q is not a media type: %v", ct, err), Err: err}
	}
	switch top, _, ok := strings.Cut(mediaType, "/"); {
	case !ok:
		return nil, fieldErrorf(field+".content_type", "%q is not of the form type/subtype", ct)
	case top == "multipart" || top == "message":
		// Both would have to be 7bit, 8bit or binary (RFC 2046 sections
		// 5.1 and 5.2), not base64, and Build makes the multiparts itself.
		return nil, fieldErrorf(field+".content_type", "%s parts cannot be attached", top)
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") && !strings.EqualFold(cs, "us-ascii") {
		// go-message refuses to write any other charset.
		return nil, fieldErrorf(field+".content_type", "charset %q is not supported; use utf-8 or us-ascii", cs)
	}
	for k, v := range params {
		if r := checkText(v, false); r != "" {
			return nil, fieldErrorf(field+".content_type", "parameter %s %s", k, r)
		}
	}

	if r := checkText(a.Filename, false); r != "" {
		return nil, fieldErrorf(field+".filename", "%s", r)
	}
	if len(a.Filename) > maxFilename {
		return nil, fieldErrorf(field+".filename", "is %d octets, more than %d", len(a.Filename), maxFilename)
	}

	p := &part{
		mediaType:   mediaType,
		params:      params,
		encoding:    "base64",
		disposition: "attachment",
		filename:    a.Filename,
		content:     a.Content,
	}
	if a.ContentID != "" {
		cid, r := normalizeContentID(a.ContentID)
		if r != "" {
			return nil, fieldErrorf(field+".content_id", "%s", r)
		}
		p.contentID = cid
		p.disposition = "inline"
	}
	var h gomessage.Header
	addContentFields(&h, p)
	fields := h.Fields()
	for fields.Next() {
		if r := checkFoldable(fields.Key(), fields.Value()); r != "" {
			return nil, fieldErrorf(field, "%s: %s", fields.Key(), r)
		}
	}
	return p, nil
}

// normalizeContentID returns a content ID without angle brackets, or why it
// is unusable. RFC 2392 makes it an RFC 5322 msg-id; in practice senders use
// bare words ("logo") as well as id@domain, so any dot-atom-text with at most
// one "@" is accepted.
func normalizeContentID(cid string) (string, string) {
	if strings.HasPrefix(cid, "<") && strings.HasSuffix(cid, ">") && len(cid) >= 2 {
		cid = cid[1 : len(cid)-1]
	}
	if cid == "" {
		return "", "is empty"
	}
	if len(cid) > 250 {
		return "", "is longer than 250 octets"
	}
	left, right, hasAt := strings.Cut(cid, "@")
	if checkDotString(left) != "" || hasAt && checkDotString(right) != "" {
		return "", fmt.Sprintf("%q is not dot-atom text with at most one @ (RFC 2392)", cid)
	}
	return cid, ""
}

// addContentFields adds p's content fields to h, bottom-up (see Build).
func addContentFields(h *gomessage.Header, p *part) {
	if p.contentID != "" {
		h.Set("Content-ID", "<"+p.contentID+">")
	}
	if p.disposition != "" {
		var params map[string]string
		if p.filename != "" {
			params = map[string]string{"filename": p.filename}
		}
		h.SetContentDisposition(p.disposition, params)
	}
	if p.encoding != "" {
		h.Set("Content-Transfer-Encoding", p.encoding)
	}
	h.SetContentType(p.mediaType, p.params)
}

// writeBody writes p's content, or its children, to w. Each child's writer
// is closed before the next is opened and before w is, innermost first, so
// every encoder flushes and every boundary is in place.
func writeBody(w *gomessage.Writer, p *part) error {
	if p.children == nil {
		if err := writeContent(w, p); err != nil {
			return fmt.Errorf("write %s part: %w", p.mediaType, err)
		}
		return nil
	}
	for _, c := range p.children {
		var h gomessage.Header
		addContentFields(&h, c)
		cw, err := w.CreatePart(h)
		if err != nil {
			return fmt.Errorf("create %s part: %w", c.mediaType, err)
		}
		if err := writeBody(cw, c); err != nil {
			return err
		}
		if err := cw.Close(); err != nil {
			return fmt.Errorf("close %s part: %w", c.mediaType, err)
		}
	}
	return nil
}

// writeContent writes a leaf's content. A text body goes through a small
// reused buffer so that a large body is not copied whole into a []byte.
func writeContent(w io.Writer, p *part) error {
	if p.text == "" {
		_, err := w.Write(p.content)
		return err
	}
	var chunk [32 << 10]byte
	for s := p.text; s != ""; {
		n := copy(chunk[:], s)
		if _, err := w.Write(chunk[:n]); err != nil {
			return err
		}
		s = s[n:]
	}
	return nil
}

// estimateSize returns a size the encoded message does not exceed, so the
// output buffer is allocated once instead of doubling its way up through a
// multi-megabyte message. Header text is counted four times over: RFC 2047
// Q-encoding triples non-ASCII octets and adds up to 13 octets of framing
// per encoded-word.
func estimateSize(s *Spec) int {
	n := 4096 // fixed fields, boundaries and part headers
	n += 4 * len(s.Subject)
	for _, l := range [][]Address{{s.From}, s.ReplyTo, s.To, s.Cc} {
		for _, a := range l {
			n += 4*len(a.Name) + 2*len(a.Address) + 16
		}
	}
	for _, h := range s.Headers {
		n += len(h.Name) + 4*len(h.Value) + 16
	}
	n += quotedPrintableSize(s.Text) + quotedPrintableSize(s.HTML)
	for _, a := range s.Attachments {
		n += base64Size(len(a.Content)) + 4*len(a.Filename) + 2*len(a.ContentType) + len(a.ContentID) + 256
	}
	return n
}

// quotedPrintableSize bounds the quoted-printable (RFC 2045 section 6.7)
// size of s: three octets for each octet that needs encoding (including
// white space at the end of a line), CRLF for each line break, and a soft
// line break "=\r\n" at least every 73 octets.
func quotedPrintableSize(s string) int {
	if s == "" {
		return 0
	}
	n := len(s)
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\n' || c == '\r':
			n++
		case c == ' ' || c == '\t':
			if i+1 == len(s) || s[i+1] == '\n' || s[i+1] == '\r' {
				n += 2
			}
		case c >= 0x7f || c == '=' || c < ' ':
			n += 2
		}
	}
	return n + n/73*3 + 3
}

// base64Size is the size of n octets in base64 with 76-character lines
// (RFC 2045 section 6.8).
func base64Size(n int) int {
	enc := (n + 2) / 3 * 4
	return enc + (enc+75)/76*2
}
