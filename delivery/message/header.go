package message

import (
	"encoding/base64"
	"fmt"
	"strings"
	"unicode/utf8"
)

// FieldError reports caller input that cannot become a message. Field names
// the input the way the API does ("to[1].address", "headers[0].name", "raw"),
// so the API edge can pass it on as the offending field. Any other error from
// Build or CheckRaw is the server's fault, not the caller's.
type FieldError struct {
	Field  string
	Reason string
	// Err is the underlying error, if any (for example one wrapping
	// ErrInvalidMailbox).
	Err error
}

// Error returns "field: reason".
func (e *FieldError) Error() string {
	return e.Field + ": " + e.Reason
}

// Unwrap returns the underlying error.
func (e *FieldError) Unwrap() error {
	return e.Err
}

func fieldErrorf(field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// Header fields only Posthaste writes. They either carry what the API has
// its own fields for (addresses, subject, date, identity), describe the MIME
// structure Build makes, or belong to transport and authentication, where a
// forged value would mislead receivers (trace fields, RFC 5322 section 3.6.7;
// DKIM, RFC 6376; ARC, RFC 8617; Authentication-Results, RFC 8601).
var reservedHeaders = map[string]bool{
	"from":                   true,
	"sender":                 true,
	"reply-to":               true,
	"to":                     true,
	"cc":                     true,
	"bcc":                    true,
	"date":                   true,
	"message-id":             true,
	"subject":                true,
	"mime-version":           true,
	"dkim-signature":         true,
	"domainkey-signature":    true,
	"authentication-results": true,
	"received":               true,
	"received-spf":           true,
	"return-path":            true,
	"delivered-to":           true,
}

// Prefixes of reserved header field names: Content-* describes the MIME
// structure (RFC 2045), Resent-* is for resending (RFC 5322 section 3.6.6),
// ARC-* is the authenticated received chain (RFC 8617), and X-Posthaste-* is
// kept for the service's own use.
var reservedHeaderPrefixes = []string{"content-", "resent-", "arc-", "x-posthaste-"}

// IsReservedHeader reports whether a caller may not set the header field
// name, compared case-insensitively (RFC 5322 section 1.2.2).
func IsReservedHeader(name string) bool {
	n := strings.ToLower(strings.TrimSpace(name))
	if reservedHeaders[n] {
		return true
	}
	for _, p := range reservedHeaderPrefixes {
		if strings.HasPrefix(n, p) {
			return true
		}
	}
	return false
}

// maxHeaderName keeps "Name: " well inside go-message's 76-column fold
// target, whose arithmetic assumes the name leaves room on the first line.
const maxHeaderName = 64

// checkHeaderName reports why name cannot be a caller's header field name.
func checkHeaderName(name string) string {
	if name == "" {
		return "is empty"
	}
	if len(name) > maxHeaderName {
		return fmt.Sprintf("is %d octets, more than %d", len(name), maxHeaderName)
	}
	for i := 0; i < len(name); i++ {
		// RFC 5322 section 3.6.8: ftext is printable US-ASCII except colon.
		if c := name[i]; c < '!' || c > '~' || c == ':' {
			return fmt.Sprintf("has %q; a header field name is printable ASCII without colon or space (RFC 5322 section 3.6.8)", c)
		}
	}
	if IsReservedHeader(name) {
		return fmt.Sprintf("%s is set by Posthaste and cannot be given as an extra header", name)
	}
	return ""
}

// checkText reports why s cannot be header text: it must be UTF-8 (it is
// encoded per RFC 2047 as such) and must not hold line breaks or other
// control characters, which could end the field early or be read differently
// by different receivers. A tab is allowed where allowTab is set.
func checkText(s string, allowTab bool) string {
	if !utf8.ValidString(s) {
		return "is not valid UTF-8"
	}
	for _, r := range s {
		switch {
		case r == '\r' || r == '\n':
			return "must not contain CR or LF"
		case r == '\t' && allowTab:
		case r < ' ' || r == 0x7f || 0x80 <= r && r <= 0x9f:
			return fmt.Sprintf("must not contain the control character %U", r)
		}
	}
	return ""
}

// checkFoldable reports why the encoded value of the field name cannot be
// written with every line at most 998 octets (RFC 5322 section 2.1.1).
// Folding only happens at white space (section 2.2.3), so a run of non-white
// characters must fit on one line after "Name: ". Encoded-words (RFC 2047)
// are at most 75 octets, so only long ASCII words can fail.
func checkFoldable(name, value string) string {
	limit := 998 - len(name) - len(": ")
	run := 0
	for i := 0; i < len(value); i++ {
		if value[i] == ' ' || value[i] == '\t' {
			run = 0
			continue
		}
		run++
		if run > limit {
			return fmt.Sprintf("has a word longer than %d octets, which cannot be folded to fit the 998-octet line limit (RFC 5322 section 2.1.1)", limit)
		}
	}
	return ""
}

// Line lengths of header fields.
const (
	// foldLen is the line length RFC 5322 section 2.1.1 asks for (SHOULD),
	// CRLF excluded.
	foldLen = 78
	// encodedFoldLen is the limit for a line holding an encoded-word (RFC
	// 2047 section 2).
	encodedFoldLen = 76
	// maxLineLen is the line length RFC 5322 section 2.1.1 requires (MUST),
	// CRLF excluded.
	maxLineLen = 998
	// maxEncodedWord is the longest encoded-word (RFC 2047 section 2).
	maxEncodedWord = 75
)

// unstructuredField returns the header field "name: text" for unstructured
// text (RFC 5322 section 3.2.5), folded, with its CRLF; or why it cannot be
// written.
//
// Printable ASCII without "=?" is written as it is, folded at white space
// (section 2.2.3) so that lines stay within 78 octets where the words allow.
// Anything else is written as RFC 2047 encoded-words of at most 75 octets,
// one per line of at most 76: non-ASCII text, and ASCII text holding "=?",
// which a decoder would take for an encoded-word and show the recipient
// something the sender did not write. With encodeLong, plain text with a
// word too long for a 78-octet line is encoded too: an encoded-word can be
// split anywhere, a word of plain text only at white space. Without it, such
// a word (in a field that may be structured, where an encoded-word would not
// be read back) gets a line of its own, and only a word that does not fit in
// 998 octets is refused.
func unstructuredField(name, text string, encodeLong bool) (string, string) {
	if plainText(text) {
		field, longest := foldPlain(name, text)
		if longest <= foldLen || !encodeLong && longest <= maxLineLen {
			return field, ""
		}
		if !encodeLong {
			return "", "has a word (text without white space) too long to fit the 998-octet line limit even on a line of its own (RFC 5322 section 2.1.1)"
		}
	}
	return foldEncoded(name, text), ""
}

// plainText reports whether s can be written into a header as it is.
func plainText(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < ' ' || c > '~') && c != '\t' {
			return false
		}
	}
	return !strings.Contains(s, "=?")
}

// foldPlain folds "name: text" before white space wherever a line would
// pass 78 octets, and returns the field with its CRLF and the length of its
// longest line. A fold goes before the first white space of a run and never
// before white space that ends the text, so no line is white space alone
// (RFC 5322 section 3.2.2).
func foldPlain(name, text string) (string, int) {
	var b strings.Builder
	b.WriteString(name)
	b.WriteString(": ")
	lineLen, longest := b.Len(), 0
	for text != "" {
		// The next piece is a run of white space and the word after it
		// (the first piece may have no white space).
		end := 0
		for end < len(text) && (text[end] == ' ' || text[end] == '\t') {
			end++
		}
		lead := end
		for end < len(text) && text[end] != ' ' && text[end] != '\t' {
			end++
		}
		piece := text[:end]
		text = text[end:]
		if lead > 0 && end > lead && lineLen > 0 && lineLen+len(piece) > foldLen && b.Len() > len(name)+2 {
			longest = max(longest, lineLen)
			b.WriteString("\r\n")
			lineLen = 0
		}
		b.WriteString(piece)
		lineLen += len(piece)
	}
	b.WriteString("\r\n")
	return b.String(), max(longest, lineLen)
}

// foldEncoded writes text as encoded-words, one per line. The first goes on
// the line of the field name when one fits there, else the field body
// begins on the next line (unstructured text may begin with folding white
// space, RFC 5322 section 3.2.5).
func foldEncoded(name, text string) string {
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte(':')
	first := encodedFoldLen - len(name) - len(": ")
	// Room for the encoded-word's frame and one character at its longest.
	if first < len("=?utf-8?q??=")+4*len("=XX") {
		first = 0
	}
	for i, w := range encodeWords(text, first, maxEncodedWord) {
		if i > 0 || first == 0 {
			b.WriteString("\r\n")
		}
		b.WriteByte(' ')
		b.WriteString(w)
	}
	b.WriteString("\r\n")
	return b.String()
}

// encodeWords encodes text as UTF-8 encoded-words (RFC 2047), the first at
// most first octets long (0: as long as the others), the others at most
// rest. Each holds whole characters (RFC 2047 section 5 rule 3).
func encodeWords(text string, first, rest int) []string {
	const frame = len("=?utf-8?q?") + len("?=")
	if first == 0 {
		first = rest
	}
	qLen := 0
	for i := 0; i < len(text); i++ {
		qLen += len(qOctet(text[i]))
	}
	// Q costs 3 octets for each non-ASCII one, B 4 for 3: B is shorter
	// once Q passes 4/3 of the text, but Q stays readable; text mostly in
	// another script (Q well over twice the text) goes into B.
	useB := 2*qLen > 5*len(text)

	var words []string
	var cur strings.Builder // the encoded text of the word being filled
	var raw []byte          // for B, the octets of the word being filled
	limit := first - frame
	flush := func() {
		if useB {
			words = append(words, "=?utf-8?b?"+base64.StdEncoding.EncodeToString(raw)+"?=")
			raw = raw[:0]
			return
		}
		words = append(words, "=?utf-8?q?"+cur.String()+"?=")
		cur.Reset()
	}
	for _, r := range text {
		var ch []byte
		ch = utf8.AppendRune(ch, r)
		if useB {
			if len(raw) > 0 && base64.StdEncoding.EncodedLen(len(raw)+len(ch)) > limit {
				flush()
				limit = rest - frame
			}
			raw = append(raw, ch...)
			continue
		}
		var enc strings.Builder
		for _, c := range ch {
			enc.WriteString(qOctet(c))
		}
		if cur.Len() > 0 && cur.Len()+enc.Len() > limit {
			flush()
			limit = rest - frame
		}
		cur.WriteString(enc.String())
	}
	if cur.Len() > 0 || len(raw) > 0 || len(words) == 0 {
		flush()
	}
	return words
}

// qOctet is c in the Q encoding (RFC 2047 section 4.2), keeping only the
// characters section 5 rule 3 allows in any header as they are.
func qOctet(c byte) string {
	switch {
	case c == ' ':
		return "_"
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
		c == '!', c == '*', c == '+', c == '-', c == '/':
		return string(c)
	}
	const hex = "0123456789ABCDEF"
	return string([]byte{'=', hex[c>>4], hex[c&0xf]})
}
