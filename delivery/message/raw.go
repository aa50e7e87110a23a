package message

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"strings"
	"time"

	gomessage "github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"
)

// RawInfo describes a message CheckRaw accepted.
type RawInfo struct {
	// MessageID is the Message-ID field's value, angle brackets included.
	MessageID string
	// From is the From field decoded for display, e.g. `Jörg <j@example.test>`.
	From string
	// FromAddresses are the addresses of the From field's mailboxes.
	FromAddresses []string
	// Subject is the decoded Subject field; it is the field as written when
	// it uses a charset other than UTF-8 or US-ASCII.
	Subject string
	// FromDomains are the domains of the From mailboxes, in order, in
	// lowercase A-labels: the author domains DMARC checks (RFC 7489 section
	// 3.1) and DKIM signs for.
	FromDomains []string
	// DateAdded and MessageIDAdded report which fields CheckRaw prepended.
	DateAdded      bool
	MessageIDAdded bool
}

// Fields RFC 5322 section 3.6 allows at most once in a message.
var singletonFields = []string{"From", "Sender", "Reply-To", "To", "Cc", "Date", "Message-ID", "Subject"}

// CheckRaw vets a complete RFC 5322 message given by a caller and returns it
// ready to store, with info for the message's summary.
//
// It refuses a message that could not be sent as it is or that a receiver
// could read differently from Posthaste: a line over 998 octets (RFC 5322
// section 2.1.1), a CR or LF that is not part of a CRLF pair, a NUL, a
// non-ASCII octet in the header (SMTPUTF8 is not supported), a header or MIME
// structure go-message cannot parse, a missing or invalid From, more than one
// of a field RFC 5322 section 3.6 allows once, several From mailboxes without
// a Sender, an unparsable Date or Message-ID, and a Bcc field (blind copies
// belong in the envelope only, and the field would reach every recipient).
//
// A missing Date (dated now) or Message-ID (<random@messageIDDomain>) is
// prepended, and a CRLF is appended when the last line lacks one; otherwise
// the message is returned unchanged and out shares raw's memory. Prepending
// keeps a DKIM signature the caller made valid unless it signed the absence
// of the added field (RFC 6376 section 5.4).
//
// Errors about raw are *FieldError with Field "raw"; any other error means
// the server is at fault (for example an invalid messageIDDomain).
func CheckRaw(raw []byte, now time.Time, messageIDDomain string) (out []byte, info RawInfo, err error) {
	missingCRLF, err := checkLines(raw)
	if err != nil {
		return nil, RawInfo{}, err
	}

	e, err := gomessage.Read(bytes.NewReader(raw))
	if err != nil && !gomessage.IsUnknownCharset(err) && !gomessage.IsUnknownEncoding(err) {
		return nil, RawInfo{}, rawErrorf("cannot parse the header: %v", err)
	}
	err = e.Walk(func(path []int, _ *gomessage.Entity, err error) error {
		if err != nil && !gomessage.IsUnknownCharset(err) && !gomessage.IsUnknownEncoding(err) {
			return fmt.Errorf("MIME part %v: %w", path, err)
		}
		return nil
	})
	if err != nil {
		return nil, RawInfo{}, rawErrorf("malformed MIME structure: %v", err)
	}
	h := mail.Header{Header: e.Header}

	for _, k := range singletonFields {
		if n := h.FieldsByKey(k).Len(); n > 1 {
			return nil, RawInfo{}, rawErrorf("has %d %s fields; RFC 5322 section 3.6 allows one", n, k)
		}
	}
	if h.Has("Bcc") {
		return nil, RawInfo{}, rawErrorf("has a Bcc field; give blind-copy recipients only in the envelope")
	}

	from, err := h.AddressList("From")
	switch {
	case err != nil:
		return nil, RawInfo{}, rawErrorf("From: %v", err)
	case len(from) == 0:
		return nil, RawInfo{}, rawErrorf("has no From mailbox (RFC 5322 section 3.6.2)")
	case len(from) > 1 && !h.Has("Sender"):
		return nil, RawInfo{}, rawErrorf("has several From mailboxes but no Sender field (RFC 5322 section 3.6.2)")
	}
	display := make([]string, len(from))
	for i, a := range from {
		mb, err := parseMailbox(a.Address)
		if err != nil {
			return nil, RawInfo{}, &FieldError{Field: "raw", Reason: "From: " + err.Error(), Err: err}
		}
		info.FromDomains = append(info.FromDomains, mb.domain)
		display[i] = a.Address
		info.FromAddresses = append(info.FromAddresses, a.Address)
		if a.Name != "" {
			display[i] = a.Name + " <" + a.Address + ">"
		}
	}
	info.From = strings.Join(display, ", ")

	// Subject decoding only fails for charsets Go does not know; the field
	// as written is still 7-bit text, so it serves as the summary.
	info.Subject, _ = h.Subject()

	var prepend []string
	if h.Has("Date") {
		if _, err := h.Date(); err != nil {
			return nil, RawInfo{}, rawErrorf("Date: %v", err)
		}
	} else {
		if now.IsZero() {
			now = time.Now()
		}
		prepend = append(prepend, "Date: "+now.Format(dateLayout)+"\r\n")
		info.DateAdded = true
	}
	if h.Has("Message-ID") {
		id, err := h.MessageID()
		if err != nil {
			return nil, RawInfo{}, rawErrorf("Message-ID: %v", err)
		}
		info.MessageID = "<" + id + ">"
	} else {
		d, err := normalizeDomain(messageIDDomain)
		if err != nil {
			return nil, RawInfo{}, fmt.Errorf("message id domain %q: %w", messageIDDomain, err)
		}
		info.MessageID = "<" + rand.Text() + "@" + d + ">"
		prepend = append(prepend, "Message-ID: "+info.MessageID+"\r\n")
		info.MessageIDAdded = true
	}

	if len(prepend) == 0 && !missingCRLF {
		return raw, info, nil
	}
	size := len(raw) + 2
	for _, p := range prepend {
		size += len(p)
	}
	out = make([]byte, 0, size)
	for _, p := range prepend {
		out = append(out, p...)
	}
	out = append(out, raw...)
	if missingCRLF {
		out = append(out, '\r', '\n')
	}
	return out, info, nil
}

func rawErrorf(format string, args ...any) *FieldError {
	return fieldErrorf("raw", format, args...)
}

// checkLines checks the line structure of raw: CRLF only (RFC 5322 section
// 2.1), at most 998 octets per line (section 2.1.1), no NUL, and 7-bit
// octets in the header. It reports whether the last line lacks its CRLF.
func checkLines(raw []byte) (missingCRLF bool, err error) {
	if len(raw) == 0 {
		return false, rawErrorf("is empty")
	}
	inHeader := true
	for lineNo, off := 1, 0; off < len(raw); lineNo++ {
		line := raw[off:]
		next := len(raw)
		if i := bytes.IndexByte(line, '\n'); i >= 0 {
			line = line[:i]
			next = off + i + 1
			if i == 0 || line[i-1] != '\r' {
				return false, rawErrorf("line %d ends in a bare LF; lines must end in CRLF (RFC 5322 section 2.1)", lineNo)
			}
			line = line[:i-1]
		} else {
			missingCRLF = true
		}
		if i := bytes.IndexByte(line, '\r'); i >= 0 {
			return false, rawErrorf("line %d has a bare CR (RFC 5322 section 2.3)", lineNo)
		}
		if len(line) > 998 {
			return false, rawErrorf("line %d is %d octets, more than 998 (RFC 5322 section 2.1.1)", lineNo, len(line))
		}
		if bytes.IndexByte(line, 0) >= 0 {
			return false, rawErrorf("line %d has a NUL octet", lineNo)
		}
		if inHeader {
			if len(line) == 0 {
				inHeader = false
			}
			for _, c := range line {
				if c >= 0x80 {
					return false, rawErrorf("header line %d has a non-ASCII octet; encode header text per RFC 2047 (SMTPUTF8 is not supported)", lineNo)
				}
			}
		}
		off = next
	}
	return missingCRLF, nil
}
