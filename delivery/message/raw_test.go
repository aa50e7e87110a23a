package message_test

import (
	"bytes"
	"errors"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/delivery/message"
)

// lines joins header and body lines with CRLF and ends the message with one.
func lines(ls ...string) []byte {
	return []byte(strings.Join(ls, "\r\n") + "\r\n")
}

var checkNow = time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)

func TestCheckRawComplete(t *testing.T) {
	t.Parallel()
	raw := lines(
		"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.test>",
		"To: rcpt@example.test",
		"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from",
		" a folded line",
		"Date: Mon, 04 May 2026 10:00:00 +0200",
		"Message-ID: <abc.123@example.test>",
		"MIME-Version: 1.0",
		"Content-Type: text/plain; charset=utf-8",
		"Content-Transfer-Encoding: 8bit",
		"",
		"Grüße, "+strings.Repeat("x", 998-len("Grüße, ")), // the longest allowed line
		"",
	)
	out, info, err := message.CheckRaw(raw, checkNow, "mail.example.test")
	if err != nil {
		t.Fatalf("CheckRaw: %v", err)
	}
	if !bytes.Equal(out, raw) || &out[0] != &raw[0] {
		t.Errorf("complete message was copied or changed")
	}
	want := message.RawInfo{
		MessageID: "<abc.123@example.test>",
		From:      "Jörg Müller <joerg@example.test>",
		Subject:   "Grüße from a folded line",
		// Author domains, for the DKIM and verified-domain checks.
		FromDomains:   []string{"example.test"},
		FromAddresses: []string{"joerg@example.test"},
	}
	if !reflect.DeepEqual(info, want) {
		t.Errorf("info = %+v, want %+v", info, want)
	}
}

func TestCheckRawAddsFields(t *testing.T) {
	t.Parallel()
	idRE := regexp.MustCompile(`^<[A-Z2-7]{26}@mail\.example\.test>$`)
	tests := []struct {
		name                  string
		raw                   []byte
		dateAdded, idAdded    bool
		crlfAdded             bool
		wantMessageID         string
		wantFrom, wantSubject string
	}{
		{
			name:          "missing date",
			raw:           lines("From: a@example.test", "Message-ID: <x@example.test>", "Subject: hi", "", "body"),
			dateAdded:     true,
			wantMessageID: "<x@example.test>",
			wantFrom:      "a@example.test", wantSubject: "hi",
		},
		{
			name:     "missing message id",
			raw:      lines("Date: Mon, 04 May 2026 10:00:00 +0200", "From: \"A, B\" <a@example.test>", "", "body"),
			idAdded:  true,
			wantFrom: "A, B <a@example.test>",
		},
		{
			name:      "missing both",
			raw:       lines("From: a@example.test", "To: b@example.test", "", "body"),
			dateAdded: true, idAdded: true,
			wantFrom: "a@example.test",
		},
		{
			name:      "header only",
			raw:       lines("From: a@example.test"),
			dateAdded: true, idAdded: true,
			wantFrom: "a@example.test",
		},
		{
			name:          "no final CRLF",
			raw:           []byte("From: a@example.test\r\nDate: Mon, 04 May 2026 10:00:00 +0200\r\nMessage-ID: <x@example.test>\r\n\r\nbody"),
			crlfAdded:     true,
			wantMessageID: "<x@example.test>",
			wantFrom:      "a@example.test",
		},
		{
			name:      "several From mailboxes with Sender",
			raw:       lines("From: a@example.test, B <b@example.test>", "Sender: a@example.test", "", "body"),
			dateAdded: true, idAdded: true,
			wantFrom: "a@example.test, B <b@example.test>",
		},
		{
			name:      "unknown charset subject",
			raw:       lines("From: a@example.test", "Subject: =?x-unknown?q?abc?=", "", "body"),
			dateAdded: true, idAdded: true,
			wantFrom: "a@example.test", wantSubject: "=?x-unknown?q?abc?=",
		},
		{
			name: "multipart",
			raw: lines("From: a@example.test", "MIME-Version: 1.0", `Content-Type: multipart/alternative; boundary="b"`, "",
				"--b", "Content-Type: text/plain", "", "text", "--b", "Content-Type: text/html", "", "<p>html</p>", "--b--"),
			dateAdded: true, idAdded: true,
			wantFrom: "a@example.test",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			orig := bytes.Clone(tt.raw)
			out, info, err := message.CheckRaw(tt.raw, checkNow, "mail.example.test")
			if err != nil {
				t.Fatalf("CheckRaw: %v", err)
			}
			if !bytes.Equal(tt.raw, orig) {
				t.Errorf("CheckRaw modified its input")
			}
			checkWire(t, out)
			if info.DateAdded != tt.dateAdded || info.MessageIDAdded != tt.idAdded {
				t.Errorf("DateAdded, MessageIDAdded = %v, %v; want %v, %v", info.DateAdded, info.MessageIDAdded, tt.dateAdded, tt.idAdded)
			}
			if info.From != tt.wantFrom || info.Subject != tt.wantSubject {
				t.Errorf("From, Subject = %q, %q; want %q, %q", info.From, info.Subject, tt.wantFrom, tt.wantSubject)
			}

			// The original bytes follow the prepended fields unchanged.
			body := tt.raw
			if tt.crlfAdded {
				body = append(bytes.Clone(tt.raw), '\r', '\n')
			}
			if !bytes.HasSuffix(out, body) {
				t.Fatalf("output does not end with the original message:\n%s", out)
			}
			var wantPrefix string
			if tt.dateAdded {
				wantPrefix += "Date: Wed, 06 May 2026 07:08:09 +0000\r\n"
			}
			if tt.idAdded {
				if !idRE.MatchString(info.MessageID) {
					t.Errorf("MessageID = %q", info.MessageID)
				}
				wantPrefix += "Message-ID: " + info.MessageID + "\r\n"
			} else if info.MessageID != tt.wantMessageID {
				t.Errorf("MessageID = %q, want %q", info.MessageID, tt.wantMessageID)
			}
			if got := string(out[:len(out)-len(body)]); got != wantPrefix {
				t.Errorf("prepended %q, want %q", got, wantPrefix)
			}

			h := parse(t, out).header
			if d, err := h.Date(); err != nil || (tt.dateAdded && !d.Equal(checkNow)) {
				t.Errorf("Date = %v, %v", d, err)
			}
			if id, err := h.MessageID(); err != nil || "<"+id+">" != info.MessageID {
				t.Errorf("Message-ID = %q, %v; info says %q", id, err, info.MessageID)
			}

			// A checked message passes again unchanged.
			out2, info2, err := message.CheckRaw(out, checkNow, "mail.example.test")
			if err != nil || !bytes.Equal(out2, out) || info2.DateAdded || info2.MessageIDAdded || info2.MessageID != info.MessageID {
				t.Errorf("second CheckRaw = %+v, %v; want the message unchanged", info2, err)
			}
		})
	}
}

func TestCheckRawRefuses(t *testing.T) {
	t.Parallel()
	const (
		from = "From: a@example.test"
		date = "Date: Mon, 04 May 2026 10:00:00 +0200"
	)
	tests := []struct {
		name string
		raw  []byte
	}{
		{"empty", nil},
		{"bare LF endings", []byte("From: a@example.test\nDate: Mon, 04 May 2026 10:00:00 +0200\n\nbody\n")},
		{"bare LF in body", []byte("From: a@example.test\r\n\r\nbody\nmore\r\n")},
		{"bare LF as first octet", []byte("\nFrom: a@example.test\r\n\r\nbody\r\n")},
		{"bare CR in header", []byte("From: a@example.test\rBcc: x@example.test\r\n\r\nbody\r\n")},
		{"bare CR in body", []byte("From: a@example.test\r\n\r\nbody\rmore\r\n")},
		{"CR at the end", []byte("From: a@example.test\r\n\r\nbody\r")},
		{"line of 999 octets", lines(from, "", strings.Repeat("x", 999))},
		{"header line of 999 octets", lines(from, "X-Long: "+strings.Repeat("x", 991), "", "body")},
		{"last line of 999 octets without CRLF", []byte(from + "\r\n\r\n" + strings.Repeat("x", 999))},
		{"NUL in body", lines(from, "", "a\x00b")},
		{"8-bit header", lines(from, "Subject: Grüße", "", "body")},
		{"no From", lines(date, "To: b@example.test", "", "body")},
		{"empty From", lines("From: ", date, "", "body")},
		{"group From", lines("From: undisclosed:;", date, "", "body")},
		{"unparsable From", lines("From: not an address", date, "", "body")},
		{"From with dotless domain", lines("From: a@localhost", date, "", "body")},
		{"From with injection", lines("From: <a@example.test> NOTIFY=SUCCESS", date, "", "body")},
		{"two From fields", lines(from, "From: b@example.test", date, "", "body")},
		{"two Subject fields", lines(from, "Subject: a", "Subject: b", "", "body")},
		{"two Date fields", lines(from, date, date, "", "body")},
		{"two Message-ID fields", lines(from, "Message-ID: <a@example.test>", "Message-ID: <b@example.test>", "", "body")},
		{"two To fields", lines(from, "To: a@example.test", "To: b@example.test", "", "body")},
		{"several From without Sender", lines("From: a@example.test, b@example.test", "", "body")},
		{"Bcc field", lines(from, "Bcc: hidden@example.test", "", "body")},
		{"lowercase bcc field", lines(from, "bcc: hidden@example.test", "", "body")},
		{"bad Date", lines(from, "Date: yesterday", "", "body")},
		{"bad Message-ID", lines(from, "Message-ID: no-brackets", "", "body")},
		{"header line without colon", lines(from, "not a header", "", "body")},
		{"continuation first", lines(" folded", from, "", "body")},
		{"multipart without close delimiter", lines(from, `Content-Type: multipart/mixed; boundary="b"`, "",
			"--b", "Content-Type: text/plain", "", "text")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			out, info, err := message.CheckRaw(tt.raw, checkNow, "mail.example.test")
			if err == nil {
				t.Fatalf("CheckRaw accepted it: %+v\n%s", info, out)
			}
			if fe := asFieldError(t, err); fe.Field != "raw" {
				t.Errorf("field = %q, want raw", fe.Field)
			}
			if out != nil {
				t.Errorf("output returned with error %v", err)
			}
		})
	}
}

func TestCheckRawMessageIDDomain(t *testing.T) {
	t.Parallel()
	raw := lines("From: a@example.test", "", "body")
	_, _, err := message.CheckRaw(raw, checkNow, "")
	var fe *message.FieldError
	if err == nil || errors.As(err, &fe) {
		t.Errorf("missing Message-ID and no domain: error %v, want a non-field error", err)
	}
	// With a Message-ID present the domain is not needed.
	raw = lines("From: a@example.test", "Message-ID: <x@example.test>", "", "body")
	if _, _, err := message.CheckRaw(raw, checkNow, ""); err != nil {
		t.Errorf("CheckRaw: %v", err)
	}
}

// TestCheckRawAcceptsBuilt ties the two halves together: whatever Build
// makes, CheckRaw accepts unchanged.
func TestCheckRawAcceptsBuilt(t *testing.T) {
	t.Parallel()
	s := spec()
	s.From.Name = "Jörg, \"the\" Müller"
	s.Subject = "Grüße " + strings.Repeat("ü", 300)
	s.HTML = "<p>" + strings.Repeat("y", 3000) + "</p>"
	s.Attachments = []message.Attachment{
		{Filename: "a.bin", Content: randomBytes(10_000, 4)},
		{ContentType: "image/png", ContentID: "img", Content: randomBytes(100, 5)},
	}
	b, err := message.Build(s)
	if err != nil {
		t.Fatal(err)
	}
	out, info, err := message.CheckRaw(b.Raw, checkNow, "other.example.test")
	if err != nil {
		t.Fatalf("CheckRaw: %v", err)
	}
	if !bytes.Equal(out, b.Raw) || info.DateAdded || info.MessageIDAdded {
		t.Errorf("CheckRaw changed a built message: %+v", info)
	}
	if info.MessageID != b.MessageID || info.Subject != s.Subject || info.From != s.From.Name+" <sender@example.test>" {
		t.Errorf("info = %+v", info)
	}
}

func BenchmarkCheckRaw(b *testing.B) {
	s := spec()
	s.Attachments = []message.Attachment{{Filename: "data.bin", Content: randomBytes(1<<20, 8)}}
	built, err := message.Build(s)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(built.Raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := message.CheckRaw(built.Raw, checkNow, "mail.example.test"); err != nil {
			b.Fatal(err)
		}
	}
}
