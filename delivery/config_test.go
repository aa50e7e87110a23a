package delivery

import (
	"strings"
	"testing"
	"time"
)

func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	c := Config{}.WithDefaults()
	if c.InstanceID == "" || c.BatchSize != 100 || c.PollInterval != 5*time.Second || c.Concurrency != 100 ||
		c.PerDomainConcurrency != 10 || c.MaxRecipientsPerTransaction != 100 || c.ShutdownTimeout != 30*time.Second ||
		c.DNSTimeout != 20*time.Second || c.DNSCacheSize != 10000 || c.Logger == nil {
		t.Fatalf("defaults: %+v", c)
	}
	s := c.SMTP
	if s.Port != 25 || s.ConnectTimeout != 30*time.Second || s.CommandTimeout != 5*time.Minute ||
		s.DataTimeout != 10*time.Minute || s.IdleTimeout != 5*time.Second || s.MaxReuse != 100 || s.VerifyTLS ||
		s.Hostname == "" || s.MaxHosts != 5 {
		t.Fatalf("SMTP defaults: %+v", s)
	}
	r := c.Retry
	if r.InitialInterval != time.Minute || r.Multiplier != 2 || r.MaxInterval != time.Hour || r.Jitter != 0.2 || r.MaxAge != 48*time.Hour {
		t.Fatalf("Retry defaults: %+v", r)
	}
	// One attempt is capped as a whole; the lease is short and renewed, so
	// it does not follow the cap, and a crash costs about one lease.
	if c.MaxAttemptDuration != 10*time.Minute {
		t.Fatalf("MaxAttemptDuration = %s, want 10m", c.MaxAttemptDuration)
	}
	if c.LeaseDuration != 30*time.Second || c.RescueInterval != c.LeaseDuration/4 || c.renewInterval() != 10*time.Second {
		t.Fatalf("LeaseDuration = %s, RescueInterval = %s, renewal every %s; want 30s, 7.5s, 10s",
			c.LeaseDuration, c.RescueInterval, c.renewInterval())
	}
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	if Config.WithDefaults(Config{}).InstanceID == c.InstanceID {
		t.Fatal("two default InstanceIDs are equal")
	}
	// The rescuer follows the lease.
	short := Config{LeaseDuration: 2 * time.Second}.WithDefaults()
	if short.RescueInterval != 500*time.Millisecond || short.MaxAttemptDuration != 10*time.Minute {
		t.Fatalf("with a 2s lease: %+v", short)
	}
	if err := short.validate(); err != nil {
		t.Fatal(err)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		mod     func(*Config)
		wantErr string
	}{
		{"defaults", func(*Config) {}, ""},
		{"instance id with space", func(c *Config) { c.InstanceID = "a b" }, "InstanceID:"},
		{"batch size", func(c *Config) { c.BatchSize = -1 }, "BatchSize:"},
		{"poll interval", func(c *Config) { c.PollInterval = -time.Second }, "PollInterval:"},
		{"rescue interval", func(c *Config) { c.RescueInterval = -time.Second }, "RescueInterval:"},
		{"concurrency", func(c *Config) { c.Concurrency = -1 }, "Concurrency:"},
		{"per domain", func(c *Config) { c.PerDomainConcurrency = -1 }, "PerDomainConcurrency:"},
		{"recipients per transaction", func(c *Config) { c.MaxRecipientsPerTransaction = -5 }, "MaxRecipientsPerTransaction:"},
		{"ambiguous retries", func(c *Config) { c.MaxAmbiguousRetries = -1 }, "MaxAmbiguousRetries:"},
		{"dns timeout", func(c *Config) { c.DNSTimeout = -1 }, "DNSTimeout:"},
		{"max attempt duration", func(c *Config) { c.MaxAttemptDuration = -time.Second }, "MaxAttemptDuration:"},
		{"shutdown timeout", func(c *Config) { c.ShutdownTimeout = -1 }, "ShutdownTimeout:"},
		{"retry", func(c *Config) { c.Retry.Jitter = 2 }, "Retry.Jitter:"},
		{"smtp port", func(c *Config) { c.SMTP.Port = 70000 }, "SMTP.Port:"},
		{"smtp hostname", func(c *Config) { c.SMTP.Hostname = "two words" }, "SMTP.Hostname:"},
		{"smtp max reuse", func(c *Config) { c.SMTP.MaxReuse = -1 }, "SMTP.MaxReuse:"},
		{"smtp max hosts", func(c *Config) { c.SMTP.MaxHosts = -1 }, "SMTP.MaxHosts:"},
		{"smtp timeouts", func(c *Config) { c.SMTP.DataTimeout = -1 }, "SMTP.DataTimeout:"},
		{"lease too short", func(c *Config) { c.LeaseDuration = minLease - time.Millisecond }, "LeaseDuration:"},
		{"shortest lease", func(c *Config) { c.LeaseDuration, c.RescueInterval = minLease, minLease }, ""},
		{"lease shorter than an attempt", func(c *Config) { c.LeaseDuration = c.MaxAttemptDuration / 10 }, ""},
		{"bad route", func(c *Config) { c.Routes = map[string]string{"a.test": "mx.test:x"} }, "Routes:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Config{}.WithDefaults()
			tt.mod(&c)
			checkValidateErr(t, c.validate(), tt.wantErr)
		})
	}
}

func TestNewDispatcherRejectsBadConfig(t *testing.T) {
	t.Parallel()
	_, err := NewDispatcher(Config{LeaseDuration: time.Millisecond}, nil)
	if err == nil || !strings.Contains(err.Error(), "LeaseDuration:") {
		t.Fatalf("err = %v", err)
	}
	if _, err := NewDispatcher(Config{}, nil); err == nil || !strings.Contains(err.Error(), "store") {
		t.Fatalf("nil store: err = %v", err)
	}
}

func TestStopReserve(t *testing.T) {
	t.Parallel()
	for timeout, want := range map[time.Duration]time.Duration{
		time.Second:      250 * time.Millisecond,
		30 * time.Second: maxStopReserve,
		time.Hour:        maxStopReserve,
	} {
		if got := (Config{ShutdownTimeout: timeout}).stopReserve(); got != want {
			t.Errorf("ShutdownTimeout %s: reserve %s, want %s", timeout, got, want)
		}
	}
}

// checkValidateErr fails t unless err is nil when wantPrefix is empty, or
// starts with wantPrefix (the field name, as validate errors do).
func checkValidateErr(t *testing.T, err error, wantPrefix string) {
	t.Helper()
	if wantPrefix == "" {
		if err != nil {
			t.Fatal(err)
		}
		return
	}
	if err == nil || !strings.HasPrefix(err.Error(), wantPrefix) {
		t.Fatalf("err = %v, want prefix %q", err, wantPrefix)
	}
}
