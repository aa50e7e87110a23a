package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// requestBody wraps a request body to remember what went wrong with it, so
// the error handler can answer 413 or name the bad JSON field: grpc-gateway
// flattens decoding errors into a status string before the handler sees
// them.
type requestBody struct {
	io.ReadCloser
	tooLarge  bool
	decodeErr *errorDetail
}

func (b *requestBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		b.tooLarge = true
	}
	return n, err
}

type bodyKey struct{}

func bodyFrom(ctx context.Context) *requestBody {
	b, _ := ctx.Value(bodyKey{}).(*requestBody)
	return b
}

// limitBody refuses bodies over the limit: at once when Content-Length
// says so, else when reading crosses it.
func (g *gateway) limitBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > g.maxBodyBytes {
			g.writeError(w, r, g.bodyTooLarge())
			return
		}
		b := &requestBody{ReadCloser: http.MaxBytesReader(w, r.Body, g.maxBodyBytes)}
		r.Body = b
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), bodyKey{}, b)))
	})
}

func (g *gateway) bodyTooLarge() errorDetail {
	return errorDetail{
		Code:    http.StatusRequestEntityTooLarge,
		Status:  statusName(codes.ResourceExhausted),
		Message: "request body larger than " + strconv.FormatInt(g.maxBodyBytes, 10) + " bytes",
	}
}

// jsonMarshaler is grpc-gateway's protojson marshaler with a stricter
// decoder: exactly one JSON value per body, and errors recorded in a form
// the error handler can show.
type jsonMarshaler struct {
	runtime.JSONPb
}

// NewDecoder returns a decoder for a request body.
func (m *jsonMarshaler) NewDecoder(r io.Reader) runtime.Decoder {
	return runtime.DecoderFunc(func(v any) error {
		err := m.decode(r, v)
		if err == nil || errors.Is(err, io.EOF) {
			// io.EOF (empty body) is how the generated code learns there is
			// nothing to decode; it must pass through unchanged.
			return err
		}
		d := decodeErrorDetail(err)
		if b, ok := r.(*requestBody); ok {
			b.decodeErr = &d
		}
		return errors.New(d.Message)
	})
}

func (m *jsonMarshaler) decode(r io.Reader, v any) error {
	// Almost every body is one well-formed JSON object of valid UTF-8 that
	// protojson takes as it is (it refuses trailing data itself), so that
	// is tried first. json.Valid, a scan that allocates nothing, comes
	// first because protojson is more lenient than JSON in one place (it
	// reads 1e as 1). Only a body one of them refuses goes the long way
	// below, which finds what exactly is wrong and where; the answer is
	// the same either way.
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	pm, isMessage := v.(proto.Message)
	if first := bytes.TrimLeft(body, " \t\r\n"); isMessage && len(first) > 0 && first[0] == '{' && utf8.Valid(body) && json.Valid(body) {
		// protojson itself, not JSONPb.Unmarshal: that one scans the body
		// with encoding/json first and ignores what follows the first value.
		if err := m.UnmarshalOptions.Unmarshal(body, pm); err == nil {
			return nil
		}
		proto.Reset(pm)
	}
	return m.decodeStrictly(bytes.NewReader(body), v)
}

// decodeStrictly decodes a body that the fast path refused, naming the
// problem: trailing data, not an object, invalid UTF-8 by field, a bad
// value by field.
func (m *jsonMarshaler) decodeStrictly(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return err
	}
	// A second value or trailing garbage is a malformed body, not something
	// to ignore; reading to the end also makes the size limit apply to it.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return errTrailingData
	}
	if len(bytes.TrimSpace(raw)) > 0 && raw[0] != '{' {
		return errNotObject
	}
	// proto3 strings must be valid UTF-8. protojson refuses invalid bytes
	// with an error that names no field, so they are looked for first and
	// reported by field, as the service reports its own findings.
	//
	// Over gRPC such a request never reaches the service: grpc-go's codec
	// refuses a proto3 string that is not valid UTF-8 while unmarshalling
	// the request, before any interceptor or handler runs, and answers
	// codes.Internal "grpc: error unmarshalling request". A server cannot
	// change that. The service checks UTF-8 all the same, in case a request
	// ever reaches it another way.
	var md protoreflect.MessageDescriptor
	if pm, ok := v.(proto.Message); ok {
		md = pm.ProtoReflect().Descriptor()
	}
	if bad, valid := checkUTF8(raw, md); !valid {
		return &invalidUTF8Error{violations: bad}
	}
	if err := m.JSONPb.Unmarshal(raw, v); err != nil {
		// A value of the wrong kind for its field (an object for a list,
		// a bad timestamp) gets an error that gives only its position, and
		// one in a nested message or an unknown field names only the last
		// part of the path.
		if off, ok := protojsonOffset(raw, err.Error()); ok {
			if field := fieldAt(raw, md, off); field != "" {
				return &badValueError{field: field, err: err}
			}
		}
		return err
	}
	return nil
}

// badValueError is a value or a field name protojson refused, with the
// path of the field.
type badValueError struct {
	field string
	err   error
}

func (e *badValueError) Error() string { return e.err.Error() }

// positionRE finds the position protojson puts in its errors: "(line
// 1:17)", the column counted in characters from 1.
var positionRE = regexp.MustCompile(`\(line (\d+):(\d+)\)`)

// protojsonOffset turns the position in a protojson error into a byte
// offset in body.
func protojsonOffset(body []byte, msg string) (int64, bool) {
	m := positionRE.FindStringSubmatch(msg)
	if m == nil {
		return 0, false
	}
	line, err1 := strconv.Atoi(m[1])
	col, err2 := strconv.Atoi(m[2])
	if err1 != nil || err2 != nil || line < 1 || col < 1 {
		return 0, false
	}
	off := 0
	for ; line > 1; line-- {
		i := bytes.IndexByte(body[off:], '\n')
		if i < 0 {
			return 0, false
		}
		off += i + 1
	}
	for ; col > 1; col-- {
		if off >= len(body) || body[off] == '\n' {
			return 0, false
		}
		_, size := utf8.DecodeRune(body[off:])
		off += size
	}
	return int64(off), true
}

// invalidUTF8Error is a body with strings that are not valid UTF-8.
// violations is empty when none of them can be named (a field name at the
// top level).
type invalidUTF8Error struct {
	violations []fieldViolation
}

func (e *invalidUTF8Error) Error() string {
	return "request body is not valid UTF-8"
}

var (
	errTrailingData = errors.New("unexpected data after the JSON object")
	errNotObject    = errors.New("the request body must be a JSON object")
)

var (
	// protojson's messages (after a "proto:" prefix whose spacing varies on
	// purpose) name the field in these two forms.
	unknownFieldRE = regexp.MustCompile(`unknown field "([^"]+)"`)
	badValueRE     = regexp.MustCompile(`invalid value for [a-z0-9 ]+ field ([A-Za-z0-9_]+):`)
)

// decodeErrorDetail describes a malformed body, naming the field when the
// decoder said which it was.
func decodeErrorDetail(err error) errorDetail {
	d := errorDetail{Code: http.StatusBadRequest, Status: statusName(codes.InvalidArgument)}
	var mbe *http.MaxBytesError
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	var utf *invalidUTF8Error
	switch {
	case errors.As(err, &mbe):
		d.Code, d.Status = http.StatusRequestEntityTooLarge, statusName(codes.ResourceExhausted)
		d.Message = "request body larger than " + strconv.FormatInt(mbe.Limit, 10) + " bytes"
		return d
	case errors.Is(err, os.ErrDeadlineExceeded):
		// The server's read deadline passed while the body was still
		// arriving (http.Server.ReadTimeout).
		d.Code, d.Status = http.StatusRequestTimeout, statusName(codes.DeadlineExceeded)
		d.Message = "request body not received in time"
		return d
	case errors.As(err, &utf):
		if len(utf.violations) == 0 {
			d.Message = "malformed JSON body: a field name is not valid UTF-8"
			return d
		}
		return invalidArgument(utf.violations)
	case errors.As(err, &syn):
		d.Message = fmt.Sprintf("malformed JSON body at byte %d: %v", syn.Offset, syn)
		return d
	case errors.As(err, &typ), errors.Is(err, errTrailingData), errors.Is(err, errNotObject), errors.Is(err, io.ErrUnexpectedEOF):
		d.Message = "malformed JSON body: " + err.Error()
		return d
	}
	msg := strings.TrimLeftFunc(strings.TrimPrefix(err.Error(), "proto:"), unicode.IsSpace)
	d.Message = "malformed JSON body: " + msg
	var bv *badValueError
	isUnknown := unknownFieldRE.FindStringSubmatch(msg)
	switch {
	case errors.As(err, &bv):
		// Located in the body: the whole path, to[1].address.
		description := "invalid value for this field's type"
		if isUnknown != nil {
			description = "unknown field"
		}
		d.Message = "malformed JSON body: " + bv.field + ": " + msg
		d.FieldViolations = []fieldViolation{{Field: bv.field, Description: description}}
	case isUnknown != nil:
		d.FieldViolations = []fieldViolation{{Field: isUnknown[1], Description: "unknown field"}}
	default:
		if m := badValueRE.FindStringSubmatch(msg); m != nil {
			d.FieldViolations = []fieldViolation{{Field: snakeCase(m[1]), Description: "invalid value for this field's type"}}
		}
	}
	return d
}

// snakeCase turns protojson's JSON names (contentType) back into the proto
// names the API uses (content_type).
func snakeCase(s string) string {
	var b strings.Builder
	for i, r := range s {
		if unicode.IsUpper(r) {
			if i > 0 {
				b.WriteByte('_')
			}
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}
