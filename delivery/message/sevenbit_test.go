package message_test

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	gomessage "github.com/emersion/go-message"

	"github.com/posthaste/posthaste/delivery/message"
)

// leaves returns the content type and decoded body of every leaf of raw.
func leaves(t *testing.T, raw []byte) [][2]string {
	t.Helper()
	e, err := gomessage.Read(bytes.NewReader(raw))
	if err != nil && !gomessage.IsUnknownCharset(err) {
		t.Fatalf("parse: %v", err)
	}
	var out [][2]string
	err = e.Walk(func(_ []int, p *gomessage.Entity, err error) error {
		if err != nil && !gomessage.IsUnknownCharset(err) {
			return err
		}
		mt, _, _ := p.Header.ContentType()
		if strings.HasPrefix(mt, "multipart/") {
			return nil
		}
		b, err := io.ReadAll(p.Body)
		if err != nil {
			return err
		}
		out = append(out, [2]string{mt, string(b)})
		return nil
	})
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	return out
}

func TestTo7Bit(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		raw  []byte
		want [][2]string // content type and decoded body of each leaf
	}{
		{"single text part", lines(
			"From: a@example.test",
			"MIME-Version: 1.0",
			"Content-Type: text/plain; charset=utf-8",
			"Content-Transfer-Encoding: 8bit",
			"",
			"Grüße, "+strings.Repeat("ä", 100),
			"Zeile zwei =?utf-8?q?x?= trailing space ",
		), [][2]string{{"text/plain", "Grüße, " + strings.Repeat("ä", 100) + "\r\nZeile zwei =?utf-8?q?x?= trailing space \r\n"}}},
		{"text without final line break", []byte(
			"From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnö"),
			[][2]string{{"text/plain", "nö"}}},
		{"nested multipart with a binary part", lines(
			"From: a@example.test",
			"MIME-Version: 1.0",
			`Content-Type: multipart/mixed; boundary="outer"`,
			"Content-Transfer-Encoding: 8bit",
			"",
			"preamble is dropped",
			"--outer",
			`Content-Type: multipart/alternative; boundary="inner"`,
			"",
			"--inner",
			"Content-Type: text/plain; charset=utf-8",
			"",
			"hé",
			"--inner",
			"Content-Type: text/html; charset=utf-8",
			"Content-Transfer-Encoding: 7bit",
			"",
			"<p>hé</p>",
			"--inner--",
			"--outer",
			"Content-Type: image/png",
			"Content-Transfer-Encoding: binary",
			"",
			"\x89PNG\x00\xff",
			"--outer",
			"Content-Type: application/pdf",
			"Content-Transfer-Encoding: base64",
			"",
			"JVBERg==",
			"--outer--",
			"epilogue",
		), [][2]string{{"text/plain", "hé"}, {"text/html", "<p>hé</p>"}, {"image/png", "\x89PNG\x00\xff"}, {"application/pdf", "%PDF"}}},
		{"message/rfc822", lines(
			"From: a@example.test",
			"MIME-Version: 1.0",
			`Content-Type: multipart/mixed; boundary="b"`,
			"",
			"--b",
			"Content-Type: message/rfc822",
			"Content-Transfer-Encoding: 8bit",
			"",
			"From: c@example.test",
			"Subject: inner",
			"",
			"innen ö",
			"--b--",
		), [][2]string{{"message/rfc822", // the embedded message gets RFC 1428's fields at its top
			"Content-Transfer-Encoding: quoted-printable\r\nMime-Version: 1.0\r\nContent-Type: text/plain; charset=unknown-8bit\r\n" +
				"From: c@example.test\r\nSubject: inner\r\n\r\ninnen =C3=B6=\r\n"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			out, err := message.To7Bit(tt.raw)
			if err != nil {
				t.Fatal(err)
			}
			if message.Has8Bit(out) {
				t.Fatalf("8-bit octets left:\n%s", out)
			}
			for i, line := range strings.Split(string(out), "\r\n") {
				if len(line) > 998 || strings.ContainsAny(line, "\r\n") {
					t.Fatalf("line %d is %d octets or has a bare CR or LF", i+1, len(line))
				}
			}
			got := leaves(t, out)
			if len(got) != len(tt.want) {
				t.Fatalf("leaves %q, want %q\n%s", got, tt.want, out)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("leaf %d = %q, want %q", i, got[i], tt.want[i])
				}
			}
		})
	}
}

// TestTo7BitNonMIME checks RFC 1428's labels on a message without MIME
// fields.
func TestTo7BitNonMIME(t *testing.T) {
	t.Parallel()
	raw := lines("From: a@example.test", "Subject: old", "", "Grüße")
	out, err := message.To7Bit(raw)
	if err != nil {
		t.Fatal(err)
	}
	e, err := gomessage.Read(bytes.NewReader(out))
	if err == nil || !gomessage.IsUnknownCharset(err) {
		t.Fatalf("read: %v, want the unknown-8bit charset left to the reader", err)
	}
	mt, params, _ := e.Header.ContentType()
	if mt != "text/plain" || params["charset"] != "unknown-8bit" || e.Header.Get("Mime-Version") != "1.0" ||
		e.Header.Get("Content-Transfer-Encoding") != "quoted-printable" {
		t.Fatalf("header:\n%s", out)
	}
	if b, _ := io.ReadAll(e.Body); string(b) != "Grüße\r\n" {
		t.Fatalf("body %q", b)
	}
}

func TestTo7BitUnchangedWhenSevenBit(t *testing.T) {
	t.Parallel()
	raw := lines("From: a@example.test", "MIME-Version: 1.0", "Content-Transfer-Encoding: 8bit", "", "ascii")
	out, err := message.To7Bit(raw)
	if err != nil || !bytes.Equal(out, raw) {
		t.Fatalf("To7Bit = %q, %v; want the message unchanged", out, err)
	}
}

func TestTo7BitRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		raw       []byte
		headerErr bool
	}{
		{"8-bit part header", lines(
			"From: a@example.test", "MIME-Version: 1.0", `Content-Type: multipart/mixed; boundary="b"`, "",
			"--b", `Content-Type: application/octet-stream; name="ä.bin"`, "", "\xff", "--b--"), true},
		{"8-bit top header", lines("From: a@example.test", "Subject: ä", "", "body"), true},
		{"8-bit octets in quoted-printable", lines(
			"From: a@example.test", "MIME-Version: 1.0", "Content-Transfer-Encoding: quoted-printable", "", "ä"), false},
		{"multipart without boundary", lines(
			"From: a@example.test", "MIME-Version: 1.0", "Content-Type: multipart/mixed", "", "ä"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := message.To7Bit(tt.raw)
			if err == nil {
				t.Fatal("converted")
			}
			if got := errors.Is(err, message.ErrEightBitHeader); got != tt.headerErr {
				t.Fatalf("err = %v; ErrEightBitHeader %t, want %t", err, got, tt.headerErr)
			}
		})
	}
}
