package service

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/delivery/message"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// Request limits. They bound the work and storage one call can cause and
// keep every header line within RFC 5322 section 2.1.1's 998 octets.
const (
	maxTags             = 20
	maxTagLen           = 64 // characters
	maxMetadataKeys     = 20
	maxMetadataKeyLen   = 64  // characters
	maxMetadataValueLen = 512 // characters
	maxReplyTo          = 10
	maxNameLen          = 256 // characters of a display name
	maxSubjectLen       = 998 // characters; longer subjects are folded
	maxHeaders          = 50
	maxHeaderNameLen    = 64  // leaves room on the first line for folding
	maxHeaderValueLen   = 998 // bytes
	maxAttachments      = 100
	maxFilenameLen      = 255 // characters
	maxContentTypeLen   = 255 // bytes
	maxContentIDLen     = 250 // bytes
	maxIdempotencyKey   = 255 // bytes
	// maxScheduleAhead is how far send_at may lie in the future. Further
	// out, the sender's content, keys and intent are likely stale.
	maxScheduleAhead = 30 * 24 * time.Hour
)

// violations collects field problems in request order.
type violations struct {
	list []fieldViolation
}

func (v *violations) add(field, format string, args ...any) {
	v.list = append(v.list, fieldViolation{field: field, description: fmt.Sprintf(format, args...)})
}

func (v *violations) err() error {
	if len(v.list) == 0 {
		return nil
	}
	return &invalidArgumentError{violations: v.list}
}

// text checks a free-text string that may span lines: valid UTF-8 and at
// most maxLen characters (0: no limit).
func (v *violations) text(field, s string, maxLen int) bool {
	if !utf8.ValidString(s) {
		v.add(field, "must be valid UTF-8")
		return false
	}
	if maxLen > 0 && utf8.RuneCountInString(s) > maxLen {
		v.add(field, "must be at most %d characters", maxLen)
		return false
	}
	return true
}

// line checks a string that ends up in a header or a header-like place.
// A CR or LF there would let the caller end the header and write their own
// (header injection), so it is refused here rather than escaped later; other
// control characters have no business in a header either.
func (v *violations) line(field, s string, maxLen int) bool {
	if !v.text(field, s, maxLen) {
		return false
	}
	if strings.ContainsAny(s, "\r\n") {
		v.add(field, "must not contain CR or LF")
		return false
	}
	for _, r := range s {
		if r != '\t' && (r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0) {
			v.add(field, "must not contain control characters")
			return false
		}
	}
	return true
}

// mailbox validates and normalizes an address, returning the envelope
// form and its domain.
func (v *violations) mailbox(field, addr string) (envelope, domain string, ok bool) {
	if addr == "" {
		v.add(field, "is required")
		return "", "", false
	}
	if !v.line(field, addr, 0) {
		return "", "", false
	}
	envelope, domain, err := message.NormalizeMailbox(addr)
	if err != nil {
		v.add(field, "%v", err)
		return "", "", false
	}
	return envelope, domain, true
}

// recipient validates an envelope recipient. Address literals are refused:
// delivering to one would let any API caller make the workers connect to an
// arbitrary IP, internal networks included.
func (v *violations) recipient(field, addr string) (envelope, domain string, ok bool) {
	envelope, domain, ok = v.mailbox(field, addr)
	if !ok {
		return "", "", false
	}
	if _, literal := message.AddressLiteralIP(domain); literal {
		v.add(field, "address literals are not accepted as recipients; use a domain name")
		return "", "", false
	}
	return envelope, domain, true
}

// address validates a mailbox with its display name, returning the
// normalized form for headers.
func (v *violations) address(field string, a *posthastev1.Address) (message.Address, string, bool) {
	if a == nil {
		v.add(field+".address", "is required")
		return message.Address{}, "", false
	}
	nameOK := v.line(field+".name", a.GetName(), maxNameLen)
	envelope, domain, ok := v.mailbox(field+".address", a.GetAddress())
	return message.Address{Name: a.GetName(), Address: envelope}, domain, ok && nameOK
}

func (v *violations) tags(tags []string) {
	if len(tags) > maxTags {
		v.add("tags", "must have at most %d entries, got %d", maxTags, len(tags))
		return
	}
	for i, t := range tags {
		f := fmt.Sprintf("tags[%d]", i)
		if t == "" {
			v.add(f, "must not be empty")
			continue
		}
		v.line(f, t, maxTagLen)
	}
}

func (v *violations) metadata(md map[string]string) {
	if len(md) > maxMetadataKeys {
		v.add("metadata", "must have at most %d keys, got %d", maxMetadataKeys, len(md))
		return
	}
	for _, k := range slices.Sorted(maps.Keys(md)) {
		f := fmt.Sprintf("metadata[%q]", k)
		if k == "" {
			v.add(f, "key must not be empty")
		} else if v.line(f, k, 0) && utf8.RuneCountInString(k) > maxMetadataKeyLen {
			v.add(f, "key must be at most %d characters", maxMetadataKeyLen)
		}
		switch {
		case !utf8.ValidString(md[k]):
			v.add(f, "value must be valid UTF-8")
		case strings.ContainsRune(md[k], 0):
			// Valid UTF-8 and JSON, but PostgreSQL's jsonb cannot hold it.
			v.add(f, "value must not contain NUL characters")
		case utf8.RuneCountInString(md[k]) > maxMetadataValueLen:
			v.add(f, "value must be at most %d characters", maxMetadataValueLen)
		}
	}
}

// sendAt returns the requested delivery time, zero for "now".
func (v *violations) sendAt(ts *timestamppb.Timestamp, now time.Time) time.Time {
	if ts == nil {
		return time.Time{}
	}
	if err := ts.CheckValid(); err != nil {
		v.add("send_at", "is not a valid timestamp")
		return time.Time{}
	}
	t := ts.AsTime()
	if t.After(now.Add(maxScheduleAhead)) {
		v.add("send_at", "must be at most %d days in the future", int(maxScheduleAhead/(24*time.Hour)))
		return time.Time{}
	}
	return t
}

// idempotencyKey checks the key from the request field and the one from
// metadata (the Idempotency-Key HTTP header) and returns the one in effect.
func (v *violations) idempotencyKey(field, fromMetadata string) string {
	key := field
	if key == "" {
		key = fromMetadata
	} else if fromMetadata != "" && fromMetadata != field {
		v.add("idempotency_key", "differs from the Idempotency-Key header")
		return ""
	}
	if len(key) > maxIdempotencyKey {
		v.add("idempotency_key", "must be at most %d bytes", maxIdempotencyKey)
		return ""
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x20 || key[i] > 0x7e {
			v.add("idempotency_key", "must be printable ASCII")
			return ""
		}
	}
	return key
}

// envelopeRecipients gathers unique envelope recipients in order. Two
// entries are the same recipient when their envelope forms match (the
// domain is already lowercased by NormalizeMailbox); the first keeps its
// kind.
type envelopeRecipients struct {
	seen map[string]bool
	list []recipientEntry
}

type recipientEntry struct {
	address, domain, kind string
}

func (e *envelopeRecipients) add(address, domain, kind string) {
	if e.seen == nil {
		e.seen = make(map[string]bool)
	}
	if e.seen[address] {
		return
	}
	e.seen[address] = true
	e.list = append(e.list, recipientEntry{address: address, domain: domain, kind: kind})
}

// headerFieldName reports whether name is an RFC 5322 section 2.2
// field-name: printable US-ASCII except colon.
func headerFieldName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] < 33 || name[i] > 126 || name[i] == ':' {
			return false
		}
	}
	return true
}

// contentID reports whether id, without its optional angle brackets, can
// be a Content-ID (RFC 2392): printable ASCII without spaces or brackets.
// message.Build checks the finer grammar.
func contentID(id string) bool {
	if len(id) >= 2 && id[0] == '<' && id[len(id)-1] == '>' {
		id = id[1 : len(id)-1]
	}
	if id == "" || len(id) > maxContentIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 33 || id[i] > 126 || id[i] == '<' || id[i] == '>' {
			return false
		}
	}
	return true
}
