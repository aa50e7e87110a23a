package message

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/textproto"
	"strings"

	"github.com/emersion/go-msgauth/dkim"
)

// DKIM key algorithms: RSA (RFC 6376 section 3.3.1) and Ed25519 (RFC 8463).
const (
	DKIMRSA     = "rsa"
	DKIMEd25519 = "ed25519"
)

// DKIMRSABits is the size of generated RSA keys. RFC 8301 section 3.2 asks
// for at least 1024 bits and recommends 2048; 2048 still fits a DNS TXT
// record (as several strings) that every DNS host accepts.
const DKIMRSABits = 2048

// DKIMKey is a parsed private key and where its public half is published:
// the TXT record <Selector>._domainkey.<Domain> (RFC 6376 section 3.6.2.1).
type DKIMKey struct {
	// Domain is the signing domain, the signature's d= tag.
	Domain string
	// Selector is the s= tag.
	Selector string
	// Signer is the private key: *rsa.PrivateKey or ed25519.PrivateKey.
	Signer crypto.Signer
}

// GenerateDKIMKey makes a key pair for algorithm (DKIMRSA or DKIMEd25519)
// and returns the private key in PKCS #8 DER, to be stored sealed, and the
// public key as the DNS record's p= value.
func GenerateDKIMKey(algorithm string) (privateDER []byte, publicKey string, err error) {
	var signer crypto.Signer
	switch algorithm {
	case DKIMRSA:
		signer, err = rsa.GenerateKey(rand.Reader, DKIMRSABits)
	case DKIMEd25519:
		_, signer, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, "", fmt.Errorf("unknown DKIM key algorithm %q; want rsa or ed25519", algorithm)
	}
	if err != nil {
		return nil, "", fmt.Errorf("generate %s key: %w", algorithm, err)
	}
	privateDER, err = x509.MarshalPKCS8PrivateKey(signer)
	if err != nil {
		return nil, "", fmt.Errorf("marshal %s key: %w", algorithm, err)
	}
	publicKey, err = DKIMPublicKey(signer.Public())
	if err != nil {
		return nil, "", err
	}
	return privateDER, publicKey, nil
}

// DKIMPublicKey encodes a public key as a DKIM record's p= value: the DER
// SubjectPublicKeyInfo for RSA, which is what RFC 6376's own examples and
// every verifier read, and the bare 32 octets for Ed25519 (RFC 8463 section
// 4.2), both in base64.
func DKIMPublicKey(pub crypto.PublicKey) (string, error) {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return "", fmt.Errorf("marshal rsa public key: %w", err)
		}
		return base64.StdEncoding.EncodeToString(der), nil
	case ed25519.PublicKey:
		return base64.StdEncoding.EncodeToString(pub), nil
	default:
		return "", fmt.Errorf("unsupported DKIM public key %T", pub)
	}
}

// ParseDKIMKey parses a PKCS #8 private key made by GenerateDKIMKey.
func ParseDKIMKey(privateDER []byte) (crypto.Signer, error) {
	k, err := x509.ParsePKCS8PrivateKey(privateDER)
	if err != nil {
		return nil, fmt.Errorf("parse DKIM private key: %w", err)
	}
	switch k := k.(type) {
	case *rsa.PrivateKey:
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	default:
		return nil, fmt.Errorf("unsupported DKIM private key %T", k)
	}
}

// DKIMRecord is the TXT record to publish for a key (RFC 6376 section
// 3.6.1): "v=DKIM1; k=rsa; p=...". A DNS host splits it into strings of
// at most 255 octets, which verifiers join again.
func DKIMRecord(algorithm, publicKey string) string {
	return "v=DKIM1; k=" + algorithm + "; p=" + publicKey
}

// dkimSignedFields are the fields signed when present, per RFC 6376 section
// 5.4.1's recommendations, plus List-Unsubscribe and List-Unsubscribe-Post,
// which RFC 8058 section 4 requires to be signed for one-click
// unsubscription.
var dkimSignedFields = []string{
	"From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID",
	"MIME-Version", "Content-Type", "List-Unsubscribe", "List-Unsubscribe-Post",
}

// SignDKIM returns raw signed with key: relaxed/relaxed canonicalization
// (RFC 6376 section 3.4), SHA-256, its DKIM-Signature field prepended (RFC
// 6376 section 5.6). Of dkimSignedFields, those present are signed, and
// From once more than it occurs, so that a From field added in transit
// breaks the signature (RFC 6376 section 8.15, "oversigning"), since From
// is what DMARC aligns on (RFC 7489 section 3.1).
//
// A message with 8-bit content is first converted to 7 bits (To7Bit), and
// the converted bytes are signed: a relay without 8BITMIME would otherwise
// convert it after signing and break the signature (RFC 6376 section 5.3).
// A message To7Bit cannot convert is signed as it is; it could not be
// converted at delivery either, so its signature stays valid wherever it
// goes. The result never shares raw's memory.
func SignDKIM(raw []byte, key DKIMKey) ([]byte, error) {
	if Has8Bit(raw) {
		if converted, err := To7Bit(raw); err == nil {
			raw = converted
		}
	}
	fields := signedFields(raw)
	s, err := dkim.NewSigner(&dkim.SignOptions{
		Domain:                 key.Domain,
		Selector:               key.Selector,
		Signer:                 key.Signer,
		Hash:                   crypto.SHA256,
		HeaderCanonicalization: dkim.CanonicalizationRelaxed,
		BodyCanonicalization:   dkim.CanonicalizationRelaxed,
		HeaderKeys:             fields,
	})
	if err != nil {
		return nil, fmt.Errorf("dkim signer for %s: %w", key.Domain, err)
	}
	if _, err := s.Write(raw); err != nil {
		s.Close()
		return nil, fmt.Errorf("dkim sign for %s: %w", key.Domain, err)
	}
	if err := s.Close(); err != nil {
		return nil, fmt.Errorf("dkim sign for %s: %w", key.Domain, err)
	}
	sig := s.Signature()
	out := make([]byte, 0, len(sig)+len(raw))
	out = append(out, sig...)
	return append(out, raw...), nil
}

// signedFields returns the h= list for raw: the dkimSignedFields present,
// each as often as it occurs, and From once more.
func signedFields(raw []byte) []string {
	counts := make(map[string]int, len(dkimSignedFields))
	for _, name := range headerFieldNames(raw) {
		counts[textproto.CanonicalMIMEHeaderKey(name)]++
	}
	var out []string
	for _, f := range dkimSignedFields {
		for range counts[textproto.CanonicalMIMEHeaderKey(f)] {
			out = append(out, f)
		}
	}
	// From must be signed (RFC 6376 section 5.4); the extra one signs the
	// absence of a second.
	return append(out, "From")
}

// headerFieldNames lists the names of raw's header fields, in order.
func headerFieldNames(raw []byte) []string {
	var names []string
	r := bufio.NewReader(bytes.NewReader(raw))
	for {
		line, err := r.ReadSlice('\n')
		if len(bytes.TrimRight(line, "\r\n")) == 0 {
			return names // the blank line that ends the header, or the end
		}
		if line[0] != ' ' && line[0] != '\t' {
			if name, _, ok := bytes.Cut(line, []byte(":")); ok {
				names = append(names, strings.TrimSpace(string(name)))
			}
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			// A line longer than the buffer: skip the rest of it.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = r.ReadSlice('\n')
			}
		}
		if err == io.EOF {
			return names
		}
	}
}
