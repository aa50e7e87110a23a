package bounce

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzParseReport checks that no input makes ParseReport panic or break its
// limits. The fixtures under testdata are the seed corpus, so `go test` runs
// them as part of the normal suite.
func FuzzParseReport(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.eml"))
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("Content-Type: multipart/report; report-type=feedback-report; boundary=a\r\n\r\n--a\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n--a--"))
	f.Add([]byte("From: MAILER-DAEMON@x.test\r\n\r\n<a@b.test>:\r\n550 5.1.1 no\r\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		r := ParseReport(raw)
		switch r.Kind {
		case KindDSN, KindComplaint, KindAutoReply, KindUnstructuredBounce, KindUnknown:
		default:
			t.Fatalf("unknown kind %q", r.Kind)
		}
		if len(r.Recipients) > maxRecipients {
			t.Fatalf("%d recipients, more than the limit %d", len(r.Recipients), maxRecipients)
		}
		for _, rr := range r.Recipients {
			if len(rr.Diagnostic) > maxDiagnostic {
				t.Fatalf("diagnostic of %d bytes, more than the limit %d", len(rr.Diagnostic), maxDiagnostic)
			}
			if rr.Status != "" && !isEnhancedCode(rr.Status) {
				t.Fatalf("status %q is not an enhanced code", rr.Status)
			}
		}
		if (r.Kind == KindComplaint) != (r.Feedback != nil) {
			t.Fatalf("kind %s with feedback %v", r.Kind, r.Feedback)
		}
	})
}

// TestParseReportLargeInputs feeds inputs of listener size built to be
// expensive (thousands of fields, recipient lines, nested boundaries) and
// checks each is read within a generous deadline.
func TestParseReportLargeInputs(t *testing.T) {
	t.Parallel()
	const size = 1 << 20
	fill := func(head, unit string) []byte {
		var b strings.Builder
		b.WriteString(head)
		for b.Len() < size {
			b.WriteString(unit)
		}
		return []byte(b.String())
	}
	tests := []struct {
		name string
		raw  []byte
	}{
		{"many status fields", fill("Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\n",
			"Final-Recipient: rfc822; a@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n")},
		{"many folded lines", fill("Content-Type: message/delivery-status\r\n\r\nDiagnostic-Code: smtp; 550\r\n", " 5.1.1 and more text\r\n")},
		{"many recipient headings", fill("From: MAILER-DAEMON@x.test\r\n\r\n", "<a@b.test>:\r\n550 5.1.1 x\r\n")},
		{"many distinct headings", fill("From: MAILER-DAEMON@x.test\r\n\r\n", "<aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@b.test>\r\n")},
		{"digits and dots", fill("From: MAILER-DAEMON@x.test\r\n\r\n", "5.5.5.5.5.5.5.5.5.5.5.")},
		{"many boundaries", fill("Content-Type: multipart/mixed; boundary=x\r\n\r\n", "--x\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n")},
		{"long header", fill("Subject: ", "a")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			done := make(chan Report, 1)
			go func() { done <- ParseReport(tt.raw) }()
			timer := time.NewTimer(20 * time.Second)
			defer timer.Stop()
			select {
			case r := <-done:
				if len(r.Recipients) > maxRecipients {
					t.Fatalf("%d recipients", len(r.Recipients))
				}
			case <-timer.C:
				t.Fatal("ParseReport did not finish within 20s")
			}
		})
	}
}
