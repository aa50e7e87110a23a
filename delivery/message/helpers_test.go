package message_test

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	gomessage "github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"

	"github.com/posthaste/posthaste/delivery/message"
)

// leaf is a non-multipart entity read back from a built message.
type leaf struct {
	mediaType   string
	params      map[string]string
	disposition string
	filename    string
	contentID   string
	body        []byte // decoded
}

// parsed is a message read back with go-message.
type parsed struct {
	header mail.Header
	shape  string // e.g. "multipart/mixed[text/plain,application/pdf]"
	leaves []leaf
	// related holds the "type" parameter of each multipart/related.
	related []string
}

// parse reads raw back with go-message, failing the test on any error.
func parse(t *testing.T, raw []byte) parsed {
	t.Helper()
	e, err := gomessage.Read(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("read message: %v", err)
	}
	var p parsed
	p.header = mail.Header{Header: e.Header}
	p.shape = walk(t, e, &p)
	return p
}

func walk(t *testing.T, e *gomessage.Entity, p *parsed) string {
	t.Helper()
	mediaType, params, err := e.Header.ContentType()
	if err != nil {
		t.Fatalf("Content-Type %q: %v", e.Header.Get("Content-Type"), err)
	}
	if mr := e.MultipartReader(); mr != nil {
		if mediaType == "multipart/related" {
			p.related = append(p.related, params["type"])
		}
		var children []string
		for {
			c, err := mr.NextPart()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("next part of %s: %v", mediaType, err)
			}
			children = append(children, walk(t, c, p))
		}
		return mediaType + "[" + strings.Join(children, ",") + "]"
	}
	body, err := io.ReadAll(e.Body)
	if err != nil {
		t.Fatalf("read %s body: %v", mediaType, err)
	}
	l := leaf{mediaType: mediaType, params: params, body: body}
	if e.Header.Has("Content-Disposition") {
		ah := mail.AttachmentHeader{Header: e.Header}
		l.disposition, _, err = ah.ContentDisposition()
		if err != nil {
			t.Fatalf("Content-Disposition %q: %v", e.Header.Get("Content-Disposition"), err)
		}
		if l.filename, err = ah.Filename(); err != nil {
			t.Fatalf("filename: %v", err)
		}
	}
	l.contentID = e.Header.Get("Content-Id")
	p.leaves = append(p.leaves, l)
	return mediaType
}

// checkWire asserts the RFC 5322 section 2.1 and 2.1.1 line rules: every
// line ends in CRLF, no CR or LF appears elsewhere, and no line is longer
// than 998 octets. It also asserts a 7-bit header.
func checkWire(t *testing.T, raw []byte) {
	t.Helper()
	if !bytes.HasSuffix(raw, []byte("\r\n")) {
		t.Errorf("message does not end in CRLF")
	}
	inHeader := true
	for i, line := range bytes.Split(raw, []byte("\r\n")) {
		if bytes.ContainsAny(line, "\r\n") {
			t.Errorf("line %d has a bare CR or LF: %q", i+1, line)
		}
		if len(line) > 998 {
			t.Errorf("line %d is %d octets", i+1, len(line))
		}
		if inHeader {
			if len(line) == 0 {
				inHeader = false
			}
			for _, c := range line {
				if c >= 0x80 {
					t.Errorf("header line %d has non-ASCII octets: %q", i+1, line)
					break
				}
			}
		}
	}
}

// headerNames returns the top-level header field names in order.
func headerNames(h mail.Header) []string {
	var names []string
	f := h.Fields()
	for f.Next() {
		names = append(names, f.Key())
	}
	return names
}

// crlf turns each line break (CRLF, LF or a lone CR) into CRLF, which is how
// a text body comes back out of quoted-printable.
func crlf(s string) string {
	s = strings.ReplaceAll(s, "\r\n", "\n")
	s = strings.ReplaceAll(s, "\r", "\n")
	return strings.ReplaceAll(s, "\n", "\r\n")
}

func asFieldError(t *testing.T, err error) *message.FieldError {
	t.Helper()
	var fe *message.FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v (%T) is not a *message.FieldError", err, err)
	}
	return fe
}

// spec returns a minimal valid Spec.
func spec() message.Spec {
	return message.Spec{
		From:            message.Address{Name: "Posthaste", Address: "sender@example.test"},
		To:              []message.Address{{Address: "rcpt@example.test"}},
		Subject:         "Hello",
		Text:            "Hello there.\n",
		MessageIDDomain: "mail.example.test",
	}
}
