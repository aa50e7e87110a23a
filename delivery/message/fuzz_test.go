package message_test

import (
	"bufio"
	"bytes"
	"errors"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/delivery/message"
)

// dotStuff is what the SMTP client puts on the wire for a message (RFC 5321
// section 4.5.2): a "." before every line that starts with one, then the
// end of data, "." on a line of its own.
func dotStuff(msg []byte) []byte {
	var out bytes.Buffer
	for line := range bytes.SplitAfterSeq(msg, []byte("\r\n")) {
		if len(line) > 0 && line[0] == '.' {
			out.WriteByte('.')
		}
		out.Write(line)
	}
	if !bytes.HasSuffix(out.Bytes(), []byte("\r\n")) {
		out.WriteString("\r\n")
	}
	out.WriteString(".\r\n")
	return out.Bytes()
}

// checkOneMessage fails the test unless msg, a message the checks passed, is one
// message on the wire: CRLF line ends only, no NUL, no line over 998
// octets, and once dot-stuffed, exactly one end of data, at the end. A
// bare CR or LF next to a dot is how the SMTP smuggling family
// (CVE-2023-51764 and relatives: "\n.\n", "\r.\r", "\n.\r\n") makes a
// receiver see the end of data, and a second message after it, where the
// sender saw none.
func checkOneMessage(t *testing.T, what string, msg []byte) {
	t.Helper()
	for i, c := range msg {
		switch {
		case c == 0:
			t.Fatalf("%s: NUL at %d", what, i)
		case c == '\n' && (i == 0 || msg[i-1] != '\r'):
			t.Fatalf("%s: bare LF at %d", what, i)
		case c == '\r' && (i+1 >= len(msg) || msg[i+1] != '\n'):
			t.Fatalf("%s: bare CR at %d", what, i)
		}
	}
	for n, line := range bytes.Split(msg, []byte("\r\n")) {
		if len(line) > 998 {
			t.Fatalf("%s: line %d is %d octets", what, n+1, len(line))
		}
	}
	wire := append([]byte("\r\n"), dotStuff(msg)...) // DATA's reply ends the line before
	if i := bytes.Index(wire, []byte("\r\n.\r\n")); i != len(wire)-5 {
		t.Fatalf("%s: end of data at %d of %d on the wire", what, i, len(wire))
	}
}

// smuggling are messages that end their data early on receivers that
// accept a bare CR or LF as a line end.
var smuggling = []string{
	"From: a@example.test\r\n\r\nhi\n.\nMAIL FROM:<x@evil.test>\r\n",
	"From: a@example.test\r\n\r\nhi\r.\rMAIL FROM:<x@evil.test>\r\n",
	"From: a@example.test\r\n\r\nhi\n.\r\nMAIL FROM:<x@evil.test>\r\n",
	"From: a@example.test\r\n\r\nhi\r\n.\nMAIL FROM:<x@evil.test>\r\n",
	"From: a@example.test\r\n\r\nhi\r\n.\rMAIL FROM:<x@evil.test>\r\n",
	"From: a@example.test\r\n\r\nhi\r.\r\nMAIL FROM:<x@evil.test>\r\n",
}

func TestCheckRawRefusesSmuggling(t *testing.T) {
	t.Parallel()
	for _, raw := range smuggling {
		if _, _, err := message.CheckRaw([]byte(raw), time.Now(), "example.test"); err == nil {
			t.Errorf("CheckRaw accepted %q", raw)
		}
	}
	// A lone "." line is a line like any other: dot-stuffing keeps it.
	out, _, err := message.CheckRaw([]byte("From: a@example.test\r\n\r\n.\r\n..\r\n.x\r\nend"), time.Now(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	checkOneMessage(t, "lone dot", out)
}

func FuzzCheckRaw(f *testing.F) {
	for _, s := range smuggling {
		f.Add([]byte(s))
	}
	for _, s := range []string{
		"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n",
		"From: a@example.test\r\n\r\n.\r\n",
		"From: a@example.test\r\n\r\n.",
		"From: a@example.test\r\nSubject: folded\r\n\tline\r\n\r\nx",
		"From: a@example.test\r\nSubject: x\r\n\r\n\x00",
		"From: a@example.test\r\nSubject:\r\n \r\n\r\nx",
		"From: a@example.test\r\nX: " + strings.Repeat("y", 1000) + "\r\n\r\nx",
		"From: a@example.test\r\nBcc: b@example.test\r\n\r\nx",
		"From: =?utf-8?q?a=0D=0ABcc:_x@evil.test?= <a@example.test>\r\n\r\nx",
	} {
		f.Add([]byte(s))
	}
	date := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, raw []byte) {
		out, info, err := message.CheckRaw(raw, date, "example.test")
		if err != nil {
			var fe *message.FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a FieldError", err)
			}
			return
		}
		checkOneMessage(t, "checked message", out)
		if info.MessageID == "" || len(info.FromAddresses) == 0 {
			t.Fatalf("info %+v", info)
		}
	})
}

// injections are values that try to end a header field early and start
// another, or the header section.
var injections = []string{
	"hi\r\nBcc: victim@evil.test",
	"hi\nBcc: victim@evil.test",
	"hi\rBcc: victim@evil.test",
	"hi\r\n\r\nbody",
	"hi\r\n.\r\nMAIL FROM:<x@evil.test>",
	"=?utf-8?q?hi=0D=0ABcc:_victim@evil.test?=",
	"hi\x00there",
	"hi\u2028Bcc: victim@evil.test",
	"hi\u0085Bcc: victim@evil.test",
	strings.Repeat("long ", 300) + "\r\nBcc: victim@evil.test",
}

// checkBuilt fails the test when a built message lets a value change the
// header: a field it did not ask for, or anything CheckRaw refuses.
func checkBuilt(t *testing.T, what string, raw []byte) {
	t.Helper()
	if _, _, err := message.CheckRaw(raw, time.Now(), "example.test"); err != nil {
		t.Fatalf("%s: the built message fails CheckRaw: %v", what, err)
	}
	checkOneMessage(t, what, raw)
	m, err := mail.ReadMessage(bufio.NewReader(bytes.NewReader(raw)))
	if err != nil {
		t.Fatalf("%s: built message does not parse: %v", what, err)
	}
	for name := range m.Header {
		switch name {
		case "From", "To", "Subject", "Date", "Message-Id", "Mime-Version", "Content-Type", "X-Custom", "Content-Transfer-Encoding":
		default:
			t.Fatalf("%s: unexpected header field %q:\n%s", what, name, raw)
		}
	}
}

func buildWith(subject, name, header, filename string) (message.Built, error) {
	spec := message.Spec{
		From:            message.Address{Name: name, Address: "ada@example.test"},
		To:              []message.Address{{Name: name, Address: "bob@example.test"}},
		Subject:         subject,
		Text:            "hello",
		Headers:         []message.Header{{Name: "X-Custom", Value: header}},
		MessageIDDomain: "example.test",
		Date:            time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC),
	}
	if filename != "" {
		spec.Attachments = []message.Attachment{{Filename: filename, ContentType: "text/plain", Content: []byte("x")}}
	}
	return message.Build(spec)
}

// TestHeaderInjection sends each injection through the display name, the
// subject, a custom header and an attachment's filename: each is refused
// or encoded, and no CR or LF of it reaches the wire.
func TestHeaderInjection(t *testing.T) {
	t.Parallel()
	for _, v := range injections {
		for _, tc := range []struct {
			field                           string
			subject, name, header, filename string
		}{
			{"subject", v, "Ada", "x", ""},
			{"display name", "hi", v, "x", ""},
			{"custom header", "hi", "Ada", v, ""},
			{"filename", "hi", "Ada", "x", v},
		} {
			built, err := buildWith(tc.subject, tc.name, tc.header, tc.filename)
			if err != nil {
				continue // refused: fine
			}
			checkBuilt(t, tc.field+" "+strings.ReplaceAll(v, "\r", `\r`), built.Raw)
		}
	}
}

func FuzzBuildHeaders(f *testing.F) {
	for _, v := range injections {
		f.Add(v, "Ada", "x", "a.txt")
		f.Add("hi", v, "x", "a.txt")
		f.Add("hi", "Ada", v, "a.txt")
		f.Add("hi", "Ada", "x", v)
	}
	f.Add("Grüße", "Jörg \"the\" <admin>", "värde", "résumé.pdf")
	f.Fuzz(func(t *testing.T, subject, name, header, filename string) {
		built, err := buildWith(subject, name, header, filename)
		if err != nil {
			var fe *message.FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a FieldError", err)
			}
			return
		}
		checkBuilt(t, "built", built.Raw)
	})
}
