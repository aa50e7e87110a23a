package gateway

import (
	"mime"
	"net/http"
	"strings"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// mimeRFC822 is the media type of a whole mail message (RFC 2046 section
// 5.2.1).
const mimeRFC822 = "message/rfc822"

// rfc822Marshaler answers GetMessageRaw with the message itself, for
// clients that ask for message/rfc822: a developer can save the answer as
// an .eml file and open it in a mail client. Every other answer is JSON as
// usual, since only a raw message has an RFC 822 form.
type rfc822Marshaler struct {
	*jsonMarshaler
}

func (m rfc822Marshaler) ContentType(v any) string {
	if _, ok := v.(*posthastev1.GetMessageRawResponse); ok {
		return mimeRFC822
	}
	return m.jsonMarshaler.ContentType(v)
}

func (m rfc822Marshaler) Marshal(v any) ([]byte, error) {
	if r, ok := v.(*posthastev1.GetMessageRawResponse); ok {
		return r.GetRaw(), nil
	}
	return m.jsonMarshaler.Marshal(v)
}

// preferRFC822 rewrites an Accept header that lists message/rfc822 (with a
// non-zero q) to that type alone. grpc-gateway picks the answer's marshaler
// by an exact match of the whole Accept value, so "message/rfc822,
// */*;q=0.1" would otherwise get JSON.
func preferRFC822(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if acceptsRFC822(r.Header.Values("Accept")) {
			r.Header.Set("Accept", mimeRFC822)
		}
		next.ServeHTTP(w, r)
	})
}

func acceptsRFC822(values []string) bool {
	for _, v := range values {
		for part := range strings.SplitSeq(v, ",") {
			mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
			if err != nil || mt != mimeRFC822 {
				continue
			}
			if q := strings.TrimSpace(params["q"]); q == "0" || strings.HasPrefix(q, "0.") && strings.Trim(q[2:], "0") == "" {
				continue
			}
			return true
		}
	}
	return false
}
