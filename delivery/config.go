package delivery

import (
	"go.opentelemetry.io/otel/trace"

	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/internal/hostname"
)

// Config configures a Dispatcher.
type Config struct {
	// InstanceID names this process in lease owners; it must differ between
	// processes sharing a database. Defaults to the host name and a random
	// suffix.
	InstanceID string
	// BatchSize is how many recipients a claim picks, oldest due first. The
	// claim also takes the other due recipients of each message at each
	// domain it picked, so that they go out in one transaction; a batch
	// can therefore hold more (see db.ClaimParams.Limit). Defaults to 100.
	BatchSize int
	// PollInterval is how often the outbox is checked without a wake-up, which
	// is what picks up scheduled messages and retries. Defaults to 5s.
	PollInterval time.Duration
	// RescueInterval is how often leases that expired (their holder died or
	// lost the database) are returned to the queue, after this dispatcher
	// has written the outcomes it was keeping for the database to return. A
	// crashed instance's recipients go back to the queue at most
	// LeaseDuration plus RescueInterval after its last renewal (when no
	// other instance rescues them sooner), so it should not be much longer
	// than LeaseDuration. Defaults to a quarter of LeaseDuration.
	RescueInterval time.Duration
	// MaxAttemptDuration caps one delivery attempt as a whole: the DNS
	// lookups, every address tried and the SMTP session, whose steps keep
	// their own timeouts (DNSTimeout, SMTP.ConnectTimeout, CommandTimeout,
	// DataTimeout) inside it. An attempt cut off by the cap is deferred; one
	// still running 5s past it is taken to be stuck, and its lease is no
	// longer renewed. Defaults to 10m.
	MaxAttemptDuration time.Duration
	// LeaseDuration is how long a claim reserves its recipients without a
	// renewal. The dispatcher renews every lease it holds, in one statement,
	// every third of it, so an attempt may last longer than the lease; a
	// dispatcher that dies or freezes stops renewing, and its recipients go
	// back to the queue within about one lease (see RescueInterval). An
	// attempt whose lease could not be renewed for five sixths of it (the
	// database was unreachable) stops before the end of the data, since
	// another dispatcher may take the recipients. Shorter leases recover
	// faster from a crash and tolerate shorter database outages during an
	// attempt. At least 1s. Defaults to 30s.
	LeaseDuration time.Duration
	// Concurrency is the most SMTP transactions in flight at once.
	// Defaults to 100.
	Concurrency int
	// PerDomainConcurrency is the most transactions in flight to one
	// recipient domain. Defaults to 10.
	PerDomainConcurrency int
	// MaxRecipientsPerTransaction is the most RCPT commands in one
	// transaction; RFC 5321 section 4.5.3.1.8 requires servers to take at
	// least 100. Defaults to 100.
	MaxRecipientsPerTransaction int
	// Retry is the retry policy for temporary failures. Defaults to the
	// RetryConfig defaults.
	Retry RetryConfig
	// MaxAmbiguousRetries is how many times a recipient is retried after
	// attempts whose outcome stayed unknown: the connection dropped or
	// timed out after the end of the data was sent and before the reply, so
	// the receiver may have the message. The attempt that would need one
	// retry more ends the recipient failed instead: a limit trades a
	// possible duplicate for a possible loss (see docs/operations.md).
	// Ambiguous attempts are counted over the recipient's life, whatever
	// came between them. 0 retries them like any temporary failure, until
	// Retry.MaxAge. Defaults to 0.
	MaxAmbiguousRetries int
	// SMTP configures the SMTP client. Defaults to the SMTPConfig defaults.
	SMTP SMTPConfig
	// Shaping sets the limits per destination provider (Gmail, Outlook,
	// ...), applied after the MX lookup on top of Concurrency and
	// PerDomainConcurrency. Defaults to the ShapingConfig defaults.
	Shaping ShapingConfig
	// DNSServer is the DNS server ("host" or "host:port") asked for MX and
	// address records. Defaults to "", the nameservers of /etc/resolv.conf;
	// while that file cannot be read, lookups fail as temporary errors (and
	// the file is read again at the next one), but mail to static routes
	// with an IP address, such as sandbox mode's, still goes out.
	DNSServer string
	// DNSTimeout bounds all DNS lookups for one domain. Defaults to 20s.
	DNSTimeout time.Duration
	// DNSCacheSize is the most DNS answers kept for reuse, each for its TTL
	// but at most 5 minutes; a negative value keeps none, as may suit a
	// dispatcher next to a caching resolver. Defaults to 10000.
	DNSCacheSize int
	// Routes maps recipient domains, or "*" for all, to "host" or
	// "host:port"; a route replaces the MX lookup. Routes are trusted: their
	// addresses are not checked against AllowDestinations, and MTA-STS is
	// not looked up for routed domains. Defaults to none.
	Routes map[string]string
	// AllowDestinations are address ranges that MX hosts may resolve to
	// although they are loopback, private, link-local, shared (CGNAT),
	// multicast, unspecified or reserved. An address in those ranges is
	// never connected to otherwise: a domain whose MX points at one would
	// turn the dispatcher into a way to reach internal services (see
	// internal/netguard), so its recipients bounce with a reply that says
	// so. Cloud metadata addresses open only when named exactly (a /32 or
	// /128). The ranges also apply to MTA-STS policy hosts. Defaults to
	// none.
	AllowDestinations []netip.Prefix
	// IPVersion chooses the address families of MX hosts: "prefer-4" (each
	// host's IPv4 addresses, then its IPv6 ones), "prefer-6" (the reverse),
	// "4" (IPv4 only; AAAA is not looked up) or "6" (IPv6 only). Hosts are
	// tried in MX preference order whatever the choice. Defaults to
	// "prefer-4": the sending addresses most likely to have the reverse DNS
	// and reputation receivers check are IPv4 ones.
	IPVersion string
	// TLSPolicies maps recipient domains to a TLS policy: "none",
	// "opportunistic", "require" or "require-verified" (see TLSPolicy). A
	// configured policy takes the place of the domain's MTA-STS policy.
	// Defaults to none: opportunistic TLS, or the domain's MTA-STS policy.
	TLSPolicies map[string]string
	// MTASTS configures MTA-STS (RFC 8461). Defaults to the MTASTSConfig
	// defaults.
	MTASTS MTASTSConfig
	// ShutdownTimeout bounds Stop. Transactions in flight may finish until
	// only the last quarter of it (at most 5s) is left; then they are
	// interrupted, and that time is kept to record their outcomes (their
	// recipients are deferred) and to close connections. Defaults to 30s.
	ShutdownTimeout time.Duration
	// VERP, when set, makes the envelope sender of every transaction a
	// VERP address at its bounce domain, naming the message and, for a
	// transaction with one recipient, the recipient (see
	// Dispatcher.returnPath); the From header is unchanged. Bounces,
	// complaints and automatic replies then come back to the bounce
	// listener. Defaults to nil: the message's own envelope sender is used,
	// and they go to that mailbox.
	VERP *bounce.VERP
	// Dialer opens SMTP connections. Defaults to a *net.Dialer.
	Dialer Dialer
	// Logger receives the dispatcher's logs. Defaults to discarding them.
	Logger *slog.Logger
	// Observer is told about SMTP attempts, session steps, connections and
	// final outcomes, for metrics. Defaults to nil: nothing is told.
	Observer Observer
	// TracerProvider traces each SMTP attempt as a span. Defaults to nil:
	// no spans.
	TracerProvider trace.TracerProvider
}

// SMTPConfig configures the SMTP client. Its timeouts bound single steps of
// a session; Config.MaxAttemptDuration bounds the attempt they are part of.
type SMTPConfig struct {
	// Hostname is sent in EHLO (RFC 5321 section 4.1.1.1); receivers
	// compare it with the reverse DNS of the sending address. Defaults to
	// the machine's host name.
	Hostname string
	// Port is the port of MX hosts. Defaults to 25.
	Port int
	// ConnectTimeout bounds the TCP connect. Defaults to 30s.
	ConnectTimeout time.Duration
	// CommandTimeout bounds the wait for each reply, the greeting included
	// (RFC 5321 section 4.5.3.2 suggests 5 minutes). Defaults to 5m.
	CommandTimeout time.Duration
	// DataTimeout bounds writing the message body and, separately, the wait
	// for the reply to its end (RFC 5321 section 4.5.3.2.6). Defaults to 10m.
	DataTimeout time.Duration
	// IdleTimeout is how long a connection waits for another transaction
	// before QUIT. Defaults to 5s.
	IdleTimeout time.Duration
	// MaxReuse is the most transactions on one connection. Defaults to 100.
	MaxReuse int
	// MaxHosts is the most addresses (MX hosts times their IPs) tried in
	// one attempt, like Postfix's smtp_mx_address_limit. Defaults to 5.
	MaxHosts int
	// VerifyTLS makes a certificate that does not verify fail the host
	// under the opportunistic policy; servers without STARTTLS still get
	// plain text (TLSRequireVerified refuses those too). Certificates are
	// checked, and the result recorded on the attempt, either way.
	// Defaults to false, as is usual between MTAs (RFC 7435).
	VerifyTLS bool
	// RootCAs are the roots that server certificates, and the HTTPS
	// servers of MTA-STS policies, are verified against. Defaults to nil,
	// the system's roots.
	RootCAs *x509.CertPool
}

// MTASTSConfig configures MTA-STS (RFC 8461): the published policy of a
// recipient domain that asks senders to deliver only to listed MX hosts
// over TLS with a verified certificate.
type MTASTSConfig struct {
	// Disabled turns MTA-STS off: no TXT lookups, no policy fetches.
	// Defaults to false.
	Disabled bool
	// FetchTimeout bounds fetching a policy over HTTPS (RFC 8461 section
	// 3.3 recommends 1 minute). Defaults to 1m.
	FetchTimeout time.Duration
	// RecheckInterval is how long a domain without a policy, or whose
	// policy could not be fetched, is taken at that before the database
	// is asked again or the fetch repeated. A TXT record with a new id is
	// noticed at once. Defaults to 5m.
	RecheckInterval time.Duration
	// CacheSize is the most domains whose policy (or lack of one) is kept
	// in memory in front of the database. Defaults to 10000.
	CacheSize int
}

// WithDefaults returns the config with zero fields set to their defaults.
func (c MTASTSConfig) WithDefaults() MTASTSConfig {
	if c.FetchTimeout == 0 {
		c.FetchTimeout = time.Minute
	}
	if c.RecheckInterval == 0 {
		c.RecheckInterval = 5 * time.Minute
	}
	if c.CacheSize == 0 {
		c.CacheSize = 10000
	}
	return c
}

func (c MTASTSConfig) validate() error {
	switch {
	case c.FetchTimeout <= 0:
		return errors.New("FetchTimeout: must be positive")
	case c.RecheckInterval <= 0:
		return errors.New("RecheckInterval: must be positive")
	case c.CacheSize < 1:
		return errors.New("CacheSize: must be at least 1")
	}
	return nil
}

// IP versions (Config.IPVersion).
const (
	IPPrefer4 = "prefer-4"
	IPPrefer6 = "prefer-6"
	IPOnly4   = "4"
	IPOnly6   = "6"
)

// WithDefaults returns the config with zero fields set to their defaults.
func (c SMTPConfig) WithDefaults() SMTPConfig {
	if c.Hostname == "" {
		c.Hostname = hostname.Default()
	}
	if c.Port == 0 {
		c.Port = 25
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 30 * time.Second
	}
	if c.CommandTimeout == 0 {
		c.CommandTimeout = 5 * time.Minute
	}
	if c.DataTimeout == 0 {
		c.DataTimeout = 10 * time.Minute
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Second
	}
	if c.MaxReuse == 0 {
		c.MaxReuse = 100
	}
	if c.MaxHosts == 0 {
		c.MaxHosts = 5
	}
	return c
}

func (c SMTPConfig) validate() error {
	switch {
	case c.Hostname == "" || strings.ContainsAny(c.Hostname, " \r\n\t"):
		return fmt.Errorf("Hostname: %q is not a host name", c.Hostname)
	case c.Port < 1 || c.Port > 65535:
		return fmt.Errorf("Port: %d is out of range", c.Port)
	case c.ConnectTimeout <= 0:
		return errors.New("ConnectTimeout: must be positive")
	case c.CommandTimeout <= 0:
		return errors.New("CommandTimeout: must be positive")
	case c.DataTimeout <= 0:
		return errors.New("DataTimeout: must be positive")
	case c.IdleTimeout <= 0:
		return errors.New("IdleTimeout: must be positive")
	case c.MaxReuse < 1:
		return errors.New("MaxReuse: must be at least 1")
	case c.MaxHosts < 1:
		return errors.New("MaxHosts: must be at least 1")
	}
	return nil
}

// WithDefaults returns the config with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.InstanceID == "" {
		host, _ := os.Hostname()
		if host == "" {
			host = "posthaste"
		}
		var b [4]byte
		rand.Read(b[:])
		c.InstanceID = host + "-" + hex.EncodeToString(b[:])
	}
	if c.BatchSize == 0 {
		c.BatchSize = 100
	}
	if c.PollInterval == 0 {
		c.PollInterval = 5 * time.Second
	}
	if c.Concurrency == 0 {
		c.Concurrency = 100
	}
	if c.PerDomainConcurrency == 0 {
		c.PerDomainConcurrency = 10
	}
	if c.MaxRecipientsPerTransaction == 0 {
		c.MaxRecipientsPerTransaction = 100
	}
	c.Retry = c.Retry.WithDefaults()
	c.SMTP = c.SMTP.WithDefaults()
	c.MTASTS = c.MTASTS.WithDefaults()
	if c.IPVersion == "" {
		c.IPVersion = IPPrefer4
	}
	c.Shaping = c.Shaping.WithDefaults()
	if c.DNSTimeout == 0 {
		c.DNSTimeout = 20 * time.Second
	}
	if c.DNSCacheSize == 0 {
		c.DNSCacheSize = 10000
	}
	if c.MaxAttemptDuration == 0 {
		c.MaxAttemptDuration = 10 * time.Minute
	}
	if c.LeaseDuration == 0 {
		c.LeaseDuration = 30 * time.Second
	}
	if c.RescueInterval == 0 {
		c.RescueInterval = c.LeaseDuration / 4
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// maxStopReserve caps the part of ShutdownTimeout kept for what follows the
// interruption of transactions in flight: a few database writes and QUITs.
const maxStopReserve = 5 * time.Second

// stopReserve is the part of ShutdownTimeout that Stop keeps after it
// interrupts the transactions in flight.
func (c Config) stopReserve() time.Duration { return min(c.ShutdownTimeout/4, maxStopReserve) }

// minLease is the shortest LeaseDuration allowed: renewed every third of
// it, a shorter lease could be lost to one slow query.
const minLease = time.Second

// renewInterval is how often the heartbeat renews leases.
func (c Config) renewInterval() time.Duration { return c.LeaseDuration / 3 }

func (c Config) validate() error {
	switch {
	case c.InstanceID == "" || strings.ContainsAny(c.InstanceID, " \r\n\t"):
		return fmt.Errorf("InstanceID: %q is not usable", c.InstanceID)
	case c.BatchSize < 1:
		return errors.New("BatchSize: must be at least 1")
	case c.PollInterval <= 0:
		return errors.New("PollInterval: must be positive")
	case c.RescueInterval <= 0:
		return errors.New("RescueInterval: must be positive")
	case c.Concurrency < 1:
		return errors.New("Concurrency: must be at least 1")
	case c.PerDomainConcurrency < 1:
		return errors.New("PerDomainConcurrency: must be at least 1")
	case c.MaxRecipientsPerTransaction < 1:
		return errors.New("MaxRecipientsPerTransaction: must be at least 1")
	case c.MaxAmbiguousRetries < 0:
		return errors.New("MaxAmbiguousRetries: must not be negative")
	case c.DNSTimeout <= 0:
		return errors.New("DNSTimeout: must be positive")
	case c.MaxAttemptDuration <= 0:
		return errors.New("MaxAttemptDuration: must be positive")
	case c.ShutdownTimeout <= 0:
		return errors.New("ShutdownTimeout: must be positive")
	}
	if err := c.Retry.validate(); err != nil {
		return fmt.Errorf("Retry.%w", err)
	}
	if err := c.SMTP.validate(); err != nil {
		return fmt.Errorf("SMTP.%w", err)
	}
	if err := c.Shaping.validate(); err != nil {
		return fmt.Errorf("Shaping.%w", err)
	}
	if c.LeaseDuration < minLease {
		return fmt.Errorf("LeaseDuration: %s is shorter than %s", c.LeaseDuration, minLease)
	}
	if _, err := parseRoutes(c.Routes); err != nil {
		return err
	}
	if _, err := parseTLSPolicies(c.TLSPolicies); err != nil {
		return err
	}
	if err := c.MTASTS.validate(); err != nil {
		return fmt.Errorf("MTASTS.%w", err)
	}
	switch c.IPVersion {
	case IPPrefer4, IPPrefer6, IPOnly4, IPOnly6:
	default:
		return fmt.Errorf("IPVersion: %q is not prefer-4, prefer-6, 4 or 6", c.IPVersion)
	}
	for _, p := range c.AllowDestinations {
		if !p.IsValid() {
			return errors.New("AllowDestinations: holds an invalid prefix")
		}
	}
	return nil
}

// Validate reports the first problem with c after defaults are applied, as
// NewDispatcher would, so a process can refuse a bad configuration before
// it starts anything. The error starts with the field's name.
func (c Config) Validate() error {
	return c.WithDefaults().validate()
}
