// Package keyenc seals secrets that must be stored readable, such as DKIM
// private keys, under a key-encryption key (KEK) from the configuration, so
// that a copy of the database (a dump, a backup, a replica) does not give
// them away without the KEK.
//
// Sealing is AES-256-GCM with a random 96-bit nonce, bound to a context
// string (the row it belongs to) as additional data, so a sealed value
// copied into another row does not open there.
package keyenc

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// KeySize is the length of a key-encryption key: AES-256.
const KeySize = 32

// format is the first byte of every sealed value, so a later format can be
// told apart.
const format byte = 1

// ErrWrongKey is returned by Open for a value sealed under another KEK, or
// one that was altered.
var ErrWrongKey = errors.New("cannot decrypt: sealed under another key-encryption key, or altered")

// KEK is a key-encryption key. It is safe for concurrent use.
type KEK struct {
	aead cipher.AEAD
	id   string
}

// New returns the KEK made of key, which must be KeySize bytes.
func New(key []byte) (*KEK, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("key-encryption key: want %d bytes, got %d", KeySize, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	// The id names the key in stored rows without revealing it: a hash of
	// 256 random bits tells nothing about them.
	sum := sha256.Sum256(append([]byte("posthaste kek id\x00"), key...))
	return &KEK{aead: aead, id: hex.EncodeToString(sum[:8])}, nil
}

// Parse decodes a key written as 64 hex digits or as standard or URL-safe
// base64 (padded or not) of 32 bytes. Surrounding white space is ignored.
func Parse(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if len(s) == 2*KeySize {
		if b, err := hex.DecodeString(s); err == nil {
			return b, nil
		}
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			if len(b) != KeySize {
				return nil, fmt.Errorf("key-encryption key: want %d bytes, got %d", KeySize, len(b))
			}
			return b, nil
		}
	}
	return nil, fmt.Errorf("key-encryption key: want %d bytes as 64 hex digits or base64", KeySize)
}

// Generate returns a new random key, base64-encoded as Parse reads it.
func Generate() string {
	return base64.StdEncoding.EncodeToString(randomBytes(KeySize))
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	// crypto/rand.Read never fails (it panics rather than return short).
	_, _ = rand.Read(b)
	return b
}

// ID names the key: the first 8 bytes of a hash of it, in hex. Stored next
// to each sealed value so that opening it with another key is reported as
// such rather than as damage.
func (k *KEK) ID() string { return k.id }

// Seal encrypts plaintext bound to context; only Open with the same context
// opens it.
func (k *KEK) Seal(plaintext []byte, context string) []byte {
	nonce := randomBytes(k.aead.NonceSize())
	out := make([]byte, 0, 1+len(nonce)+len(plaintext)+k.aead.Overhead())
	out = append(out, format)
	out = append(out, nonce...)
	return k.aead.Seal(out, nonce, plaintext, []byte(context))
}

// Open decrypts what Seal returned for the same context.
func (k *KEK) Open(sealed []byte, context string) ([]byte, error) {
	n := k.aead.NonceSize()
	if len(sealed) < 1+n+k.aead.Overhead() || sealed[0] != format {
		return nil, errors.New("cannot decrypt: not a sealed value")
	}
	out, err := k.aead.Open(nil, sealed[1:1+n], sealed[1+n:], []byte(context))
	if err != nil {
		return nil, ErrWrongKey
	}
	return out, nil
}

// ReadFile reads a key written as Parse reads it from path.
func ReadFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key-encryption key: %w", err)
	}
	key, err := Parse(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return key, nil
}

// LoadOrCreate reads the key in path, or when there is no such file writes
// a new one there (mode 0600, its directory created 0700 if missing) and
// reports created. It is meant for sandbox and development setups, where
// keeping the key next to the data is acceptable.
func LoadOrCreate(path string) (key []byte, created bool, err error) {
	key, err = ReadFile(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return key, false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, fmt.Errorf("create key-encryption key: %w", err)
	}
	text := Generate()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		// Another process made it first; use theirs.
		key, err = ReadFile(path)
		return key, false, err
	}
	if err != nil {
		return nil, false, fmt.Errorf("create key-encryption key: %w", err)
	}
	if _, err := f.WriteString(text + "\n"); err != nil {
		f.Close()
		return nil, false, fmt.Errorf("write key-encryption key: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, false, fmt.Errorf("write key-encryption key: %w", err)
	}
	key, err = Parse(text)
	return key, true, err
}
