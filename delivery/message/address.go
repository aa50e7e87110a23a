package message

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// ErrInvalidMailbox is wrapped by every error NormalizeMailbox returns.
var ErrInvalidMailbox = errors.New("invalid mailbox")

// ErrSMTPUTF8Unsupported is wrapped (together with ErrInvalidMailbox) when a
// mailbox has a non-ASCII local part. Such a mailbox can only be reached with
// the SMTPUTF8 extension (RFC 6531), which Posthaste does not implement.
var ErrSMTPUTF8Unsupported = errors.New("non-ASCII local part needs SMTPUTF8, which is not supported")

// Limits from RFC 5321 section 4.5.3.1 and RFC 1035 section 2.3.4.
const (
	maxLocalPart = 64 // RFC 5321 4.5.3.1.1
	// A reverse-path or forward-path is at most 256 octets including the
	// angle brackets (RFC 5321 4.5.3.1.3), which leaves 254 for the mailbox.
	maxMailbox = 254
	// 255 octets on the wire (RFC 1035 2.3.4) is 253 in dotted text.
	maxDomain = 253
	maxLabel  = 63
	// Inputs longer than this are refused before any parsing so that a huge
	// string never reaches the IDNA mapping. Generous: an IDN domain's
	// Unicode form may be longer than its A-label form.
	maxMailboxInput = 1024
)

// mailbox is a parsed RFC 5321 Mailbox.
type mailbox struct {
	// local is the local part's value: for a Quoted-string, the text with the
	// quotes and backslash escapes removed.
	local string
	// domain is lowercase ASCII: A-labels for an internationalized domain, or
	// a canonical address literal such as "[192.0.2.1]".
	domain string
}

// envelope returns the mailbox as written in MAIL FROM and RCPT TO. The local
// part is quoted only when it is not a Dot-string; RFC 5321 section 4.1.2 asks
// senders to prefer the unquoted form and the two are the same mailbox.
func (m mailbox) envelope() string {
	return quoteLocal(m.local) + "@" + m.domain
}

// headerAddress returns the addr-spec in the unquoted form net/mail expects;
// net/mail.Address.String adds the quotes again where needed.
func (m mailbox) headerAddress() string {
	return m.local + "@" + m.domain
}

// NormalizeMailbox checks that addr is a bare mailbox, valid both as an RFC
// 5322 addr-spec (section 3.4.1) and as an RFC 5321 Mailbox (section 4.1.2):
// a Dot-string or Quoted-string local part, "@", and a domain or an address
// literal. No display name, angle brackets, comments or surrounding space are
// allowed, so nothing the caller writes can change the SMTP command it ends
// up in.
//
// It returns the mailbox as written in the SMTP envelope and its domain. An
// internationalized domain is converted to A-labels with the IDNA Lookup
// profile (UTS #46); the domain is lowercased; the local part keeps its case
// (RFC 5321 section 2.4). Address literals are returned in canonical form,
// "[192.0.2.1]" or "[IPv6:2001:db8::1]".
//
// Errors wrap ErrInvalidMailbox; a non-ASCII local part also wraps
// ErrSMTPUTF8Unsupported.
func NormalizeMailbox(addr string) (envelope string, domain string, err error) {
	m, err := parseMailbox(addr)
	if err != nil {
		return "", "", err
	}
	return m.envelope(), m.domain, nil
}

func mailboxError(addr, reason string) error {
	if len(addr) > 100 {
		return fmt.Errorf("%w: %s", ErrInvalidMailbox, reason)
	}
	return fmt.Errorf("%w %q: %s", ErrInvalidMailbox, addr, reason)
}

func parseMailbox(addr string) (mailbox, error) {
	switch {
	case addr == "":
		return mailbox{}, fmt.Errorf("%w: empty", ErrInvalidMailbox)
	case len(addr) > maxMailboxInput:
		return mailbox{}, fmt.Errorf("%w: longer than %d octets", ErrInvalidMailbox, maxMailboxInput)
	}

	local, rest, reason := parseLocalPart(addr)
	if reason == errNonASCIILocal {
		return mailbox{}, fmt.Errorf("%w %q: %w", ErrInvalidMailbox, addr, ErrSMTPUTF8Unsupported)
	}
	if reason != "" {
		return mailbox{}, mailboxError(addr, reason)
	}
	if rest == "" || rest[0] != '@' {
		return mailbox{}, mailboxError(addr, "missing @ after the local part")
	}
	domain, err := normalizeDomain(rest[1:])
	if err != nil {
		return mailbox{}, mailboxError(addr, err.Error())
	}

	m := mailbox{local: local, domain: domain}
	if l := len(quoteLocal(local)); l > maxLocalPart {
		return mailbox{}, mailboxError(addr, fmt.Sprintf("local part is %d octets, more than %d (RFC 5321 section 4.5.3.1.1)", l, maxLocalPart))
	}
	if l := len(m.envelope()); l > maxMailbox {
		return mailbox{}, mailboxError(addr, fmt.Sprintf("mailbox is %d octets, more than %d (RFC 5321 section 4.5.3.1.3)", l, maxMailbox))
	}
	return m, nil
}

const errNonASCIILocal = "non-ASCII local part"

// parseLocalPart reads an RFC 5321 Local-part from the start of s and returns
// its value, the unread rest of s, and a reason when it is malformed.
func parseLocalPart(s string) (local, rest, reason string) {
	if s[0] == '"' {
		return parseQuotedString(s)
	}
	end := strings.IndexByte(s, '@')
	if end < 0 {
		end = len(s)
	}
	local = s[:end]
	if r := checkDotString(local); r != "" {
		return "", "", r
	}
	return local, s[end:], ""
}

// checkDotString reports why s is not an RFC 5321 Dot-string, or "" if it is.
// Dot-string = Atom *("." Atom), which is also RFC 5322 dot-atom-text.
func checkDotString(s string) string {
	if s == "" {
		return "empty local part"
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= utf8.RuneSelf:
			return errNonASCIILocal
		case c == '.':
			if i == 0 || i == len(s)-1 || s[i-1] == '.' {
				return "local part has a leading, trailing or doubled dot"
			}
		case !isAtext(c):
			return fmt.Sprintf("local part has %q, which needs quoting", c)
		}
	}
	return ""
}

// parseQuotedString reads an RFC 5321 Quoted-string: DQUOTE *QcontentSMTP
// DQUOTE, where QcontentSMTP is qtextSMTP (printable ASCII and space except
// DQUOTE and backslash) or a backslash followed by printable ASCII or space.
func parseQuotedString(s string) (value, rest, reason string) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			if b.Len() == 0 {
				return "", "", "empty local part"
			}
			return b.String(), s[i+1:], ""
		case c == '\\':
			i++
			if i == len(s) {
				return "", "", "unterminated quoted local part"
			}
			c = s[i]
			if c >= utf8.RuneSelf {
				return "", "", errNonASCIILocal
			}
			if c < ' ' || c > '~' {
				return "", "", fmt.Sprintf("quoted local part has an escaped control character %q", c)
			}
		case c >= utf8.RuneSelf:
			return "", "", errNonASCIILocal
		case c < ' ' || c > '~':
			return "", "", fmt.Sprintf("quoted local part has a control character %q", c)
		}
		// RFC 5321 allows angle brackets in a quoted local part, but a
		// receiver that finds the end of "RCPT TO:<...>" by the first '>'
		// would read the rest as ESMTP parameters; no real mailbox needs them.
		if c == '<' || c == '>' {
			return "", "", fmt.Sprintf("quoted local part has %q, which is refused so it cannot end the SMTP path early", c)
		}
		b.WriteByte(c)
	}
	return "", "", "unterminated quoted local part"
}

// quoteLocal writes a local part value in its shortest RFC 5321 form.
func quoteLocal(local string) string {
	if checkDotString(local) == "" {
		return local
	}
	var b strings.Builder
	b.Grow(len(local) + 2)
	b.WriteByte('"')
	for i := 0; i < len(local); i++ {
		if c := local[i]; c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(local[i])
	}
	b.WriteByte('"')
	return b.String()
}

// isAtext reports whether c is RFC 5322 atext (section 3.2.3), which is the
// same set as RFC 5321 atext.
func isAtext(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0
}

// normalizeDomain validates an RFC 5321 Domain or address-literal and returns
// its canonical lowercase ASCII form.
func normalizeDomain(d string) (string, error) {
	if d == "" {
		return "", errors.New("empty domain")
	}
	if d[0] == '[' {
		return normalizeAddressLiteral(d)
	}
	ascii := true
	for i := 0; i < len(d); i++ {
		if d[i] >= utf8.RuneSelf {
			ascii = false
			break
		}
	}
	if ascii {
		d = strings.ToLower(d)
	} else {
		if !utf8.ValidString(d) {
			return "", errors.New("domain is not valid UTF-8")
		}
		// UTS #46 processing: maps (case folds, NFC, width), checks the
		// labels and converts them to A-labels.
		a, err := idna.Lookup.ToASCII(d)
		if err != nil {
			return "", fmt.Errorf("internationalized domain: %w", err)
		}
		d = a
	}
	if err := checkDomainGrammar(d); err != nil {
		return "", err
	}
	return d, nil
}

// checkDomainGrammar checks an ASCII domain against RFC 5321 section 4.1.2
// (sub-domain = Let-dig [Ldh-str]) and the DNS length limits, and checks that
// every A-label is valid Punycode for an IDNA label.
func checkDomainGrammar(d string) error {
	if len(d) > maxDomain {
		return fmt.Errorf("domain is %d octets, more than %d", len(d), maxDomain)
	}
	labels := strings.Split(d, ".")
	if len(labels) < 2 {
		// A dotless domain would be looked up relative to the resolver's
		// search path or name a TLD's own mail server: never what a caller
		// means (RFC 7085).
		return errors.New("domain has a single label")
	}
	for _, l := range labels {
		if err := checkLabel(l); err != nil {
			return err
		}
	}
	// RFC 3696 section 2: a top-level domain is never all-numeric, which is
	// what keeps "a@192.0.2.1" from passing for an address literal.
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return errors.New("domain has an all-numeric top-level label; write an IP address as a literal like [192.0.2.1]")
	}
	return nil
}

func checkLabel(l string) error {
	switch {
	case l == "":
		return errors.New("domain has an empty label")
	case len(l) > maxLabel:
		return fmt.Errorf("domain label is %d octets, more than %d", len(l), maxLabel)
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Errorf("domain label %q starts or ends with a hyphen", l)
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return fmt.Errorf("domain has %q, which is not a letter, digit or hyphen", c)
		}
	}
	if strings.HasPrefix(l, "xn--") {
		if _, err := idna.Lookup.ToUnicode(l); err != nil {
			return fmt.Errorf("domain label %q is not a valid A-label: %w", l, err)
		}
	}
	return nil
}

// normalizeAddressLiteral handles the RFC 5321 section 4.1.3 forms
// "[IPv4]" and "[IPv6:addr]". General-address-literal tags other than IPv6
// have never been registered, so they are refused.
func normalizeAddressLiteral(d string) (string, error) {
	if len(d) < 3 || d[len(d)-1] != ']' {
		return "", errors.New("address literal is not enclosed in brackets")
	}
	inner := d[1 : len(d)-1]
	if len(inner) > 5 && strings.EqualFold(inner[:5], "IPv6:") {
		ip, err := netip.ParseAddr(inner[5:])
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return "", fmt.Errorf("address literal %q is not an IPv6 address", d)
		}
		return "[IPv6:" + ip.String() + "]", nil
	}
	ip, err := netip.ParseAddr(inner)
	if err != nil || !ip.Is4() {
		return "", fmt.Errorf("address literal %q is neither an IPv4 address nor IPv6:<address>", d)
	}
	return "[" + ip.String() + "]", nil
}

// AddressLiteralIP returns the IP address of a domain in the address-literal
// form NormalizeMailbox produces ("[192.0.2.1]" or "[IPv6:2001:db8::1]"), and
// false for an ordinary domain. Mail to an address literal goes to that host
// directly, without an MX lookup (RFC 5321 section 5.1).
func AddressLiteralIP(domain string) (netip.Addr, bool) {
	if domain == "" || domain[0] != '[' {
		return netip.Addr{}, false
	}
	canonical, err := normalizeAddressLiteral(domain)
	if err != nil {
		return netip.Addr{}, false
	}
	ip, err := netip.ParseAddr(strings.TrimPrefix(canonical[1:len(canonical)-1], "IPv6:"))
	if err != nil {
		return netip.Addr{}, false
	}
	return ip, true
}
