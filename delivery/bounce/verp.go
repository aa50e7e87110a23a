package bounce

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base32"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"
)

// Errors Parse returns, wrapped with the reason. The listener refuses a
// recipient for any of them; ErrWrongDomain is the relay case.
var (
	// ErrWrongDomain means the address is not at the bounce domain.
	ErrWrongDomain = errors.New("not the bounce domain")
	// ErrMalformed means the local part is not prefix+token, or the token
	// does not decode to a token of a known version.
	ErrMalformed = errors.New("malformed bounce address")
	// ErrBadMAC means the token decodes but none of the secrets signed it:
	// it was forged, guessed or altered.
	ErrBadMAC = errors.New("bounce address signature does not verify")
)

// Token layout (before base32):
//
//	version (1 byte) | message id (16 bytes) | [recipient position (4 bytes, big endian)] | MAC (10 bytes)
//
// The version byte's low bit says whether a recipient position follows. A
// recipient UUID instead of the position would make the token 16+16+10 = 42
// bytes, 68 base32 characters, more than the 64 octets RFC 5321 section
// 4.5.3.1.1 allows a local part; the position (unique per message) needs 4.
const (
	tokenVersion  = 0x10 // high nibble: format 1
	flagRecipient = 0x01
	macLen        = 10 // HMAC-SHA256 truncated to 80 bits (RFC 2104 section 5 allows truncation to at least 80 bits)
	msgOnlyLen    = 1 + 16 + macLen
	withRcptLen   = 1 + 16 + 4 + macLen
	// maxLocalPart is RFC 5321 section 4.5.3.1.1's limit.
	maxLocalPart = 64
	// minSecretLen is the shortest secret accepted: 128 bits.
	minSecretLen = 16
)

// macLabel separates these MACs from any other use of the same secret.
const macLabel = "posthaste verp v1\x00"

// tokenEncoding is RFC 4648 base32 without padding. It is written in lower
// case and read in any case: the token sits in a local part, which some MTAs
// fold to lower case although RFC 5321 section 2.4 says not to.
var tokenEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// maxTokenLen is the length of the longest token (one with a recipient): 31
// bytes are 50 base32 characters.
const maxTokenLen = (withRcptLen*8 + 4) / 5

// RecipientRef names one recipient of a message by its position in the
// message's recipient list, which is unique per message. The zero value names
// no recipient: the token then names only the message, as for an SMTP
// transaction that carries several recipients.
type RecipientRef struct {
	// Position is the recipient's position within its message.
	Position uint32
	// Valid reports whether the reference names a recipient.
	Valid bool
}

// RecipientAt returns a reference to the recipient at position.
func RecipientAt(position uint32) RecipientRef {
	return RecipientRef{Position: position, Valid: true}
}

// Token is what a VERP address names.
type Token struct {
	// Message is the id of the message the bounce is about.
	Message uuid.UUID
	// Recipient is the recipient the bounce is about, when the message was
	// sent to that recipient alone in its SMTP transaction.
	Recipient RecipientRef
}

// VERP encodes and checks the variable envelope return paths (the MAIL FROM
// addresses) of outgoing mail, prefix+token@domain, so that a bounce sent
// to one names the message and recipient it is about. It is safe for
// concurrent use.
type VERP struct {
	domain  string
	prefix  string
	secrets [][]byte
}

// NewVERP returns a codec for addresses prefix+token@domain. prefix defaults
// to "b". The first secret signs new addresses and every secret verifies,
// so that a secret can be rotated while bounces for mail signed with the
// old one are still arriving (they come for days: RFC 5321 section 4.5.4.1
// suggests giving up after 4-5 days). Each secret must be at least 16 bytes.
func NewVERP(domain, prefix string, secrets [][]byte) (*VERP, error) {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if err := checkDomain(domain); err != nil {
		return nil, fmt.Errorf("verp domain: %w", err)
	}
	if prefix == "" {
		prefix = "b"
	}
	prefix = strings.ToLower(prefix)
	if max := maxLocalPart - 1 - maxTokenLen; len(prefix) > max {
		return nil, fmt.Errorf("verp prefix: %q is longer than %d characters, the room a 64-octet local part leaves", prefix, max)
	}
	for _, c := range prefix {
		// Letters, digits and '-' are safe in a dot-atom everywhere, and
		// no '+' so the separator stays unambiguous.
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return nil, fmt.Errorf("verp prefix: %q may hold only letters, digits, '-' and '_'", prefix)
		}
	}
	if len(secrets) == 0 {
		return nil, errors.New("verp secrets: at least one is required")
	}
	own := make([][]byte, len(secrets))
	for i, s := range secrets {
		if len(s) < minSecretLen {
			return nil, fmt.Errorf("verp secrets: secret %d is %d bytes, at least %d are required", i, len(s), minSecretLen)
		}
		own[i] = append([]byte(nil), s...)
	}
	return &VERP{domain: domain, prefix: prefix, secrets: own}, nil
}

func checkDomain(domain string) error {
	if domain == "" {
		return errors.New("must not be empty")
	}
	if len(domain) > 253 {
		return fmt.Errorf("%q is longer than 253 characters", domain)
	}
	for label := range strings.SplitSeq(domain, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("%q is not a domain name", domain)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("%q is not an ASCII domain name", domain)
			}
		}
	}
	return nil
}

// Domain returns the bounce domain, in lower case.
func (v *VERP) Domain() string { return v.domain }

// Address returns the envelope sender for mail about msg, naming rcpt when
// it is valid. The address is at most 64 octets in its local part.
func (v *VERP) Address(msg uuid.UUID, rcpt RecipientRef) string {
	n := msgOnlyLen
	if rcpt.Valid {
		n = withRcptLen
	}
	buf := make([]byte, 0, n)
	ver := byte(tokenVersion)
	if rcpt.Valid {
		ver |= flagRecipient
	}
	buf = append(buf, ver)
	buf = append(buf, msg[:]...)
	if rcpt.Valid {
		buf = binary.BigEndian.AppendUint32(buf, rcpt.Position)
	}
	buf = append(buf, mac(v.secrets[0], buf)...)
	return v.prefix + "+" + strings.ToLower(tokenEncoding.EncodeToString(buf)) + "@" + v.domain
}

// Parse checks addr (with or without angle brackets) and returns the token it
// carries. The domain and the token are compared without regard to case.
func (v *VERP) Parse(addr string) (Token, error) {
	addr = strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(addr), "<"), ">")
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return Token{}, fmt.Errorf("parse %q: %w: no domain", addr, ErrMalformed)
	}
	local, domain := addr[:at], strings.TrimSuffix(addr[at+1:], ".")
	if !strings.EqualFold(domain, v.domain) {
		return Token{}, fmt.Errorf("parse %q: %w", addr, ErrWrongDomain)
	}
	if len(local) > maxLocalPart {
		return Token{}, fmt.Errorf("parse %q: %w: local part longer than %d octets", addr, ErrMalformed, maxLocalPart)
	}
	prefix, enc, ok := strings.Cut(local, "+")
	if !ok || !strings.EqualFold(prefix, v.prefix) {
		return Token{}, fmt.Errorf("parse %q: %w: not %s+token", addr, ErrMalformed, v.prefix)
	}
	enc = strings.ToUpper(enc)
	raw, err := tokenEncoding.DecodeString(enc)
	if err != nil {
		return Token{}, fmt.Errorf("parse %q: %w: %w", addr, ErrMalformed, err)
	}
	// Base32 leaves a few spare bits in the last character; a token whose
	// spare bits differ decodes to the same bytes. Only the canonical
	// spelling is accepted, so an altered token never verifies.
	if tokenEncoding.EncodeToString(raw) != enc {
		return Token{}, fmt.Errorf("parse %q: %w: non-canonical encoding", addr, ErrMalformed)
	}
	if len(raw) == 0 || raw[0]&^flagRecipient != tokenVersion {
		return Token{}, fmt.Errorf("parse %q: %w: unknown token version", addr, ErrMalformed)
	}
	hasRcpt := raw[0]&flagRecipient != 0
	want := msgOnlyLen
	if hasRcpt {
		want = withRcptLen
	}
	if len(raw) != want {
		return Token{}, fmt.Errorf("parse %q: %w: token is %d bytes, want %d", addr, ErrMalformed, len(raw), want)
	}
	body, sum := raw[:want-macLen], raw[want-macLen:]
	if !v.verify(body, sum) {
		return Token{}, fmt.Errorf("parse %q: %w", addr, ErrBadMAC)
	}
	var tok Token
	copy(tok.Message[:], body[1:17])
	if hasRcpt {
		tok.Recipient = RecipientAt(binary.BigEndian.Uint32(body[17:21]))
	}
	return tok, nil
}

// verify checks sum against every secret, in constant time for each.
func (v *VERP) verify(body, sum []byte) bool {
	ok := false
	for _, s := range v.secrets {
		// Every secret is tried, so the time taken does not say which one
		// signed.
		if hmac.Equal(mac(s, body), sum) {
			ok = true
		}
	}
	return ok
}

func mac(secret, body []byte) []byte {
	h := hmac.New(sha256.New, secret)
	h.Write([]byte(macLabel))
	h.Write(body)
	return h.Sum(nil)[:macLen]
}
