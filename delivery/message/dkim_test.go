package message_test

import (
	"bytes"
	"crypto"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/posthaste/posthaste/delivery/message"
)

// dkimKey makes a key for d with selector s and the TXT record to serve.
func dkimKey(t *testing.T, algorithm, d, s string) (message.DKIMKey, string) {
	t.Helper()
	der, pub, err := message.GenerateDKIMKey(algorithm)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := message.ParseDKIMKey(der)
	if err != nil {
		t.Fatal(err)
	}
	return message.DKIMKey{Domain: d, Selector: s, Signer: signer}, message.DKIMRecord(algorithm, pub)
}

// verifyDKIM verifies raw's signatures against the one record given for
// name, and returns the verifications.
func verifyDKIM(t *testing.T, raw []byte, name, record string) []*dkim.Verification {
	t.Helper()
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(raw), &dkim.VerifyOptions{
		LookupTXT: func(domain string) ([]string, error) {
			if domain != name {
				return nil, errors.New("no such record: " + domain)
			}
			return []string{record}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

func builtMessage(t testing.TB) []byte {
	t.Helper()
	b, err := message.Build(message.Spec{
		From:            message.Address{Name: "Shop", Address: "shop@example.test"},
		To:              []message.Address{{Address: "ada@example.test"}},
		ReplyTo:         []message.Address{{Address: "help@example.test"}},
		Subject:         "Your receipt",
		Text:            "Thanks.\n",
		HTML:            "<p>Thanks.</p>\n",
		Headers:         []message.Header{{Name: "List-Unsubscribe", Value: "<https://example.test/u/1>"}},
		MessageIDDomain: "example.test",
		Date:            time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.Raw
}

func TestSignDKIM(t *testing.T) {
	t.Parallel()
	for _, alg := range []string{message.DKIMRSA, message.DKIMEd25519} {
		t.Run(alg, func(t *testing.T) {
			t.Parallel()
			key, record := dkimKey(t, alg, "example.test", "ph1")
			raw := builtMessage(t)
			signed, err := message.SignDKIM(raw, key)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(signed, []byte("DKIM-Signature: ")) || !bytes.HasSuffix(signed, raw) {
				t.Fatalf("signature not prepended:\n%s", signed)
			}
			vs := verifyDKIM(t, signed, "ph1._domainkey.example.test", record)
			if len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.test" {
				t.Fatalf("verification %+v", vs[0])
			}
			h := strings.Join(vs[0].HeaderKeys, ":")
			for _, want := range []string{"From", "To", "Subject", "Date", "Message-Id", "Reply-To", "Mime-Version", "Content-Type", "List-Unsubscribe"} {
				if !strings.Contains(strings.ToLower(h), strings.ToLower(want)) {
					t.Errorf("h=%s lacks %s", h, want)
				}
			}
			if strings.Count(strings.ToLower(h), "from") != 2 {
				t.Errorf("h=%s: From is not oversigned", h)
			}
			if strings.Contains(strings.ToLower(h), "cc") {
				t.Errorf("h=%s signs Cc, which the message does not have", h)
			}
			sig := string(signed[:len(signed)-len(raw)])
			for _, tag := range []string{"c=relaxed/relaxed", "a=" + alg + "-sha256", "d=example.test", "s=ph1"} {
				if !strings.Contains(strings.ReplaceAll(sig, "\r\n ", ""), tag) {
					t.Errorf("signature lacks %s:\n%s", tag, sig)
				}
			}

			// A changed body, or a second From field, fails.
			tampered := bytes.Replace(signed, []byte("Thanks."), []byte("Thank!."), 1)
			if vs := verifyDKIM(t, tampered, "ph1._domainkey.example.test", record); vs[0].Err == nil {
				t.Error("tampered body verified")
			}
			i := bytes.Index(signed, []byte("From: "))
			added := append(append(bytes.Clone(signed[:i]), "From: evil@attacker.test\r\n"...), signed[i:]...)
			if vs := verifyDKIM(t, added, "ph1._domainkey.example.test", record); vs[0].Err == nil {
				t.Error("message with an added From verified")
			}
		})
	}
}

// An 8-bit body is converted to 7 bits before signing, so the signature
// survives the relay that would otherwise convert it.
func TestSignDKIMConverts8Bit(t *testing.T) {
	t.Parallel()
	key, record := dkimKey(t, message.DKIMEd25519, "example.test", "ph1")
	raw := []byte("From: shop@example.test\r\nTo: ada@example.test\r\nSubject: hi\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n")
	signed, err := message.SignDKIM(raw, key)
	if err != nil {
		t.Fatal(err)
	}
	if message.Has8Bit(signed) {
		t.Fatalf("signed message still has 8-bit content:\n%s", signed)
	}
	if vs := verifyDKIM(t, signed, "ph1._domainkey.example.test", record); vs[0].Err != nil {
		t.Fatalf("verification: %v", vs[0].Err)
	}
	// Nothing is left for delivery to convert.
	if _, err := message.To7Bit(signed); err != nil {
		t.Fatal(err)
	}
}

func TestDKIMKeys(t *testing.T) {
	t.Parallel()
	if _, _, err := message.GenerateDKIMKey("dsa"); err == nil {
		t.Error("unknown algorithm accepted")
	}
	der, pub, err := message.GenerateDKIMKey(message.DKIMRSA)
	if err != nil {
		t.Fatal(err)
	}
	k, err := message.ParseDKIMKey(der)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := message.DKIMPublicKey(k.Public()); got != pub {
		t.Error("public key of the parsed key differs")
	}
	if _, ok := k.Public().(crypto.PublicKey); !ok {
		t.Error("no public key")
	}
	if _, err := message.ParseDKIMKey([]byte("junk")); err == nil {
		t.Error("junk parsed")
	}
}

// BenchmarkSignDKIM measures what signing adds to each message at intake.
func BenchmarkSignDKIM(b *testing.B) {
	raw := builtMessage(b)
	for _, alg := range []string{message.DKIMRSA, message.DKIMEd25519} {
		b.Run(alg, func(b *testing.B) {
			der, _, err := message.GenerateDKIMKey(alg)
			if err != nil {
				b.Fatal(err)
			}
			signer, err := message.ParseDKIMKey(der)
			if err != nil {
				b.Fatal(err)
			}
			key := message.DKIMKey{Domain: "example.test", Selector: "s1", Signer: signer}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := message.SignDKIM(raw, key); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
