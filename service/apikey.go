package service

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"fmt"
)

const (
	// apiKeyPrefix marks Posthaste keys so secret scanners and people can
	// recognise one in a log or a repository.
	apiKeyPrefix = "ph_"
	// apiKeyRandomBytes is the key's entropy: 256 bits.
	apiKeyRandomBytes = 32
	// apiKeyListPrefixLen is how much of a key is stored in clear to tell
	// keys apart in a listing: "ph_" and 9 characters (45 bits), far too few
	// to help guess the rest.
	apiKeyListPrefixLen = len(apiKeyPrefix) + 9
)

// apiKeyEncoding is lowercase base32 without padding: only [a-z2-7], so a
// key survives shells, URLs and double-click selection unquoted.
var apiKeyEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// NewAPIKey makes a new API key from 32 random bytes. key is the secret to
// hand to the user once; prefix is its first characters, kept in clear for
// listings; hash is what the database stores (see HashAPIKey).
func NewAPIKey() (key, prefix string, hash []byte, err error) {
	b := make([]byte, apiKeyRandomBytes)
	if _, err := rand.Read(b); err != nil {
		return "", "", nil, fmt.Errorf("read random bytes for api key: %w", err)
	}
	key = apiKeyPrefix + apiKeyEncoding.EncodeToString(b)
	return key, APIKeyListPrefix(key), HashAPIKey(key), nil
}

// APIKeyListPrefix is the part of key kept in clear to tell keys apart in a
// listing: apiKeyListPrefixLen characters, but never more than a quarter of
// the key, so a short operator-chosen key (see MinAPIKeyLength) keeps most
// of its secret.
func APIKeyListPrefix(key string) string {
	return key[:min(apiKeyListPrefixLen, len(key)/4)]
}

// HashAPIKey returns the digest under which key is stored and looked up.
//
// A plain SHA-256 is the right tool here, unlike for passwords: a key holds
// 256 random bits, so there is no dictionary to try and a slow, salted hash
// (bcrypt, argon2) would add nothing but latency to every request. Being
// unsalted and deterministic also lets the database find a key by an index
// lookup on its hash, without storing the key itself.
func HashAPIKey(key string) []byte {
	sum := sha256.Sum256([]byte(key))
	return sum[:]
}

// Bounds of a key the service will look up. Operators may choose the first
// key themselves (POSTHASTE_BOOTSTRAP_API_KEY), so the check is plausibility,
// not the exact shape NewAPIKey produces.
const (
	MinAPIKeyLength = 16
	maxAPIKeyLength = 256
)

// plausibleAPIKey reports whether key could be a stored key at all, so
// garbage is refused without a database round trip.
func plausibleAPIKey(key string) bool {
	if len(key) < MinAPIKeyLength || len(key) > maxAPIKeyLength {
		return false
	}
	for i := 0; i < len(key); i++ {
		if key[i] <= ' ' || key[i] > '~' {
			return false
		}
	}
	return true
}
