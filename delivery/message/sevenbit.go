package message

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/quotedprintable"
	"strings"

	"github.com/emersion/go-message/textproto"
)

// ErrEightBitHeader is returned by To7Bit for a message with a non-ASCII
// octet in a header, which it does not convert: the octets' charset is
// unknown, so they cannot be turned into RFC 2047 encoded-words that say
// the same thing, and a structured field (a filename parameter, an address)
// would need rules of its own (RFC 2231, RFC 6532).
var ErrEightBitHeader = errors.New("header has a non-ASCII octet")

// Has8Bit reports whether raw has an octet outside US-ASCII anywhere, header
// or body: what RFC 6152 calls 8-bit content, which may only be sent to a
// server that offers 8BITMIME.
func Has8Bit(raw []byte) bool {
	for _, c := range raw {
		if c >= 0x80 {
			return true
		}
	}
	return false
}

// To7Bit converts a message with 8-bit content to 7 bits for a server without
// 8BITMIME (RFC 6152 section 3). It walks the MIME structure: every leaf
// whose body holds an 8-bit octet is re-encoded, text as quoted-printable
// and anything else as base64 (RFC 2045 sections 6.7 and 6.8), and labelled
// so; multiparts and message/rfc822 parts are walked into and relabelled
// 7bit (RFC 2045 section 6.4). Everything else keeps its bytes, header
// fields included, except that preambles and epilogues of multiparts, which
// RFC 2046 section 5.1.1 says to ignore, are dropped. A message without MIME
// fields gets them as RFC 1428 describes: text/plain in the charset
// "unknown-8bit".
//
// It refuses (with an error wrapping ErrEightBitHeader) a header holding an
// 8-bit octet, and a body that claims to be quoted-printable or base64 yet
// holds one, since either cannot be converted without guessing.
//
// The result is what is sent, so a DKIM signature (RFC 6376) must be made
// over it, after the conversion.
func To7Bit(raw []byte) ([]byte, error) {
	var out bytes.Buffer
	out.Grow(len(raw) + len(raw)/2)
	if err := convertEntity(&out, raw, "message", true); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// convertEntity writes the 7-bit form of the entity raw (header, blank line,
// body) to w. top is set for a whole message, where missing MIME fields are
// added; where names the entity in errors.
func convertEntity(w *bytes.Buffer, raw []byte, where string, top bool) error {
	r := bytes.NewReader(raw)
	br := bufio.NewReader(r)
	h, err := textproto.ReadHeader(br)
	if err != nil {
		return fmt.Errorf("%s: read header: %w", where, err)
	}
	headerLen := len(raw) - r.Len() - br.Buffered()
	if Has8Bit(raw[:headerLen]) {
		return fmt.Errorf("%s: %w", where, ErrEightBitHeader)
	}
	body := raw[headerLen:]
	if !Has8Bit(body) {
		// Nothing to convert here or below.
		w.Write(raw)
		return nil
	}

	mediaType, params := "text/plain", map[string]string(nil)
	if ct := h.Get("Content-Type"); ct != "" {
		if mediaType, params, err = mime.ParseMediaType(ct); err != nil {
			return fmt.Errorf("%s: Content-Type: %w", where, err)
		}
	} else if top && !h.Has("Mime-Version") {
		// RFC 1428 section 3: 8-bit text of unknown charset in a message
		// without MIME is labelled unknown-8bit when it is encoded.
		h.Add("Content-Type", "text/plain; charset=unknown-8bit")
		h.Add("MIME-Version", "1.0")
	}

	switch {
	case strings.HasPrefix(mediaType, "multipart/"):
		return convertMultipart(w, h, body, params["boundary"], where)
	case mediaType == "message/rfc822":
		setEncoding(&h, "7bit")
		if err := textproto.WriteHeader(w, h); err != nil {
			return fmt.Errorf("%s: write header: %w", where, err)
		}
		return convertEntity(w, body, where+" (message/rfc822)", true)
	}

	switch enc := strings.ToLower(strings.TrimSpace(h.Get("Content-Transfer-Encoding"))); enc {
	case "", "7bit", "8bit", "binary":
		// The body is its own content: 7bit labels that lie are read as
		// 8bit.
	default:
		return fmt.Errorf("%s: body encoded as %q holds 8-bit octets", where, enc)
	}
	enc := "base64"
	if strings.HasPrefix(mediaType, "text/") {
		enc = "quoted-printable"
	}
	setEncoding(&h, enc)
	if err := textproto.WriteHeader(w, h); err != nil {
		return fmt.Errorf("%s: write header: %w", where, err)
	}
	if err := encodeBody(w, body, enc); err != nil {
		return fmt.Errorf("%s: encode body: %w", where, err)
	}
	return nil
}

// convertMultipart writes a multipart entity whose header is h, converting
// each of its parts. The delimiters are written as RFC 2046 section 5.1.1
// gives them: the CRLF before each belongs to the delimiter, not to the part
// before it.
func convertMultipart(w *bytes.Buffer, h textproto.Header, body []byte, boundary, where string) error {
	if boundary == "" {
		return fmt.Errorf("%s: multipart without a boundary", where)
	}
	setEncoding(&h, "")
	if err := textproto.WriteHeader(w, h); err != nil {
		return fmt.Errorf("%s: write header: %w", where, err)
	}
	mr := textproto.NewMultipartReader(bytes.NewReader(body), boundary)
	for i := 1; ; i++ {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			if i == 1 {
				return fmt.Errorf("%s: multipart without parts", where)
			}
			break
		}
		if err != nil {
			return fmt.Errorf("%s: part %d: %w", where, i, err)
		}
		var entity bytes.Buffer
		if err := textproto.WriteHeader(&entity, p.Header); err != nil {
			return fmt.Errorf("%s: part %d: %w", where, i, err)
		}
		if _, err := entity.ReadFrom(p); err != nil {
			return fmt.Errorf("%s: part %d: %w", where, i, err)
		}
		if i > 1 {
			w.WriteString("\r\n")
		}
		w.WriteString("--" + boundary + "\r\n")
		if err := convertEntity(w, entity.Bytes(), fmt.Sprintf("%s part %d", where, i), false); err != nil {
			return err
		}
	}
	w.WriteString("\r\n--" + boundary + "--\r\n")
	return nil
}

// setEncoding replaces the Content-Transfer-Encoding field; "" removes it,
// which means 7bit (RFC 2045 section 6.1).
func setEncoding(h *textproto.Header, enc string) {
	h.Del("Content-Transfer-Encoding")
	if enc != "" {
		h.Add("Content-Transfer-Encoding", enc)
	}
}

// encodeBody writes body in enc, ending with a CRLF.
func encodeBody(w *bytes.Buffer, body []byte, enc string) error {
	if enc == "quoted-printable" {
		// Line breaks in text stay hard line breaks (RFC 2045 section 6.7
		// rule 4); quotedprintable.Writer writes them as CRLF.
		qw := quotedprintable.NewWriter(w)
		if _, err := qw.Write(body); err != nil {
			return err
		}
		if err := qw.Close(); err != nil {
			return err
		}
		if !bytes.HasSuffix(body, []byte("\n")) {
			// A soft line break ends the last line without adding to
			// the content (RFC 2045 section 6.7 rule 5).
			w.WriteString("=\r\n")
		}
		return nil
	}
	// RFC 2045 section 6.8: lines of at most 76 characters.
	enc64 := base64.StdEncoding.EncodeToString(body)
	for len(enc64) > 76 {
		w.WriteString(enc64[:76])
		w.WriteString("\r\n")
		enc64 = enc64[76:]
	}
	w.WriteString(enc64)
	w.WriteString("\r\n")
	return nil
}
