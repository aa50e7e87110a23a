package message_test

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message/mail"

	"github.com/posthaste/posthaste/delivery/message"
)

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestBuildStructure(t *testing.T) {
	t.Parallel()

	const (
		text = "Plain body.\nSecond line with a = sign and Grüße.\n"
		html = "<p>HTML body with <img src=\"cid:logo@example.test\"> and Grüße.</p>\n"
	)
	pdf := message.Attachment{Filename: "report.pdf", ContentType: "application/pdf", Content: randomBytes(70_000, 1)}
	logo := message.Attachment{Filename: "logo.png", ContentType: "image/png", ContentID: "<logo@example.test>", Content: randomBytes(5_000, 2)}
	banner := message.Attachment{ContentType: "image/gif", ContentID: "banner", Content: randomBytes(300, 3)}

	tests := []struct {
		name        string
		text, html  string
		attachments []message.Attachment
		shape       string
		related     []string
	}{
		{name: "text only", text: text, shape: "text/plain"},
		{name: "html only", html: html, shape: "text/html"},
		{name: "text and html", text: text, html: html, shape: "multipart/alternative[text/plain,text/html]"},
		{
			name: "text with attachment", text: text, attachments: []message.Attachment{pdf},
			shape: "multipart/mixed[text/plain,application/pdf]",
		},
		{
			name: "html with attachment", html: html, attachments: []message.Attachment{pdf},
			shape: "multipart/mixed[text/html,application/pdf]",
		},
		{
			name: "text and html with attachment", text: text, html: html, attachments: []message.Attachment{pdf},
			shape: "multipart/mixed[multipart/alternative[text/plain,text/html],application/pdf]",
		},
		{
			name: "html with inline parts", html: html, attachments: []message.Attachment{logo, banner},
			shape:   "multipart/related[text/html,image/png,image/gif]",
			related: []string{"text/html"},
		},
		{
			name: "text and html with inline part", text: text, html: html, attachments: []message.Attachment{logo},
			shape:   "multipart/related[multipart/alternative[text/plain,text/html],image/png]",
			related: []string{"multipart/alternative"},
		},
		{
			name: "everything", text: text, html: html, attachments: []message.Attachment{pdf, logo, pdf, banner},
			shape:   "multipart/mixed[multipart/related[multipart/alternative[text/plain,text/html],image/png,image/gif],application/pdf,application/pdf]",
			related: []string{"multipart/alternative"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := spec()
			s.Text, s.HTML, s.Attachments = tt.text, tt.html, tt.attachments
			b, err := message.Build(s)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkWire(t, b.Raw)
			p := parse(t, b.Raw)
			if p.shape != tt.shape {
				t.Errorf("structure = %s, want %s", p.shape, tt.shape)
			}
			if !slices.Equal(p.related, tt.related) {
				t.Errorf("multipart/related type = %q, want %q", p.related, tt.related)
			}
			if got := p.header.Get("Mime-Version"); got != "1.0" {
				t.Errorf("MIME-Version = %q", got)
			}

			// Leaves come back in order: bodies first, then inline parts,
			// then attachments.
			var want []message.Attachment
			for _, a := range tt.attachments {
				if a.ContentID != "" {
					want = append(want, a)
				}
			}
			for _, a := range tt.attachments {
				if a.ContentID == "" {
					want = append(want, a)
				}
			}
			leaves := p.leaves
			for _, body := range []struct{ mediaType, content string }{{"text/plain", tt.text}, {"text/html", tt.html}} {
				if body.content == "" {
					continue
				}
				if len(leaves) == 0 {
					t.Fatalf("missing %s part", body.mediaType)
				}
				l := leaves[0]
				leaves = leaves[1:]
				if l.mediaType != body.mediaType || l.params["charset"] != "utf-8" {
					t.Errorf("body part is %s %v, want %s; charset=utf-8", l.mediaType, l.params, body.mediaType)
				}
				if string(l.body) != crlf(body.content) {
					t.Errorf("%s body = %q, want %q", body.mediaType, l.body, crlf(body.content))
				}
			}
			if len(leaves) != len(want) {
				t.Fatalf("got %d attachment parts, want %d", len(leaves), len(want))
			}
			for i, a := range want {
				l := leaves[i]
				if !bytes.Equal(l.body, a.Content) {
					t.Errorf("attachment %d: content differs (got %d bytes, want %d)", i, len(l.body), len(a.Content))
				}
				if l.mediaType != a.ContentType || l.filename != a.Filename {
					t.Errorf("attachment %d: %s %q, want %s %q", i, l.mediaType, l.filename, a.ContentType, a.Filename)
				}
				wantDisp, wantCID := "attachment", ""
				if a.ContentID != "" {
					wantDisp = "inline"
					wantCID = "<" + strings.Trim(a.ContentID, "<>") + ">"
				}
				if l.disposition != wantDisp || l.contentID != wantCID {
					t.Errorf("attachment %d: disposition %q, Content-ID %q; want %q, %q", i, l.disposition, l.contentID, wantDisp, wantCID)
				}
			}
		})
	}
}

func TestBuildHeader(t *testing.T) {
	t.Parallel()

	date := time.Date(2026, 3, 4, 5, 6, 7, 0, time.FixedZone("", 2*3600))
	s := message.Spec{
		From:    message.Address{Name: "Müller, Jörg (Sales)", Address: "joerg@Bücher.test"},
		ReplyTo: []message.Address{{Name: `Say "hi"`, Address: "reply@example.test"}},
		To: []message.Address{
			{Name: "Doe, John", Address: "john@example.test"},
			{Name: "Zoë", Address: `"zoe smith"@example.test`},
			{Address: "plain@example.test"},
			{Name: `back\slash`, Address: "bs@[192.0.2.1]"},
		},
		Cc:              []message.Address{{Name: "日本語の名前", Address: "cc@xn--bcher-kva.test"}},
		Subject:         "Grüße — ünïcödé subject with =?utf-8?q?lookalike?= text",
		Text:            "body\n",
		MessageIDDomain: "Mail.Example.TEST",
		Date:            date,
		Headers: []message.Header{
			{Name: "X-Campaign", Value: "spring"},
			{Name: "List-Unsubscribe", Value: "<mailto:unsub@example.test>"},
			{Name: "x-note", Value: "Grüße aus Köln"},
			{Name: "X-Campaign", Value: "second"},
		},
	}
	b, err := message.Build(s)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	checkWire(t, b.Raw)
	p := parse(t, b.Raw)
	h := p.header

	wantNames := []string{"Date", "From", "Reply-To", "To", "Cc", "Subject", "Message-Id", "Mime-Version",
		"X-Campaign", "List-Unsubscribe", "X-Note", "X-Campaign", "Content-Type", "Content-Transfer-Encoding"}
	if got := headerNames(h); !slices.Equal(got, wantNames) {
		t.Errorf("header fields = %q, want %q", got, wantNames)
	}
	if bytes.Contains(bytes.ToLower(b.Raw), []byte("\r\nbcc:")) {
		t.Errorf("message has a Bcc field")
	}

	// The subject holds text that looks like an encoded-word; it survives
	// only because a subject with non-ASCII text is encoded as a whole.
	if got, err := h.Subject(); err != nil || got != s.Subject {
		t.Errorf("subject = %q, %v; want %q", got, err, s.Subject)
	}
	if got, err := h.Date(); err != nil || !got.Equal(date) {
		t.Errorf("Date = %v, %v; want %v", got, err, date)
	}
	if got := h.Get("Date"); got != "Wed, 04 Mar 2026 05:06:07 +0200" {
		t.Errorf("Date field = %q", got)
	}

	id, err := h.MessageID()
	if err != nil {
		t.Fatalf("Message-ID: %v", err)
	}
	if "<"+id+">" != b.MessageID {
		t.Errorf("Message-ID field %q, Built.MessageID %q", id, b.MessageID)
	}
	if !regexp.MustCompile(`^<[A-Z2-7]{26}@mail\.example\.test>$`).MatchString(b.MessageID) {
		t.Errorf("Message-ID %q does not look like <random@mail.example.test>", b.MessageID)
	}

	wantAddrs := map[string][]mail.Address{
		"From":     {{Name: "Müller, Jörg (Sales)", Address: "joerg@xn--bcher-kva.test"}},
		"Reply-To": {{Name: `Say "hi"`, Address: "reply@example.test"}},
		"To": {
			{Name: "Doe, John", Address: "john@example.test"},
			{Name: "Zoë", Address: "zoe smith@example.test"},
			{Address: "plain@example.test"},
			{Name: `back\slash`, Address: "bs@[192.0.2.1]"},
		},
		"Cc": {{Name: "日本語の名前", Address: "cc@xn--bcher-kva.test"}},
	}
	for field, want := range wantAddrs {
		got, err := h.AddressList(field)
		if err != nil {
			t.Errorf("%s: %v (field %q)", field, err, h.Get(field))
			continue
		}
		if len(got) != len(want) {
			t.Errorf("%s = %v, want %v", field, got, want)
			continue
		}
		for i := range want {
			if *got[i] != want[i] {
				t.Errorf("%s[%d] = %+v, want %+v", field, i, *got[i], want[i])
			}
		}
	}

	var campaigns []string
	fields := h.FieldsByKey("X-Campaign")
	for fields.Next() {
		campaigns = append(campaigns, fields.Value())
	}
	if !slices.Equal(campaigns, []string{"spring", "second"}) {
		t.Errorf("X-Campaign = %q", campaigns)
	}
	if got, err := h.Text("X-Note"); err != nil || got != "Grüße aus Köln" {
		t.Errorf("X-Note = %q, %v", got, err)
	}
	if got := h.Get("List-Unsubscribe"); got != "<mailto:unsub@example.test>" {
		t.Errorf("List-Unsubscribe = %q", got)
	}
}

// TestBuildTextRoundTrip checks that subjects and extra header values come
// back exactly as given, including ASCII text that looks like RFC 2047.
func TestBuildTextRoundTrip(t *testing.T) {
	t.Parallel()
	for _, text := range []string{
		"Plain ASCII",
		"Your code is =?utf-8?q?abc?= today",
		"=?",
		strings.Repeat("=?x?q?y?= ", 60) + "end",
		"Grüße aus Köln",
		"emoji 🎉 and CJK 日本語",
		"tab\tinside",
		"replacement \uFFFD and separator \u2028 kept",
		"\"quoted\" (comment) <angle> , ; : @",
	} {
		t.Run(text, func(t *testing.T) {
			t.Parallel()
			s := spec()
			s.Subject = text
			s.Headers = []message.Header{{Name: "X-Text", Value: text}}
			b, err := message.Build(s)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkWire(t, b.Raw)
			h := parse(t, b.Raw).header
			if got, err := h.Subject(); err != nil || got != text {
				t.Errorf("Subject = %q, %v; want %q", got, err, text)
			}
			if got, err := h.Text("X-Text"); err != nil || got != text {
				t.Errorf("X-Text = %q, %v; want %q", got, err, text)
			}
		})
	}
}

func TestBuildMessageIDUnique(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for range 100 {
		b, err := message.Build(spec())
		if err != nil {
			t.Fatal(err)
		}
		if seen[b.MessageID] {
			t.Fatalf("Message-ID %s repeated", b.MessageID)
		}
		seen[b.MessageID] = true
	}
}

func TestBuildDefaultDate(t *testing.T) {
	t.Parallel()
	before := time.Now().Truncate(time.Second)
	b, err := message.Build(spec())
	if err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	p := parse(t, b.Raw)
	got, err := p.header.Date()
	if err != nil || got.Before(before) || got.After(after) {
		t.Errorf("Date = %v, %v; want between %v and %v", got, err, before, after)
	}
}

// TestBuildLineLimits feeds content that would break the 998-octet limit or
// bare line endings if written as is.
func TestBuildLineLimits(t *testing.T) {
	t.Parallel()
	longWord := strings.Repeat("x", 5000)
	tests := []struct {
		name string
		edit func(*message.Spec)
	}{
		{"long text line", func(s *message.Spec) { s.Text = longWord + "\n" + strings.Repeat("word ", 2000) }},
		{"long html line", func(s *message.Spec) { s.HTML = "<p>" + longWord + "</p>" }},
		{"bare CR and LF in text", func(s *message.Spec) { s.Text = "a\rb\nc\r\nd\n\n\r\re" }},
		{"trailing spaces and dots", func(s *message.Spec) { s.Text = "line   \n.\n..\nFrom me\n\t\n" }},
		{"long non-ASCII subject", func(s *message.Spec) { s.Subject = strings.Repeat("Grüße ", 200) }},
		{"long non-ASCII subject without spaces", func(s *message.Spec) { s.Subject = strings.Repeat("ü", 1000) }},
		{"long ASCII subject", func(s *message.Spec) { s.Subject = strings.Repeat("word ", 400) + "end" }},
		{"many recipients", func(s *message.Spec) {
			for i := range 300 {
				s.To = append(s.To, message.Address{Name: "Rcpt Number " + strings.Repeat("n", i%40), Address: "r@example.test"})
			}
		}},
		{"long names", func(s *message.Spec) {
			s.From.Name = strings.Repeat("ö", 400)
			s.To = []message.Address{{Name: strings.Repeat("q", 900), Address: "a@example.test"}}
		}},
		{"long filename", func(s *message.Spec) {
			s.Attachments = []message.Attachment{{Filename: strings.Repeat("ä", 120) + ".txt", ContentType: "text/plain; charset=utf-8", Content: []byte(longWord)}}
		}},
		{"binary attachment", func(s *message.Spec) {
			s.Attachments = []message.Attachment{{Filename: "a.bin", Content: bytes.Repeat([]byte{'\r', '\n', '\n', '\r', 0, 0xff}, 1000)}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := spec()
			tt.edit(&s)
			b, err := message.Build(s)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkWire(t, b.Raw)
			p := parse(t, b.Raw)
			if got, err := p.header.Subject(); err != nil || got != s.Subject {
				t.Errorf("subject = %q, %v; want %q", got, err, s.Subject)
			}
			if got := string(p.leaves[0].body); got != crlf(s.Text) {
				t.Errorf("text = %q, want %q", got, crlf(s.Text))
			}
			for i, a := range s.Attachments {
				l := p.leaves[len(p.leaves)-len(s.Attachments)+i]
				if !bytes.Equal(l.body, a.Content) || l.filename != a.Filename {
					t.Errorf("attachment %d differs: %q", i, l.filename)
				}
			}
		})
	}
}

// TestBuildBareLineBreaks pins down how line breaks in text bodies arrive:
// LF, CR and CRLF each become one CRLF.
func TestBuildBareLineBreaks(t *testing.T) {
	t.Parallel()
	s := spec()
	s.Text = "a\rb\nc\r\nd\n\n\r\re"
	b, err := message.Build(s)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(parse(t, b.Raw).leaves[0].body), "a\r\nb\r\nc\r\nd\r\n\r\n\r\n\r\ne"; got != want {
		t.Errorf("text = %q, want %q", got, want)
	}
}

func TestBuildRefusesReservedHeaders(t *testing.T) {
	t.Parallel()
	for _, name := range []string{
		"From", "from", "TO", "Cc", "Bcc", "bcc", "Reply-To", "Sender", "Subject", "Date", "Message-ID", "message-id",
		"MIME-Version", "Content-Type", "content-transfer-encoding", "Content-Disposition", "Content-ID",
		"DKIM-Signature", "Return-Path", "Received", "Resent-From", "Resent-To", "ARC-Seal", "ARC-Message-Signature",
		"Authentication-Results", "X-Posthaste-Internal",
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if !message.IsReservedHeader(name) {
				t.Errorf("IsReservedHeader(%q) = false", name)
			}
			s := spec()
			s.Headers = []message.Header{{Name: "X-Ok", Value: "fine"}, {Name: name, Value: "evil@example.test"}}
			_, err := message.Build(s)
			if fe := asFieldError(t, err); fe.Field != "headers[1].name" {
				t.Errorf("field = %q, want headers[1].name (%v)", fe.Field, err)
			}
		})
	}
}

func TestIsReservedHeaderAllows(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"X-Campaign", "List-Unsubscribe", "List-Unsubscribe-Post", "In-Reply-To", "References",
		"Contents", "Feedback-ID", "Auto-Submitted", "Precedence", "X-Mailer", "Keywords"} {
		if message.IsReservedHeader(name) {
			t.Errorf("IsReservedHeader(%q) = true", name)
		}
	}
}

// TestBuildRefusesBadInput checks every refusal is a *FieldError naming the
// API field, and that CR/LF never makes it into a header.
func TestBuildRefusesBadInput(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		edit  func(*message.Spec)
		field string
		is    error
	}{
		{"header value CRLF", func(s *message.Spec) { s.Headers = []message.Header{{"X-A", "x\r\nBcc: evil@example.test"}} }, "headers[0].value", nil},
		{"header value LF", func(s *message.Spec) { s.Headers = []message.Header{{"X-A", "x\nBcc: evil@example.test"}} }, "headers[0].value", nil},
		{"header value CR", func(s *message.Spec) { s.Headers = []message.Header{{"X-A", "x\rBcc: evil@example.test"}} }, "headers[0].value", nil},
		{"header value NUL", func(s *message.Spec) { s.Headers = []message.Header{{"X-A", "x\x00y"}} }, "headers[0].value", nil},
		{"header value bad UTF-8", func(s *message.Spec) { s.Headers = []message.Header{{"X-A", "x\xffy"}} }, "headers[0].value", nil},
		{"header value unfoldable", func(s *message.Spec) { s.Headers = []message.Header{{"X-A", strings.Repeat("a", 995)}} }, "headers[0].value", nil},
		{"header name with space", func(s *message.Spec) { s.Headers = []message.Header{{"X A", "v"}} }, "headers[0].name", nil},
		{"header name with colon", func(s *message.Spec) { s.Headers = []message.Header{{"X-A:", "v"}} }, "headers[0].name", nil},
		{"header name with CRLF", func(s *message.Spec) { s.Headers = []message.Header{{"X-A\r\nBcc", "v"}} }, "headers[0].name", nil},
		{"header name non-ASCII", func(s *message.Spec) { s.Headers = []message.Header{{"X-Grüße", "v"}} }, "headers[0].name", nil},
		{"header name empty", func(s *message.Spec) { s.Headers = []message.Header{{"", "v"}} }, "headers[0].name", nil},
		{"header name too long", func(s *message.Spec) { s.Headers = []message.Header{{"X-" + strings.Repeat("a", 80), "v"}} }, "headers[0].name", nil},
		{"subject CRLF", func(s *message.Spec) { s.Subject = "hi\r\nBcc: evil@example.test" }, "subject", nil},
		{"subject LF", func(s *message.Spec) { s.Subject = "hi\nthere" }, "subject", nil},
		{"subject control", func(s *message.Spec) { s.Subject = "hi\x1bthere" }, "subject", nil},
		{"display name LF", func(s *message.Spec) { s.To[0].Name = "Eve\nBcc: x@example.test" }, "to[0].name", nil},
		{"display name tab", func(s *message.Spec) { s.From.Name = "a\tb" }, "from.name", nil},
		{"missing from", func(s *message.Spec) { s.From = message.Address{} }, "from.address", nil},
		{"from with display syntax", func(s *message.Spec) { s.From.Address = "Eve <eve@example.test>" }, "from.address", message.ErrInvalidMailbox},
		{"to injection", func(s *message.Spec) {
			s.To = append(s.To, message.Address{Address: "a@example.test>\r\nRCPT TO:<x@example.test"})
		}, "to[1].address", message.ErrInvalidMailbox},
		{"cc non-ASCII local part", func(s *message.Spec) { s.Cc = []message.Address{{Address: "jörg@example.test"}} }, "cc[0].address", message.ErrSMTPUTF8Unsupported},
		{"reply-to dotless", func(s *message.Spec) { s.ReplyTo = []message.Address{{Address: "root@localhost"}} }, "reply_to[0].address", message.ErrInvalidMailbox},
		{"no body", func(s *message.Spec) { s.Text, s.HTML = "", "" }, "text", nil},
		{"text bad UTF-8", func(s *message.Spec) { s.Text = "\xc3\x28" }, "text", nil},
		{"html bad UTF-8", func(s *message.Spec) { s.HTML = "\xe2\x82" }, "html", nil},
		{"inline without html", func(s *message.Spec) {
			s.Attachments = []message.Attachment{{ContentType: "image/png", ContentID: "logo"}}
		}, "attachments[0].content_id", nil},
		{"duplicate content id", func(s *message.Spec) {
			s.HTML = "<p>x</p>"
			s.Attachments = []message.Attachment{{ContentID: "logo"}, {ContentID: "<logo>"}}
		}, "attachments[1].content_id", nil},
		{"content id with space", func(s *message.Spec) {
			s.HTML = "<p>x</p>"
			s.Attachments = []message.Attachment{{ContentID: "my logo"}}
		}, "attachments[0].content_id", nil},
		{"content id with CRLF", func(s *message.Spec) {
			s.HTML = "<p>x</p>"
			s.Attachments = []message.Attachment{{ContentID: "a\r\nBcc: x@example.test"}}
		}, "attachments[0].content_id", nil},
		{"content id empty brackets", func(s *message.Spec) {
			s.HTML = "<p>x</p>"
			s.Attachments = []message.Attachment{{ContentID: "<>"}}
		}, "attachments[0].content_id", nil},
		{"bad content type", func(s *message.Spec) { s.Attachments = []message.Attachment{{ContentType: "not a type"}} }, "attachments[0].content_type", nil},
		{"content type without subtype", func(s *message.Spec) { s.Attachments = []message.Attachment{{ContentType: "image"}} }, "attachments[0].content_type", nil},
		{"multipart attachment", func(s *message.Spec) {
			s.Attachments = []message.Attachment{{ContentType: "multipart/mixed; boundary=x"}}
		}, "attachments[0].content_type", nil},
		{"message attachment", func(s *message.Spec) { s.Attachments = []message.Attachment{{ContentType: "message/rfc822"}} }, "attachments[0].content_type", nil},
		{"other charset", func(s *message.Spec) {
			s.Attachments = []message.Attachment{{ContentType: "text/csv; charset=iso-8859-1"}}
		}, "attachments[0].content_type", nil},
		{"content type CRLF", func(s *message.Spec) {
			s.Attachments = []message.Attachment{{ContentType: "text/plain\r\nBcc: x@example.test"}}
		}, "attachments[0].content_type", nil},
		{"filename CRLF", func(s *message.Spec) { s.Attachments = []message.Attachment{{Filename: "a\r\n.txt"}} }, "attachments[0].filename", nil},
		{"filename too long", func(s *message.Spec) { s.Attachments = []message.Attachment{{Filename: strings.Repeat("a", 256)}} }, "attachments[0].filename", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := spec()
			tt.edit(&s)
			b, err := message.Build(s)
			if err == nil {
				t.Fatalf("Build succeeded:\n%s", b.Raw)
			}
			fe := asFieldError(t, err)
			if fe.Field != tt.field {
				t.Errorf("field = %q, want %q (%v)", fe.Field, tt.field, err)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error %v does not wrap %v", err, tt.is)
			}
			if strings.ContainsAny(fe.Reason, "\r\n") {
				t.Errorf("reason holds a line break: %q", fe.Reason)
			}
		})
	}
}

func TestBuildMessageIDDomain(t *testing.T) {
	t.Parallel()
	for _, d := range []string{"", "localhost", "bad domain.test", "-x.test"} {
		s := spec()
		s.MessageIDDomain = d
		_, err := message.Build(s)
		var fe *message.FieldError
		if err == nil || errors.As(err, &fe) {
			t.Errorf("MessageIDDomain %q: error %v, want a non-field error", d, err)
		}
	}
	s := spec()
	s.MessageIDDomain = "bücher.test"
	b, err := message.Build(s)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(b.MessageID, "@xn--bcher-kva.test>") {
		t.Errorf("MessageID = %q", b.MessageID)
	}
}

func TestBuildDoesNotModifyInput(t *testing.T) {
	t.Parallel()
	s := spec()
	content := randomBytes(1000, 9)
	s.Attachments = []message.Attachment{{Filename: "a.bin", Content: content}}
	s.Headers = []message.Header{{Name: "X-A", Value: "1"}}
	before := bytes.Clone(content)
	if _, err := message.Build(s); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(content, before) || s.Attachments[0].ContentType != "" || s.Headers[0].Name != "X-A" {
		t.Errorf("Build modified its input")
	}
}

func benchmarkBuild(b *testing.B, attachment int) {
	s := spec()
	s.HTML = "<p>" + strings.Repeat("Some HTML text. ", 2000) + "</p>"
	s.Text = strings.Repeat("Some plain text.\n", 2000)
	s.Attachments = []message.Attachment{{Filename: "data.bin", ContentType: "application/octet-stream", Content: randomBytes(attachment, 7)}}
	b.SetBytes(int64(attachment))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := message.Build(s); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkBuild(b *testing.B) { benchmarkBuild(b, 1<<20) }

func BenchmarkBuild10MB(b *testing.B) { benchmarkBuild(b, 10<<20) }

// subjectLines returns the lines of the Subject field of raw, the first
// with its name.
func subjectLines(t *testing.T, raw []byte) []string {
	t.Helper()
	head, _, _ := strings.Cut(string(raw), "\r\n\r\n")
	var out []string
	in := false
	for _, line := range strings.Split(head, "\r\n") {
		switch {
		case strings.HasPrefix(line, "Subject: "):
			in = true
		case in && (strings.HasPrefix(line, " ") || strings.HasPrefix(line, "\t")):
		default:
			in = false
		}
		if in {
			out = append(out, line)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no Subject field in\n%s", head)
	}
	return out
}

// TestBuildFoldsSubject checks that subjects of up to 998 characters, as
// the API allows, are written with lines of at most 78 octets (RFC 5322
// section 2.1.1), 76 when they hold encoded-words (RFC 2047 section 2), and
// read back as given.
func TestBuildFoldsSubject(t *testing.T) {
	t.Parallel()
	words900 := strings.TrimSpace(strings.Repeat("subject ", 113))[:900]
	tests := []struct {
		name    string
		subject string
		plain   bool // written as it is, only folded
	}{
		{"900 characters of words", words900, true},
		{"900-character word", strings.Repeat("w", 900), false},
		{"990-character word", strings.Repeat("a", 990), false},
		{"998 characters with a long word inside", "see " + strings.Repeat("x", 990) + " now", false},
		{"998 non-ASCII characters", strings.Repeat("ü", 998), false},
		{"Cyrillic words", strings.Repeat("Привет мир ", 90), false},
		{"tabs and double spaces", strings.Repeat("two  spaces\tand tab ", 40) + "end  ", true},
		{"white space too long for a line", "a" + strings.Repeat(" ", 100) + "b", false},
		{"exactly 78 octets", strings.Repeat("s", 78-len("Subject: ")), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := spec()
			s.Subject = tt.subject
			b, err := message.Build(s)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkWire(t, b.Raw)
			lines := subjectLines(t, b.Raw)
			limit := 78
			if !tt.plain {
				limit = 76
			}
			for i, l := range lines {
				if len(l) > limit {
					t.Errorf("line %d is %d octets, more than %d: %q", i+1, len(l), limit, l)
				}
				if strings.TrimLeft(l, " \t") == "" {
					t.Errorf("line %d is white space only", i+1)
				}
			}
			unfolded := strings.TrimPrefix(strings.Join(lines, ""), "Subject: ")
			if tt.plain && unfolded != tt.subject {
				t.Errorf("unfolded subject %q, want %q", unfolded, tt.subject)
			}
			if !tt.plain && !strings.HasPrefix(strings.TrimSpace(unfolded), "=?utf-8?") {
				t.Errorf("subject %q is not encoded", unfolded)
			}
			if tt.plain && (strings.Contains(tt.subject, "  ") || strings.ContainsAny(tt.subject, "\t")) {
				// go-message's reader turns the white space around a fold
				// into one space and trims the end; RFC 5322 unfolding,
				// checked above, keeps it.
				return
			}
			p := parse(t, b.Raw)
			if got, err := p.header.Subject(); err != nil || got != tt.subject {
				t.Errorf("subject = %q, %v; want %q", got, err, tt.subject)
			}
		})
	}
}

// TestBuildFoldsExtraHeaders checks that extra header values are folded at
// white space, that a long plain word keeps a line of its own rather than
// being encoded (the field may be structured), and that only a word that
// cannot fit in 998 octets is refused, naming the field.
func TestBuildFoldsExtraHeaders(t *testing.T) {
	t.Parallel()
	url := "<https://example.test/unsubscribe/" + strings.Repeat("t", 300) + ">"
	s := spec()
	s.Headers = []message.Header{
		{Name: "List-Unsubscribe", Value: url},
		{Name: "X-Words", Value: strings.TrimSpace(strings.Repeat("word ", 100))},
		{Name: "X-Long-Name-" + strings.Repeat("n", 50), Value: strings.Repeat("é", 40)},
	}
	b, err := message.Build(s)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	checkWire(t, b.Raw)
	head, _, _ := strings.Cut(string(b.Raw), "\r\n\r\n")
	if !strings.Contains(head, "\r\nList-Unsubscribe: "+url+"\r\n") {
		t.Errorf("List-Unsubscribe was not kept as it is:\n%s", head)
	}
	for i, l := range strings.Split(head, "\r\n") {
		if !strings.HasPrefix(l, "List-Unsubscribe:") && len(l) > 78 {
			t.Errorf("header line %d is %d octets: %q", i+1, len(l), l)
		}
	}
	p := parse(t, b.Raw)
	for _, x := range s.Headers {
		if got, err := p.header.Text(x.Name); err != nil || got != x.Value {
			t.Errorf("%s = %q, %v; want %q", x.Name, got, err, x.Value)
		}
	}

	s = spec()
	s.Headers = []message.Header{{Name: "X-A", Value: "ok " + strings.Repeat("a", 998)}}
	_, err = message.Build(s)
	if fe := asFieldError(t, err); fe.Field != "headers[0].value" || !strings.Contains(fe.Reason, "998") {
		t.Fatalf("error %v, want one about headers[0].value and the 998-octet limit", err)
	}
}
