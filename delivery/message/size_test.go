package message

import (
	"strings"
	"testing"
)

// TestEstimateSize checks that the output buffer is never regrown: the
// estimate is at least the built size for content at the extremes of each
// encoding.
func TestEstimateSize(t *testing.T) {
	t.Parallel()
	bin := make([]byte, 100_000)
	for i := range bin {
		bin[i] = byte(i * 7)
	}
	tests := map[string]func(*Spec){
		"short":              func(*Spec) {},
		"non-ASCII text":     func(s *Spec) { s.Text = strings.Repeat("ü", 50_000) },
		"equals signs":       func(s *Spec) { s.Text = strings.Repeat("=", 100_000) },
		"trailing spaces":    func(s *Spec) { s.Text = strings.Repeat("  \n", 30_000) },
		"bare CRs":           func(s *Spec) { s.Text = strings.Repeat("\r", 30_000) },
		"empty lines":        func(s *Spec) { s.Text = strings.Repeat("\n", 30_000) },
		"control characters": func(s *Spec) { s.Text = strings.Repeat("\x01\t", 30_000) },
		"long ASCII line":    func(s *Spec) { s.HTML = strings.Repeat("x", 100_000) },
		"non-ASCII subject":  func(s *Spec) { s.Subject = strings.Repeat("ü", 5_000) },
		"non-ASCII names":    func(s *Spec) { s.From.Name = strings.Repeat("日", 3_000) },
		"many header fields": func(s *Spec) { s.Headers = make([]Header, 500); fillHeaders(s.Headers) },
		"many small parts":   func(s *Spec) { s.Attachments = make([]Attachment, 500); fillAttachments(s.Attachments) },
		"binary attachment":  func(s *Spec) { s.Attachments = []Attachment{{Filename: strings.Repeat("ä", 120), Content: bin}} },
		"everything": func(s *Spec) {
			s.HTML = "<p>ü</p>"
			s.Attachments = []Attachment{{ContentID: "a", Content: bin}, {Content: bin}}
		},
	}
	for name, edit := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s := Spec{
				From:            Address{Name: "From", Address: "from@example.test"},
				To:              []Address{{Address: "to@example.test"}},
				Subject:         "Subject",
				Text:            "text",
				MessageIDDomain: "example.test",
			}
			edit(&s)
			b, err := Build(s)
			if err != nil {
				t.Fatal(err)
			}
			if est := estimateSize(&s); len(b.Raw) > est {
				t.Errorf("built %d octets, estimated %d", len(b.Raw), est)
			}
		})
	}
}

func fillHeaders(hs []Header) {
	for i := range hs {
		hs[i] = Header{Name: "X-Field", Value: strings.Repeat("é", 40)}
	}
}

func fillAttachments(as []Attachment) {
	for i := range as {
		as[i] = Attachment{Filename: "f.txt", ContentType: "text/plain; charset=utf-8", Content: []byte("x")}
	}
}
