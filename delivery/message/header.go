package message

import (
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
