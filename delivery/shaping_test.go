package delivery

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestParseProvider(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		spec    string
		want    Provider
		wantErr string
	}{
		{spec: "shared=shared.test,.Other.test.;connections=2;per-connection=5;per-minute=60",
			want: Provider{Name: "shared", Suffixes: []string{"shared.test", "other.test"},
				Limits: ProviderLimits{Connections: 2, PerConnection: 5, PerMinute: 60}}},
		{spec: "google=;connections=40",
			want: Provider{Name: "google", Limits: ProviderLimits{Connections: 40, PerConnection: -1, PerMinute: -1}}},
		{spec: "nosuffix", wantErr: "want name="},
		{spec: "x=a.test;connections=-1", wantErr: "whole number"},
		{spec: "x=a.test;speed=3", wantErr: "unknown limit"},
		{spec: "x=a b.test", wantErr: "not a host name suffix"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := ParseProvider(tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestProviderTableLookup(t *testing.T) {
	t.Parallel()
	override, err := ParseProvider("google=;connections=40")
	if err != nil {
		t.Fatal(err)
	}
	extra, err := ParseProvider("eop=protection.outlook.com;connections=3")
	if err == nil {
		_, err = BuildProviders(DefaultProviders(), []Provider{extra})
	}
	if err == nil || !strings.Contains(err.Error(), "already microsoft's") {
		// A suffix has one owner; the table refuses a second.
		ps, _ := BuildProviders(DefaultProviders(), []Provider{extra})
		if _, err := newProviderTable(ps); err == nil || !strings.Contains(err.Error(), "already") {
			t.Fatalf("duplicate suffix accepted: %v", err)
		}
	}
	ps, err := BuildProviders(DefaultProviders(), []Provider{override})
	if err != nil {
		t.Fatal(err)
	}
	table, err := newProviderTable(ps)
	if err != nil {
		t.Fatal(err)
	}
	name := func(host string) string {
		if i := table.lookup(host); i >= 0 {
			return ps[i].Name
		}
		return ""
	}
	for host, want := range map[string]string{
		"gmail-smtp-in.l.google.com.":             "google",
		"ALT1.ASPMX.L.GOOGLE.COM":                 "google",
		"gmail-smtp-in.l.googlemail.com":          "google",
		"example-com.mail.protection.outlook.com": "microsoft",
		"hotmail-com.olc.protection.outlook.com":  "microsoft",
		"mta7.am0.yahoodns.net":                   "yahoo",
		"mx01.mail.icloud.com":                    "apple",
		"notgoogle.com":                           "",
		"google.com.evil.test":                    "",
		"mx.example.test":                         "",
	} {
		if got := name(host); got != want {
			t.Errorf("provider of %s = %q, want %q", host, got, want)
		}
	}
	if got := ps[table.lookup("x.google.com")].Limits; got.Connections != 40 || got.PerMinute != 1200 {
		t.Errorf("override kept %+v, want connections 40 and the built-in per-minute", got)
	}
}

// TestLaneSlowsDownAndRecovers checks the AIMD arithmetic on a pinned
// clock: a rate-limit reply halves the limits, replies within
// BackoffInterval count once, and a tenth comes back per RecoverInterval.
func TestLaneSlowsDownAndRecovers(t *testing.T) {
	t.Parallel()
	cfg := ShapingConfig{NoDefaultProviders: true, BackoffInterval: 10 * time.Second, RecoverInterval: 30 * time.Second,
		Providers: []Provider{{Name: "p", Suffixes: []string{"p.test"}, Limits: ProviderLimits{Connections: 8, PerMinute: 600}}}}
	s, err := newProviderShaper(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	s.now = func() time.Time { return now }
	l := s.laneOf([]target{{Host: "mx.p.test"}})
	if l == nil {
		t.Fatal("no lane for mx.p.test")
	}
	limited := &SMTPError{Code: 421, EnhancedCode: "4.7.0", Message: "Too many concurrent SMTP connections", Remote: true}
	if got := l.stats(now, s.cfg).ConnCap; got != 8 {
		t.Fatalf("cap = %d, want 8", got)
	}
	s.observe(l, &SMTPError{Code: 450, EnhancedCode: "4.2.1", Message: "mailbox busy", Remote: true})
	s.observe(l, &SMTPError{Code: 421, EnhancedCode: "4.4.2", Message: "timeout", Remote: false})
	if got := l.stats(now, s.cfg).ConnCap; got != 8 {
		t.Fatalf("cap = %d after replies that are no rate limit, want 8", got)
	}
	s.observe(l, limited)
	s.observe(l, limited) // the same burst of replies
	if got := l.stats(now, s.cfg); got.ConnCap != 4 || got.Factor != 0.5 {
		t.Fatalf("after a 421: %+v, want cap 4, factor 0.5", got)
	}
	now = now.Add(11 * time.Second)
	s.observe(l, &SMTPError{Code: 451, EnhancedCode: "4.7.1", Message: "[TSS04] Messages deferred due to user complaints", Remote: true})
	if got := l.stats(now, s.cfg); got.ConnCap != 2 {
		t.Fatalf("after a second rate limit past BackoffInterval: %+v, want cap 2", got)
	}
	// The rate slows down with the connections: 600/min at a quarter is
	// 2.5/s, so the burst of a tenth of that is 15 and the 16th waits.
	waited := false
	for range 16 {
		w, ok := l.reserve(now, s.cfg)
		if !ok {
			t.Fatal("reservation refused within MaxWait")
		}
		waited = waited || w > 0
	}
	if !waited {
		t.Fatal("16 transactions at once admitted without waiting at a quarter of 600/min")
	}
	now = now.Add(30 * time.Second)
	if got := l.stats(now, s.cfg); got.Factor != 0.35 || got.ConnCap != 3 {
		t.Fatalf("after one RecoverInterval: %+v, want factor 0.35, cap 3", got)
	}
	now = now.Add(10 * 30 * time.Second)
	if got := l.stats(now, s.cfg); got.Factor != 1 || got.ConnCap != 8 {
		t.Fatalf("after recovery: %+v, want factor 1, cap 8", got)
	}
}

// shapingEnv is a dispatcher whose three test domains all have their MX
// hosts under shared.test, served by one SMTP server.
type shapingEnv struct {
	*dispatchEnv
	srv     *testenv.SMTPServer
	domains []string
}

func newShapingEnv(t *testing.T, opts ...testenv.SMTPOption) *shapingEnv {
	t.Helper()
	e := &shapingEnv{dispatchEnv: newDispatchEnv(t)}
	e.srv = testenv.StartSMTP(t, opts...)
	for i := 1; i <= 3; i++ {
		domain := fmt.Sprintf("d%d.test", i)
		e.mxAt(domain, fmt.Sprintf("mx%d.shared.test", i), 10, e.srv.Addr)
		e.domains = append(e.domains, domain)
	}
	return e
}

// load stores n messages, one recipient each, spread over the domains.
func (e *shapingEnv) load(t *testing.T, n int) []uuid.UUID {
	t.Helper()
	ids := make([]uuid.UUID, n)
	for i := range ids {
		ids[i] = e.insert(t, time.Time{}, fmt.Sprintf("user%d@%s", i, e.domains[i%len(e.domains)]))
	}
	return ids
}

func (e *shapingEnv) waitDelivered(t *testing.T, ids []uuid.UUID) []db.Message {
	t.Helper()
	out := make([]db.Message, len(ids))
	for i, id := range ids {
		out[i] = e.waitMessage(t, id, "delivery", func(m db.Message) bool { return m.Status == db.StatusDelivered })
	}
	return out
}

// slowData makes the server take a while over each message, so that
// sessions overlap; it stands for a real receiver's processing time.
func slowData(d time.Duration) testenv.SMTPOption {
	return testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		time.Sleep(d)
		return nil
	})
}

func TestShapingCapsConnectionsPerProvider(t *testing.T) {
	t.Parallel()
	e := newShapingEnv(t, slowData(30*time.Millisecond))
	cfg := e.config()
	cfg.Shaping = ShapingConfig{
		NoDefaultProviders: true,
		Providers: []Provider{{Name: "shared", Suffixes: []string{"shared.test"},
			Limits: ProviderLimits{Connections: 2, PerConnection: 3}}},
		// Short waits, so that some transactions are held back and come
		// back through the queue.
		MaxWait:   50 * time.Millisecond,
		HoldDelay: 50 * time.Millisecond,
	}
	ids := e.load(t, 30)
	e.start(t, cfg)
	msgs := e.waitDelivered(t, ids)

	if _, most := e.srv.OpenConnections(); most > 2 {
		t.Fatalf("%d connections open at once at the provider's server, limit 2", most)
	}
	if got := len(e.srv.Messages()); got != 30 {
		t.Fatalf("server received %d messages, want 30", got)
	}
	// At most 3 messages per connection: 30 messages need 10 connections.
	if got := e.srv.Connections(); got < 10 {
		t.Fatalf("%d connections for 30 messages at 3 per connection", got)
	}
	// A recipient held back was not attempted: every one of them has
	// exactly the one attempt that delivered it.
	for _, m := range msgs {
		if r := m.Recipients[0]; r.Attempts != 1 {
			t.Fatalf("recipient %s: %d attempts, want 1", r.Address, r.Attempts)
		}
	}
}

func TestShapingSlowsDownOnRateLimitReplies(t *testing.T) {
	t.Parallel()
	var limited atomic.Int32
	limited.Store(3)
	e := newShapingEnv(t, slowData(40*time.Millisecond), testenv.WithRcptReply(func(string) *smtp.SMTPError {
		if limited.Add(-1) >= 0 {
			return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
				Message: "Too many concurrent SMTP connections; please try again later"}
		}
		return nil
	}))
	cfg := e.config()
	cfg.Shaping = ShapingConfig{
		NoDefaultProviders: true,
		Providers: []Provider{{Name: "shared", Suffixes: []string{"shared.test"},
			Limits: ProviderLimits{Connections: 4}}},
		MaxWait:         time.Second,
		HoldDelay:       50 * time.Millisecond,
		BackoffInterval: time.Hour, // one cut, however many replies
		RecoverInterval: time.Hour, // recovery is checked on the lane's clock below
	}
	d := e.start(t, cfg)
	ps := d.sender.shaper.(*providerShaper)
	l := ps.laneOf([]target{{Host: "mx1.shared.test"}})

	// Phase 1: the first transactions meet 421 and are deferred.
	first := e.load(t, 6)
	d.Wake()
	e.waitDelivered(t, first)
	if got := l.stats(time.Now(), ps.cfg); got.ConnCap != 2 || got.Factor != 0.5 {
		t.Fatalf("after 421 replies: %+v, want the cap halved to 2", got)
	}

	// Phase 2: slowed down, the provider sees at most 2 connections.
	// The idle connections over the new cap are closed.
	waitFor(t, 5*time.Second, "idle connections over the cap to close", func() bool {
		now, _ := e.srv.OpenConnections()
		return now <= 2
	})
	e.srv.ResetMaxOpen()
	second := e.load(t, 24)
	d.Wake()
	e.waitDelivered(t, second)
	if _, most := e.srv.OpenConnections(); most > 2 {
		t.Fatalf("%d connections open at once after the slowdown, want at most 2", most)
	}

	// Recovery: without rate-limit replies the limit grows back by a tenth
	// per RecoverInterval until it is whole again.
	later := time.Now().Add(3 * cfg.Shaping.RecoverInterval)
	if got := l.stats(later, ps.cfg); got.ConnCap != 4 || got.Factor < 0.79 || got.Factor > 0.81 {
		t.Fatalf("three intervals later: %+v, want factor 0.8, cap 4", got)
	}
	if got := l.stats(later.Add(2*cfg.Shaping.RecoverInterval), ps.cfg); got.Factor != 1 {
		t.Fatalf("five intervals later: %+v, want the whole limit back", got)
	}
	e.srv.ResetMaxOpen()
	third := e.load(t, 24)
	d.Wake()
	e.waitDelivered(t, third)
	if _, most := e.srv.OpenConnections(); most < 3 || most > 4 {
		t.Fatalf("%d connections open at once after recovery, want 3 or 4 (cap 4)", most)
	}
}
