package bounce

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"
)

var (
	testSecret    = []byte("0123456789abcdef0123456789abcdef")
	testOldSecret = []byte("an older secret, still verifying")
	testMsgID     = uuid.MustParse("0190f1a2-7b3c-7d4e-8f60-123456789abc")
)

func newTestVERP(t testing.TB, secrets ...[]byte) *VERP {
	t.Helper()
	if len(secrets) == 0 {
		secrets = [][]byte{testSecret}
	}
	v, err := NewVERP("bounces.example.test", "", secrets)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestVERPRoundTrip(t *testing.T) {
	t.Parallel()
	v := newTestVERP(t)
	tests := []struct {
		name string
		rcpt RecipientRef
	}{
		{"message only", RecipientRef{}},
		{"first recipient", RecipientAt(0)},
		{"large position", RecipientAt(1<<32 - 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			addr := v.Address(testMsgID, tt.rcpt)
			local, domain, _ := strings.Cut(addr, "@")
			if domain != "bounces.example.test" {
				t.Fatalf("domain %q", domain)
			}
			if len(local) > 64 {
				t.Fatalf("local part %q is %d octets, RFC 5321 allows 64", local, len(local))
			}
			if !strings.HasPrefix(local, "b+") || strings.ToLower(local) != local {
				t.Fatalf("local part %q: want lower-case b+token", local)
			}
			for _, spelled := range []string{addr, strings.ToUpper(addr), "<" + addr + ">", addr + "."} {
				tok, err := v.Parse(spelled)
				if err != nil {
					t.Fatalf("Parse(%q): %v", spelled, err)
				}
				if tok.Message != testMsgID || tok.Recipient != tt.rcpt {
					t.Fatalf("Parse(%q) = %+v, want %v %+v", spelled, tok, testMsgID, tt.rcpt)
				}
			}
		})
	}
}

func TestVERPLengths(t *testing.T) {
	t.Parallel()
	v, err := NewVERP("b.example.test", "bounce-posth", [][]byte{testSecret})
	if err != nil {
		t.Fatal(err)
	}
	local, _, _ := strings.Cut(v.Address(testMsgID, RecipientAt(7)), "@")
	if want := len("bounce-posth+") + 50; len(local) != want {
		t.Fatalf("local part is %d octets, want %d", len(local), want)
	}
	local, _, _ = strings.Cut(v.Address(testMsgID, RecipientRef{}), "@")
	if want := len("bounce-posth+") + 44; len(local) != want {
		t.Fatalf("message-only local part is %d octets, want %d", len(local), want)
	}
}

func TestVERPRotation(t *testing.T) {
	t.Parallel()
	old := newTestVERP(t, testOldSecret)
	rotated := newTestVERP(t, testSecret, testOldSecret)
	retired := newTestVERP(t, testSecret)

	signedOld := old.Address(testMsgID, RecipientAt(3))
	if tok, err := rotated.Parse(signedOld); err != nil || tok.Recipient != RecipientAt(3) {
		t.Fatalf("rotated codec refuses an address signed with the old secret: %+v, %v", tok, err)
	}
	if _, err := retired.Parse(signedOld); !errors.Is(err, ErrBadMAC) {
		t.Fatalf("codec without the old secret: err = %v, want ErrBadMAC", err)
	}
	if got, want := rotated.Address(testMsgID, RecipientAt(3)), retired.Address(testMsgID, RecipientAt(3)); got != want {
		t.Fatalf("the first secret must sign: %q != %q", got, want)
	}
}

func TestVERPRefuses(t *testing.T) {
	t.Parallel()
	v := newTestVERP(t)
	good := v.Address(testMsgID, RecipientAt(1))
	local, _, _ := strings.Cut(good, "@")
	token := strings.TrimPrefix(local, "b+")

	other := newTestVERP(t, []byte("someone else's secret, 32 bytes!"))
	// Flip one character of the token to another valid base32 character.
	flip := func(s string, i int) string {
		c := byte('a')
		if s[i] == 'a' {
			c = 'b'
		}
		return s[:i] + string(c) + s[i+1:]
	}
	// Swap the recipient position while keeping the MAC.
	otherRcpt := v.Address(testMsgID, RecipientAt(2))

	tests := []struct {
		name string
		addr string
		want error
	}{
		{"other domain", "b+" + token + "@example.test", ErrWrongDomain},
		{"subdomain", "b+" + token + "@x.bounces.example.test", ErrWrongDomain},
		{"no domain", "b+" + token, ErrMalformed},
		{"no prefix", token + "@bounces.example.test", ErrMalformed},
		{"wrong prefix", "c+" + token + "@bounces.example.test", ErrMalformed},
		{"empty token", "b+@bounces.example.test", ErrMalformed},
		{"not base32", "b+" + strings.Repeat("1", 50) + "@bounces.example.test", ErrMalformed},
		{"truncated", "b+" + token[:len(token)-2] + "@bounces.example.test", ErrMalformed},
		{"extended", "b+" + token + "aaaaaaaa@bounces.example.test", ErrMalformed},
		{"non-canonical last character", "b+" + token[:len(token)-1] + spareBitsSet(token[len(token)-1]) + "@bounces.example.test", ErrMalformed},
		{"too long", "b+" + strings.Repeat("a", 70) + "@bounces.example.test", ErrMalformed},
		{"altered first character", "b+" + flip(token, 0) + "@bounces.example.test", ErrMalformed},
		{"altered message id", "b+" + flip(token, 10) + "@bounces.example.test", ErrBadMAC},
		{"altered position", "b+" + flip(token, 30) + "@bounces.example.test", ErrBadMAC},
		{"altered mac", "b+" + flip(token, 45) + "@bounces.example.test", ErrBadMAC},
		{"mac of another recipient", "b+" + token[:34] + strings.TrimPrefix(strings.Split(otherRcpt, "@")[0], "b+")[34:] + "@bounces.example.test", ErrBadMAC},
		{"forged with another secret", other.Address(testMsgID, RecipientAt(1)), ErrBadMAC},
		{"guessed", "b+" + strings.Repeat("c", 50) + "@bounces.example.test", ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tok, err := v.Parse(tt.addr)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Parse(%q) = %+v, %v; want %v", tt.addr, tok, err, tt.want)
			}
		})
	}
}

// spareBitsSet returns the base32 character that decodes to the same data
// bits as c in a 50-character token (whose last character carries 3 data bits
// and 2 spare ones) but with a spare bit set.
func spareBitsSet(c byte) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz234567"
	i := strings.IndexByte(alphabet, c)
	return string(alphabet[i^1])
}

func TestNewVERPValidation(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		domain  string
		prefix  string
		secrets [][]byte
		want    string
	}{
		{"empty domain", "", "b", [][]byte{testSecret}, "verp domain"},
		{"bad domain", "exa mple.test", "b", [][]byte{testSecret}, "verp domain"},
		{"prefix too long", "example.test", "fourteenchars!", [][]byte{testSecret}, "verp prefix"},
		{"prefix with plus", "example.test", "b+x", [][]byte{testSecret}, "verp prefix"},
		{"no secrets", "example.test", "b", nil, "verp secrets"},
		{"short secret", "example.test", "b", [][]byte{testSecret, []byte("short")}, "verp secrets: secret 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := NewVERP(tt.domain, tt.prefix, tt.secrets)
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("err = %v, want prefix %q", err, tt.want)
			}
		})
	}
}

func TestVERPCopiesSecrets(t *testing.T) {
	t.Parallel()
	secret := append([]byte(nil), testSecret...)
	v := newTestVERP(t, secret)
	addr := v.Address(testMsgID, RecipientRef{})
	secret[0] ^= 0xff
	if _, err := v.Parse(addr); err != nil {
		t.Fatalf("changing the caller's slice changed the codec: %v", err)
	}
}
