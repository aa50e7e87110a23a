package keyenc_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/posthaste/posthaste/internal/keyenc"
)

func newKEK(t *testing.T) *keyenc.KEK {
	t.Helper()
	key, err := keyenc.Parse(keyenc.Generate())
	if err != nil {
		t.Fatal(err)
	}
	k, err := keyenc.New(key)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSealOpen(t *testing.T) {
	t.Parallel()
	k := newKEK(t)
	secret := []byte("-----BEGIN PRIVATE KEY-----")
	sealed := k.Seal(secret, "row-1")
	if bytes.Contains(sealed, secret) {
		t.Fatal("sealed value holds the plaintext")
	}
	if again := k.Seal(secret, "row-1"); bytes.Equal(again, sealed) {
		t.Error("two seals of one value are equal; the nonce must differ")
	}
	got, err := k.Open(sealed, "row-1")
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Open = %q, %v", got, err)
	}
	if _, err := k.Open(sealed, "row-2"); !errors.Is(err, keyenc.ErrWrongKey) {
		t.Errorf("Open in another context: %v, want ErrWrongKey", err)
	}
	if _, err := newKEK(t).Open(sealed, "row-1"); !errors.Is(err, keyenc.ErrWrongKey) {
		t.Errorf("Open with another key: %v, want ErrWrongKey", err)
	}
	tampered := bytes.Clone(sealed)
	tampered[len(tampered)-1] ^= 1
	if _, err := k.Open(tampered, "row-1"); !errors.Is(err, keyenc.ErrWrongKey) {
		t.Errorf("Open of a tampered value: %v, want ErrWrongKey", err)
	}
	if _, err := k.Open([]byte("short"), "row-1"); err == nil {
		t.Error("Open of garbage succeeded")
	}
}

func TestParse(t *testing.T) {
	t.Parallel()
	raw := bytes.Repeat([]byte{0xab}, keyenc.KeySize)
	for _, s := range []string{
		hex.EncodeToString(raw),
		"q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=",
		"q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s",
		"  q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n",
	} {
		got, err := keyenc.Parse(s)
		if err != nil || !bytes.Equal(got, raw) {
			t.Errorf("Parse(%q) = %x, %v", s, got, err)
		}
	}
	for _, s := range []string{"", "short", hex.EncodeToString(raw[:16]), "q6urq6urq6urq6ur"} {
		if _, err := keyenc.Parse(s); err == nil {
			t.Errorf("Parse(%q) succeeded", s)
		}
	}
}

func TestLoadOrCreate(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "sub", "kek")
	key, created, err := keyenc.LoadOrCreate(path)
	if err != nil || !created || len(key) != keyenc.KeySize {
		t.Fatalf("first LoadOrCreate = %d bytes, created %t, %v", len(key), created, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("key file mode %v, want 0600", perm)
	}
	again, created, err := keyenc.LoadOrCreate(path)
	if err != nil || created || !bytes.Equal(again, key) {
		t.Errorf("second LoadOrCreate = created %t, same %t, %v", created, bytes.Equal(again, key), err)
	}
}
