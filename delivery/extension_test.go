package delivery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	gomessage "github.com/emersion/go-message"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	"github.com/posthaste/posthaste/internal/testenv"
)

// attemptData is senderEnv.attempt with the message bytes given.
func (e *senderEnv) attemptData(t *testing.T, domain string, data []byte, to ...string) attemptResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	return e.sender.attempt(ctx, envelope{Domain: domain, From: "bounce@sender.test", To: to, Data: data})
}

// eightBitMessage is a multipart message with an 8-bit text part, a binary
// attachment and a 7-bit text part.
func eightBitMessage() []byte {
	return []byte(strings.Join([]string{
		"From: sender@sender.test",
		"To: someone@example.test",
		"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=",
		"Message-ID: <8bit@sender.test>",
		"MIME-Version: 1.0",
		`Content-Type: multipart/mixed; boundary="b1"`,
		"",
		"--b1",
		"Content-Type: text/plain; charset=utf-8",
		"Content-Transfer-Encoding: 8bit",
		"",
		"Grüße aus Köln",
		"zweite Zeile ist länger",
		"--b1",
		"Content-Type: application/octet-stream",
		"Content-Transfer-Encoding: binary",
		"",
		"\x80\x81\xff binary",
		"--b1",
		"Content-Type: text/plain; charset=us-ascii",
		"",
		"plain ascii",
		"--b1--",
		"",
	}, "\r\n"))
}

// decodedParts returns the decoded body of each leaf of raw, in order.
func decodedParts(t *testing.T, raw []byte) []string {
	t.Helper()
	e, err := gomessage.Read(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	var parts []string
	err = e.Walk(func(_ []int, p *gomessage.Entity, err error) error {
		if err != nil {
			return err
		}
		if mt, _, _ := p.Header.ContentType(); strings.HasPrefix(mt, "multipart/") {
			return nil
		}
		b, err := io.ReadAll(p.Body)
		if err != nil {
			return err
		}
		parts = append(parts, string(b))
		return nil
	})
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	return parts
}

func TestAttemptRefusesMessageOverAdvertisedSize(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithMaxMessageBytes(100))
	e.addMX("small.test", "mx.small.test", "192.0.2.1", 10, srv)
	data := testMessage(strings.Repeat("x", 200))

	res := e.attemptData(t, "small.test", data, "a@small.test", "b@small.test")
	want := fmt.Sprintf("message size %d exceeds the limit 100 advertised by mx.small.test", len(data))
	for i, r := range res.Rcpts {
		if r.Err == nil || r.Err.Code != 552 || r.Err.EnhancedCode != "5.3.4" || r.Err.Message != want ||
			r.Err.Temporary() || r.Err.Remote {
			t.Fatalf("recipient %d: %#v, want a local permanent 552 5.3.4 %q", i, r.Err, want)
		}
	}
	// RFC 1870 section 6.1: nothing of the transaction is sent.
	if mail, data := srv.Commands("MAIL"), srv.Commands("DATA"); mail != 0 || data != 0 {
		t.Fatalf("server saw %d MAIL and %d DATA, want none", mail, data)
	}
	if h := lastHost(t, res); h.Err != nil || h.MXHost != "mx.small.test" {
		t.Fatalf("host %+v, want the one that ruled the message out", h)
	}
}

func TestAttemptDeclaresSizeUnderAdvertisedLimit(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithMaxMessageBytes(1000))
	e.addMX("small.test", "mx.small.test", "192.0.2.1", 10, srv)
	data := testMessage("short")

	res := e.attemptData(t, "small.test", data, "a@small.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || msgs[0].Size != len(data) || !bytes.Equal(msgs[0].Data, data) {
		t.Fatalf("messages %+v, want the message with SIZE=%d", msgs, len(data))
	}
}

func TestAttemptConvertsTo7BitWithout8BitMIME(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.Without8BitMIME())
	e.addMX("old.test", "mx.old.test", "192.0.2.1", 10, srv)
	data := eightBitMessage()

	res := e.attemptData(t, "old.test", data, "a@old.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 {
		t.Fatalf("%d messages, want 1", len(msgs))
	}
	got := msgs[0]
	if message.Has8Bit(got.Data) {
		t.Fatalf("server without 8BITMIME got 8-bit octets:\n%s", got.Data)
	}
	if got.Body != "" {
		t.Fatalf("BODY=%s sent to a server without 8BITMIME", got.Body)
	}
	// SIZE declares what was sent, after the conversion.
	if got.Size != len(got.Data) {
		t.Fatalf("SIZE=%d for %d octets sent", got.Size, len(got.Data))
	}
	wantParts := []string{"Grüße aus Köln\r\nzweite Zeile ist länger", "\x80\x81\xff binary", "plain ascii"}
	parts := decodedParts(t, got.Data)
	if len(parts) != len(wantParts) {
		t.Fatalf("parts %q, want %q", parts, wantParts)
	}
	for i := range parts {
		if parts[i] != wantParts[i] {
			t.Errorf("part %d decodes to %q, want %q", i, parts[i], wantParts[i])
		}
	}
	// The header above the body is kept byte for byte.
	head, _, _ := bytes.Cut(data, []byte("\r\n\r\n"))
	if !bytes.HasPrefix(got.Data, head) {
		t.Errorf("header changed:\n%s", got.Data)
	}
}

func TestAttemptDeclares8BitMIMEWhenOffered(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t) // go-smtp offers 8BITMIME
	e.addMX("new.test", "mx.new.test", "192.0.2.1", 10, srv)
	data := eightBitMessage()

	res := e.attemptData(t, "new.test", data, "a@new.test")
	if err := res.Rcpts[0].Err; err != nil {
		t.Fatal(err)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || msgs[0].Body != "8BITMIME" || !bytes.Equal(msgs[0].Data, data) {
		t.Fatalf("messages %+v, want the original bytes with BODY=8BITMIME", msgs)
	}
}

func TestAttemptSevenBitMessageDeclaresNoBody(t *testing.T) {
	t.Parallel()
	for _, opts := range [][]testenv.SMTPOption{nil, {testenv.Without8BitMIME()}} {
		e := newSenderEnv(t, testSMTPConfig(), nil)
		srv := testenv.StartSMTP(t, opts...)
		e.addMX("seven.test", "mx.seven.test", "192.0.2.1", 10, srv)
		data := testMessage("ascii only")

		res := e.attemptData(t, "seven.test", data, "a@seven.test")
		if err := res.Rcpts[0].Err; err != nil {
			t.Fatal(err)
		}
		msgs := srv.Messages()
		if len(msgs) != 1 || msgs[0].Body != "" || !bytes.Equal(msgs[0].Data, data) {
			t.Fatalf("messages %+v, want the bytes unchanged and no BODY=", msgs)
		}
	}
}

func TestAttemptRefusesEightBitPartHeaderWithout8BitMIME(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.Without8BitMIME())
	e.addMX("old.test", "mx.old.test", "192.0.2.1", 10, srv)
	data := bytes.Replace(eightBitMessage(), []byte("Content-Type: application/octet-stream"),
		[]byte(`Content-Type: application/octet-stream; name="Grüße.bin"`), 1)

	res := e.attemptData(t, "old.test", data, "a@old.test")
	err := res.Rcpts[0].Err
	if err == nil || err.Code != 554 || err.EnhancedCode != "5.6.3" || err.Temporary() || err.Remote ||
		!errors.Is(err, message.ErrEightBitHeader) || !strings.Contains(err.Message, "8BITMIME") {
		t.Fatalf("err = %#v, want a local permanent 554 5.6.3 about the header", err)
	}
	if mail := srv.Commands("MAIL"); mail != 0 {
		t.Fatalf("%d MAIL commands, want none", mail)
	}
}

func TestAttemptAmbiguousWhenConnectionDropsAfterData(t *testing.T) {
	t.Parallel()
	e := newSenderEnv(t, testSMTPConfig(), nil)
	srv := testenv.StartSMTP(t, testenv.WithDropAfterData())
	e.addMX("drop.test", "mx.drop.test", "192.0.2.1", 10, srv)

	res := e.attempt(t, "drop.test", "a@drop.test")
	err := res.Rcpts[0].Err
	if err == nil || !err.Ambiguous || !err.Temporary() || err.Remote || err.Code != 451 || err.EnhancedCode != "4.4.2" ||
		!strings.Contains(err.Message, "after end of data; the receiver may have the message") {
		t.Fatalf("err = %#v, want a local, temporary, ambiguous failure", err)
	}
}

func TestDispatchBouncesMessageOverAdvertisedSize(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithMaxMessageBytes(100))
	e.mx("small.test", srv)
	data := testMessage(strings.Repeat("x", 200))
	id, err := e.tryInsertRaw(data, time.Time{}, "a@small.test")
	if err != nil {
		t.Fatal(err)
	}
	e.start(t, e.config())

	m := e.waitMessage(t, id, "the bounce", final)
	r := m.Recipients[0]
	want := fmt.Sprintf("message size %d exceeds the limit 100 advertised by mx.small.test", len(data))
	if r.Status != db.StatusBounced || r.LastCode != 552 || r.LastEnhancedCode != "5.3.4" || r.LastText != want {
		t.Fatalf("recipient %+v, want bounced with 552 5.3.4 %q", r, want)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Source != db.AttemptSourceLocal || m.Attempts[0].MXHost != "mx.small.test" ||
		m.Attempts[0].Code != 552 || m.Attempts[0].Outcome != db.StatusBounced {
		t.Fatalf("attempts %+v, want one local 552 row for the host", m.Attempts)
	}
	if mail, data := srv.Commands("MAIL"), srv.Commands("DATA"); mail != 0 || data != 0 {
		t.Fatalf("server saw %d MAIL and %d DATA, want none", mail, data)
	}
}

func TestDispatchAmbiguousRetriesThenFails(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithDropAfterData())
	e.mx("drop.test", srv)
	cfg := e.config()
	cfg.MaxAmbiguousRetries = 1
	id := e.insert(t, time.Time{}, "a@drop.test")
	e.start(t, cfg)

	m := e.waitMessage(t, id, "failure after the retry", final)
	r := m.Recipients[0]
	if r.Status != db.StatusFailed || r.Attempts != 2 || r.LastCode != 554 || r.LastEnhancedCode != "5.4.2" ||
		!strings.Contains(r.LastText, "outcome stayed unknown") {
		t.Fatalf("recipient %+v, want failed after one retry", r)
	}
	if len(m.Attempts) != 2 {
		t.Fatalf("attempts %+v, want two", m.Attempts)
	}
	for i, a := range m.Attempts {
		if a.Outcome != db.AttemptAmbiguous || a.Source != db.AttemptSourceLocal || a.Code != 451 ||
			!strings.Contains(a.Text, "may have the message") || strings.Contains(a.Text, "delivery error") {
			t.Errorf("attempt %d = %+v, want an ambiguous local row", i, a)
		}
	}
	if n := srv.Commands("DATA"); n != 2 {
		t.Fatalf("%d DATA commands, want 2 (the attempt and its one retry)", n)
	}
}

func TestDispatchAmbiguousRetriedWithoutLimit(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithDropAfterData())
	e.mx("drop.test", srv)
	cfg := e.config()
	cfg.Retry.InitialInterval = time.Hour // stay deferred
	cfg.Retry.MaxInterval = time.Hour
	id := e.insert(t, time.Time{}, "a@drop.test")
	e.start(t, cfg)

	m := e.waitMessage(t, id, "deferral", func(m db.Message) bool { return m.Recipients[0].Status == db.StatusDeferred })
	r := m.Recipients[0]
	if r.LastCode != 451 || r.LastEnhancedCode != "4.4.2" || !strings.Contains(r.LastText, "may have the message") {
		t.Fatalf("recipient %+v, want deferred with the ambiguous reply", r)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.AttemptAmbiguous || m.Attempts[0].Source != db.AttemptSourceLocal {
		t.Fatalf("attempts %+v, want one ambiguous local row", m.Attempts)
	}
}
