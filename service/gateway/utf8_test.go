package gateway_test

import (
	"net/http"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// bad is a string that is not valid UTF-8, for writing into JSON bodies.
const bad = "a\xffb"

func TestInvalidUTF8OverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	const (
		from = `"from":{"address":"ada@example.test"}`
		to   = `"to":[{"address":"bob@example.test"}]`
		text = `"text":"Hello."`
	)
	send := func(fields ...string) string { return "{" + strings.Join(fields, ",") + "}" }
	for _, tc := range []struct {
		name, path, body string
		fields           []string
	}{
		{"subject", "/v1/messages", send(from, to, text, `"subject":"`+bad+`"`), []string{"subject"}},
		{"to[1].name", "/v1/messages", send(from, text,
			`"to":[{"address":"bob@example.test"},{"address":"eve@example.test","name":"`+bad+`"}]`),
			[]string{"to[1].name"}},
		{"JSON names", "/v1/messages", send(from, to, text, `"replyTo":[{"address":"`+bad+`@example.test"}]`),
			[]string{"reply_to[0].address"}},
		{"attachment filename", "/v1/messages", send(from, to, text,
			`"attachments":[{"filename":"`+bad+`.pdf","content":"aGk="}]`), []string{"attachments[0].filename"}},
		{"header value", "/v1/messages", send(from, to, text, `"headers":[{"name":"X-A","value":"`+bad+`"}]`),
			[]string{"headers[0].value"}},
		{"tag", "/v1/messages", send(from, to, text, `"tags":["ok","`+bad+`"]`), []string{"tags[1]"}},
		{"metadata value", "/v1/messages", send(from, to, text, `"metadata":{"k":"`+bad+`"}`), []string{`metadata["k"]`}},
		{"metadata key", "/v1/messages", send(from, to, text, `"metadata":{"`+bad+`":"v"}`), []string{"metadata"}},
		{"several", "/v1/messages", send(from, text, `"subject":"`+bad+`"`,
			`"to":[{"address":"bob@example.test"},{"address":"eve@example.test","name":"`+bad+`"}]`),
			[]string{"subject", "to[1].name"}},
		{"unknown field", "/v1/messages", send(from, to, text, `"subjekt":"`+bad+`"`), []string{"subjekt"}},
		{"field name", "/v1/messages", send(from, to, text, `"`+bad+`":"x"`), nil},
		{"raw recipient", "/v1/messages:sendRaw",
			`{"raw":"RnJvbTogYUBleGFtcGxlLnRlc3QNCg0KaGkNCg==","envelope_from":"a@example.test","recipients":["b@example.test","` + bad + `@example.test"]}`,
			[]string{"recipients[1]"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, http.MethodPost, tc.path, strings.NewReader(tc.body))
			if r.code != http.StatusBadRequest {
				t.Fatalf("HTTP %d %s, want 400", r.code, r.body)
			}
			re := decodeError(t, r)
			if re.Error.Status != "INVALID_ARGUMENT" || !slices.Equal(re.fields(), tc.fields) {
				t.Errorf("%s, want fields %q", r.body, tc.fields)
			}
			for _, v := range re.Error.FieldViolations {
				if !strings.Contains(v.Description, "UTF-8") {
					t.Errorf("%s: description %q does not say UTF-8", v.Field, v.Description)
				}
			}
			if len(tc.fields) > 0 && !strings.HasPrefix(re.Error.Message, "invalid "+tc.fields[0]+": ") {
				t.Errorf("message %q does not name %s", re.Error.Message, tc.fields[0])
			}
		})
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages from invalid requests", m)
	}
}

// rawCodec puts bytes on the wire as they are: a proto marshaler refuses to
// write a string that is not valid UTF-8, which is what this must send.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)   { return v.([]byte), nil }
func (rawCodec) Unmarshal(_ []byte, _ any) error { return nil }
func (rawCodec) Name() string                    { return "proto" }

// Over gRPC, grpc-go refuses a request with invalid UTF-8 in a proto3
// string before the service sees it. This pins that behaviour, which the
// REST gateway's own check (see body.go) relies on being true.
func TestInvalidUTF8OverGRPCIsRefusedByGRPC(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	req := validRequest()
	req.Subject = ""
	b, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	b = protowire.AppendTag(b, 6, protowire.BytesType) // subject
	b = protowire.AppendString(b, bad)

	var resp []byte
	err = e.conn.Invoke(e.grpcCtx(t), posthastev1.MailService_SendMessage_FullMethodName, b, &resp,
		grpc.ForceCodec(rawCodec{}))
	st := status.Convert(err)
	if st.Code() != codes.Internal || !strings.Contains(st.Message(), "unmarshal") {
		t.Errorf("got %v, want Internal from grpc-go's unmarshalling", err)
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
}
