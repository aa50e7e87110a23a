package service

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	"github.com/posthaste/posthaste/internal/hostname"
	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/internal/netguard"
)

// Defaults for Config.
const (
	// DefaultMaxRecipients is the default limit on to, cc and bcc entries of one message.
	DefaultMaxRecipients = 50
	// DefaultMaxMessageBytes is the default limit on a message's encoded size.
	DefaultMaxMessageBytes int64 = 10 << 20
	// DefaultIdempotencyTTL is how long an idempotency key is remembered by default.
	DefaultIdempotencyTTL = 24 * time.Hour
	// MinIdempotencyTTL is the shortest IdempotencyTTL: the API documents
	// that keys are kept at least this long.
	MinIdempotencyTTL = 24 * time.Hour
	// DefaultWebhookSecretGrace is how long a rotated webhook secret keeps
	// signing by default.
	DefaultWebhookSecretGrace = 24 * time.Hour
	// DefaultAPIKeyCacheTTL is how long a looked-up API key is trusted by
	// default.
	DefaultAPIKeyCacheTTL = time.Second
)

// Config configures a Server.
type Config struct {
	// MaxRecipients limits the entries in to, cc and bcc together (and the
	// recipients of a raw message). Defaults to 50.
	MaxRecipients int
	// MaxMessageBytes limits the size of the message as stored and sent: the
	// encoded MIME, attachments in base64 included. Defaults to 10 MiB.
	MaxMessageBytes int64
	// Hostname names this host in a Message-ID when the sender's domain cannot
	// be used, such as an address literal. It must be a fully qualified
	// domain name. Defaults to hostname.Default(): the machine's name when
	// it is fully qualified, else localhost.localdomain.
	Hostname string
	// IdempotencyTTL is how long an idempotency key and its answer are kept.
	// The API promises callers at least MinIdempotencyTTL, so a retry sent
	// the next day is still recognised. Defaults to 24h.
	IdempotencyTTL time.Duration
	// WebhookGuard decides which addresses a webhook URL may point at: a
	// URL whose host is, or resolves to, an address it refuses is refused.
	// Defaults to netguard.New(), which refuses loopback, private,
	// link-local and metadata addresses.
	WebhookGuard *netguard.Guard
	// WebhookResolver resolves webhook URL hosts for WebhookGuard.
	// Defaults to net.DefaultResolver.
	WebhookResolver netguard.Resolver
	// WebhookSecretGrace is how long a rotated webhook secret keeps signing
	// alongside the new one. Defaults to 24h.
	WebhookSecretGrace time.Duration
	// APIKeyCacheTTL is how long a looked-up API key is trusted before it is
	// looked up again, so a busy key costs one query per TTL rather than one
	// per call. A revoked key is therefore refused within this time.
	// Negative looks every call up. Defaults to 1s.
	APIKeyCacheTTL time.Duration
	// KeyEncryptionKey seals DKIM private keys at rest (AES-256-GCM): 32
	// bytes, see internal/keyenc. Without it domains cannot be added or
	// rotated, and stored keys cannot sign. Defaults to none.
	KeyEncryptionKey []byte
	// AllowUnverifiedDomains accepts mail whose From domain is not a
	// verified domain of the caller's project; such mail is not signed.
	// Sandbox mode sets it. Defaults to false: such mail is refused.
	AllowUnverifiedDomains bool
	// BounceDomain is the domain of the envelope senders, whose MX and SPF
	// records the domains API suggests. Defaults to "" (none).
	BounceDomain string
	// DomainResolver looks up DNS records to verify domains. Defaults to
	// net.DefaultResolver; the process passes one that asks the DNS server
	// delivery uses.
	DomainResolver DomainResolver
	// DKIMKeyGrace is how long a replaced DKIM key stays published after a
	// rotation. Defaults to 7 days.
	DKIMKeyGrace time.Duration
	// DomainCacheTTL is how long a project's verified domains and keys are
	// trusted before they are read again, so signing costs no query on most
	// messages; another instance's verification or deletion takes effect
	// within it. Negative reads every message. Defaults to 5s.
	DomainCacheTTL time.Duration
	// RequestsPerSecond is the default request rate of every API key, per
	// instance (a token bucket per key holding one second's worth); a
	// key's or its project's override in the database wins. 0 is no
	// limit. Defaults to 0.
	RequestsPerSecond int
	// RecipientsPerDay is the default number of recipients a project may
	// send to per UTC day, over all instances (a counter in the
	// database); a project's override wins. 0 is no limit. Defaults to 0.
	RecipientsPerDay int64
	// Intake configures the group commit that stores accepted messages.
	// Defaults to db.CommitterConfig's defaults.
	Intake db.CommitterConfig
	// Logger receives errors that are not the caller's fault. Defaults to a
	// logger that discards everything.
	Logger *slog.Logger
	// Observer is told about every finished API call, for metrics.
	// Defaults to nil: nothing is told.
	Observer CallObserver
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.MaxRecipients == 0 {
		c.MaxRecipients = DefaultMaxRecipients
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = DefaultMaxMessageBytes
	}
	if c.Hostname == "" {
		c.Hostname = hostname.Default()
	}
	if c.IdempotencyTTL == 0 {
		c.IdempotencyTTL = DefaultIdempotencyTTL
	}
	if c.WebhookGuard == nil {
		c.WebhookGuard = netguard.New()
	}
	if c.WebhookResolver == nil {
		c.WebhookResolver = net.DefaultResolver
	}
	if c.WebhookSecretGrace == 0 {
		c.WebhookSecretGrace = DefaultWebhookSecretGrace
	}
	if c.APIKeyCacheTTL == 0 {
		c.APIKeyCacheTTL = DefaultAPIKeyCacheTTL
	}
	if c.DomainResolver == nil {
		c.DomainResolver = net.DefaultResolver
	}
	if c.DKIMKeyGrace == 0 {
		c.DKIMKeyGrace = DefaultDKIMKeyGrace
	}
	if c.DomainCacheTTL == 0 {
		c.DomainCacheTTL = DefaultDomainCacheTTL
	}
	c.Intake = c.Intake.WithDefaults()
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports the first problem with c after defaults are applied,
// as New would, so a process can refuse a bad configuration before it
// starts anything. The error starts with the field's name.
func (c Config) Validate() error {
	return c.WithDefaults().validate()
}

func (c Config) validate() error {
	if c.MaxRecipients < 1 {
		return fmt.Errorf("MaxRecipients: must be at least 1, got %d", c.MaxRecipients)
	}
	// Below a few KiB not even the headers of an ordinary message fit.
	if c.MaxMessageBytes < 4<<10 {
		return fmt.Errorf("MaxMessageBytes: must be at least 4096, got %d", c.MaxMessageBytes)
	}
	// gRPC message sizes are int32 on the wire side of the library; the
	// server accepts requests up to twice this limit.
	if c.MaxMessageBytes > 512<<20 {
		return fmt.Errorf("MaxMessageBytes: must be at most 512 MiB, got %d", c.MaxMessageBytes)
	}
	if c.Hostname == "" {
		return errors.New("Hostname: required")
	}
	if !isHostname(c.Hostname) || !strings.Contains(c.Hostname, ".") {
		return fmt.Errorf("Hostname: %q is not a fully qualified host name", c.Hostname)
	}
	if _, _, err := message.NormalizeMailbox("postmaster@" + c.Hostname); err != nil {
		return fmt.Errorf("Hostname: %q cannot be a Message-ID domain: %w", c.Hostname, err)
	}
	if err := c.Intake.Validate(); err != nil {
		return fmt.Errorf("Intake.%w", err)
	}
	if c.IdempotencyTTL < MinIdempotencyTTL {
		return fmt.Errorf("IdempotencyTTL: must be at least %s, got %s", MinIdempotencyTTL, c.IdempotencyTTL)
	}
	if c.KeyEncryptionKey != nil {
		if _, err := keyenc.New(c.KeyEncryptionKey); err != nil {
			return fmt.Errorf("KeyEncryptionKey: %w", err)
		}
	}
	if c.BounceDomain != "" {
		if _, err := NormalizeDomainName(c.BounceDomain); err != nil {
			return fmt.Errorf("BounceDomain: %q %w", c.BounceDomain, err)
		}
	}
	if c.DKIMKeyGrace < 0 {
		return fmt.Errorf("DKIMKeyGrace: must not be negative, got %s", c.DKIMKeyGrace)
	}
	if c.RequestsPerSecond < 0 {
		return fmt.Errorf("RequestsPerSecond: must not be negative, got %d", c.RequestsPerSecond)
	}
	if c.RecipientsPerDay < 0 {
		return fmt.Errorf("RecipientsPerDay: must not be negative, got %d", c.RecipientsPerDay)
	}
	if c.WebhookSecretGrace < 0 {
		return fmt.Errorf("WebhookSecretGrace: must not be negative, got %s", c.WebhookSecretGrace)
	}
	return nil
}

// isHostname reports whether h is made of LDH labels (RFC 1123 section
// 2.1), which is what a Message-ID's id-right may safely hold.
func isHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
