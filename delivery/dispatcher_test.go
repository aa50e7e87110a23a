package delivery

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/miekg/dns"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/bounce"
	"github.com/posthaste/posthaste/internal/testenv"
)

// dispatchEnv is a database, a loopback DNS server and a dialer that maps
// MX addresses to loopback SMTP servers.
type dispatchEnv struct {
	url    string
	store  *db.DB
	dns    *testenv.DNSServer
	dialer *mapDialer
	nextIP atomic.Int32
}

func newDispatchEnv(t testing.TB) *dispatchEnv {
	t.Helper()
	return newDispatchEnvAt(t, testenv.Database(t))
}

// newDispatchEnvAt is newDispatchEnv on the database at url.
func newDispatchEnvAt(t testing.TB, url string) *dispatchEnv {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := db.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	return &dispatchEnv{url: url, store: store, dns: testenv.StartDNS(t), dialer: newMapDialer()}
}

// config returns a Config with timeouts and intervals short enough for tests.
func (e *dispatchEnv) config() Config {
	return Config{
		PollInterval:   50 * time.Millisecond,
		RescueInterval: 100 * time.Millisecond,
		Retry: RetryConfig{
			InitialInterval: 50 * time.Millisecond,
			MaxInterval:     200 * time.Millisecond,
		},
		SMTP:            testSMTPConfig(),
		DNSServer:       e.dns.Addr,
		DNSTimeout:      2 * time.Second,
		ShutdownTimeout: 10 * time.Second,
		Dialer:          e.dialer,
	}
}

// start starts a dispatcher, stopped at cleanup.
func (e *dispatchEnv) start(t testing.TB, cfg Config) *Dispatcher {
	t.Helper()
	d, err := NewDispatcher(cfg, e.store)
	if err != nil {
		t.Fatal(err)
	}
	d.Start(context.Background())
	t.Cleanup(d.Stop)
	return d
}

// mx publishes an MX host for domain backed by srv (nil: refusing).
func (e *dispatchEnv) mx(domain string, srv *testenv.SMTPServer) {
	addr := ""
	if srv != nil {
		addr = srv.Addr
	}
	e.mxAt(domain, "mx."+domain, 10, addr)
}

// mxAt publishes host as an MX of domain with preference pref, backed by
// the server listening at addr ("": refusing).
func (e *dispatchEnv) mxAt(domain, host string, pref uint16, addr string) {
	n := e.nextIP.Add(1)
	ip := fmt.Sprintf("192.0.2.%d", n)
	e.dns.AddMX(domain, host, pref)
	e.dns.AddA(host, ip)
	if addr != "" {
		e.dialer.route(ip, 25, addr)
	}
}

// insert stores a message to the given addresses and returns its id.
func (e *dispatchEnv) insert(t testing.TB, sendAt time.Time, to ...string) uuid.UUID {
	t.Helper()
	id, err := e.tryInsert(sendAt, to...)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func (e *dispatchEnv) tryInsert(sendAt time.Time, to ...string) (uuid.UUID, error) {
	return e.tryInsertRaw(nil, sendAt, to...)
}

// tryInsertRaw stores a message with the given bytes (nil: a small message
// naming its id).
func (e *dispatchEnv) tryInsertRaw(raw []byte, sendAt time.Time, to ...string) (uuid.UUID, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.Nil, err
	}
	if raw == nil {
		raw = testMessage(id.String())
	}
	var rcpts []db.NewRecipient
	for _, addr := range to {
		rid, err := uuid.NewV7()
		if err != nil {
			return uuid.Nil, err
		}
		_, domain, _ := strings.Cut(addr, "@")
		rcpts = append(rcpts, db.NewRecipient{ID: rid, Address: addr, Domain: domain, Kind: db.KindTo})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = e.store.InsertMessage(ctx, db.NewMessage{
		ID:              id,
		MessageIDHeader: "<" + id.String() + "@sender.test>",
		EnvelopeFrom:    "bounce@sender.test",
		FromHeader:      "sender@sender.test",
		Subject:         "test",
		Raw:             raw,
		SendAt:          sendAt,
		Recipients:      rcpts,
	})
	return id, err
}

func (e *dispatchEnv) get(t testing.TB, id uuid.UUID) db.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := e.store.GetMessage(ctx, db.DefaultProjectID(), id)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// waitMessage polls the message until cond holds.
func (e *dispatchEnv) waitMessage(t testing.TB, id uuid.UUID, what string, cond func(db.Message) bool) db.Message {
	t.Helper()
	var m db.Message
	waitFor(t, 20*time.Second, what, func() bool {
		m = e.get(t, id)
		return cond(m)
	})
	return m
}

// final reports whether no recipient of m is waiting or in flight.
func final(m db.Message) bool {
	for _, r := range m.Recipients {
		switch r.Status {
		case db.StatusQueued, db.StatusScheduled, db.StatusSending, db.StatusDeferred:
			return false
		}
	}
	return true
}

func recipient(t testing.TB, m db.Message, addr string) db.Recipient {
	t.Helper()
	for _, r := range m.Recipients {
		if r.Address == addr {
			return r
		}
	}
	t.Fatalf("no recipient %s in %+v", addr, m.Recipients)
	return db.Recipient{}
}

func TestDispatchDeliversAndBouncesPerRecipient(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithTLS(), testenv.WithRcptReply(func(to string) *smtp.SMTPError {
		if strings.HasPrefix(to, "unknown@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}
		return nil
	}))
	e.mx("a.test", srv)
	id := e.insert(t, time.Time{}, "ok@a.test", "unknown@a.test")
	e.start(t, e.config())

	m := e.waitMessage(t, id, "final outcomes", final)
	ok, unknown := recipient(t, m, "ok@a.test"), recipient(t, m, "unknown@a.test")
	if ok.Status != db.StatusDelivered || ok.LastCode != 250 || ok.LastEnhancedCode != "2.0.0" || ok.DeliveredAt == nil || ok.Attempts != 1 {
		t.Fatalf("ok: %+v", ok)
	}
	if unknown.Status != db.StatusBounced || unknown.LastCode != 550 || unknown.LastEnhancedCode != "5.1.1" ||
		unknown.LastText != "no such user" || unknown.Attempts != 1 {
		t.Fatalf("unknown: %+v", unknown)
	}
	if m.Status != db.MessagePartiallyDelivered {
		t.Fatalf("message status %s", m.Status)
	}
	if len(m.Attempts) != 2 {
		t.Fatalf("%d attempt rows, want 2", len(m.Attempts))
	}
	for _, a := range m.Attempts {
		if a.MXHost != "mx.a.test" || a.IP != "192.0.2.1" || !a.TLS || a.TLSVersion != "TLS 1.3" || a.StartedAt.IsZero() {
			t.Fatalf("attempt %+v", a)
		}
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || len(msgs[0].To) != 1 || msgs[0].To[0] != "ok@a.test" || !msgs[0].TLS {
		t.Fatalf("server messages %+v", msgs)
	}
	if !strings.Contains(string(msgs[0].Data), id.String()) {
		t.Fatal("server got another message's bytes")
	}
}

func TestDispatchRetriesTemporaryFailure(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	var rcpts atomic.Int32
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(string) *smtp.SMTPError {
		if rcpts.Add(1) == 1 {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted"}
		}
		return nil
	}))
	e.mx("grey.test", srv)
	id := e.insert(t, time.Time{}, "a@grey.test")
	e.start(t, e.config())

	m := e.waitMessage(t, id, "delivery after the retry", final)
	r := m.Recipients[0]
	if r.Status != db.StatusDelivered || r.Attempts != 2 {
		t.Fatalf("recipient %+v", r)
	}
	if len(m.Attempts) != 2 || m.Attempts[0].Outcome != db.StatusDeferred || m.Attempts[0].Code != 451 ||
		m.Attempts[0].EnhancedCode != "4.7.1" || m.Attempts[1].Outcome != db.StatusDelivered {
		t.Fatalf("attempts %+v", m.Attempts)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages at the server", n)
	}
}

func TestDispatchDataRejectBouncesAll(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "spam"}
	}))
	e.mx("spam.test", srv)
	id := e.insert(t, time.Time{}, "a@spam.test", "b@spam.test")
	e.start(t, e.config())

	m := e.waitMessage(t, id, "bounces", final)
	for _, r := range m.Recipients {
		if r.Status != db.StatusBounced || r.LastCode != 554 || r.LastEnhancedCode != "5.7.1" {
			t.Fatalf("recipient %+v", r)
		}
	}
	if m.Status != db.StatusBounced {
		t.Fatalf("message status %s", m.Status)
	}
}

func TestDispatchMailFromRejectBouncesAll(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := scriptedServer(t, func(cmd string) string {
		if strings.HasPrefix(cmd, "MAIL") {
			return "550 5.7.1 sender refused"
		}
		return ""
	}, "250-mx.test", "250 8BITMIME")
	e.mxAt("sender-refused.test", "mx.sender-refused.test", 10, srv.addr)
	id := e.insert(t, time.Time{}, "a@sender-refused.test", "b@sender-refused.test")
	e.start(t, e.config())

	m := e.waitMessage(t, id, "bounces", final)
	for _, r := range m.Recipients {
		if r.Status != db.StatusBounced || r.LastCode != 550 || r.LastEnhancedCode != "5.7.1" ||
			r.LastText != "sender refused" || r.Attempts != 1 {
			t.Fatalf("recipient %+v", r)
		}
	}
	if m.Status != db.StatusBounced || len(m.Attempts) != 2 {
		t.Fatalf("message %s with %d attempt rows", m.Status, len(m.Attempts))
	}
}

// TestDispatchGreetingRejectionNeverBounces checks that a 5yz greeting
// moves on to the next MX host, and defers (not bounces) the recipients
// when no host is left.
func TestDispatchGreetingRejectionNeverBounces(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	reject := &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "no mail from you"}
	refusing := testenv.StartSMTP(t, testenv.WithGreeting(reject))
	accepting := testenv.StartSMTP(t)
	e.mxAt("refuse.test", "mx.refuse.test", 10, refusing.Addr)
	e.mxAt("backup.test", "mx1.backup.test", 10, refusing.Addr)
	e.mxAt("backup.test", "mx2.backup.test", 20, accepting.Addr)
	cfg := e.config()
	cfg.Retry.InitialInterval = time.Hour // stay deferred
	cfg.Retry.MaxInterval = time.Hour
	refused := e.insert(t, time.Time{}, "a@refuse.test", "b@refuse.test")
	backup := e.insert(t, time.Time{}, "a@backup.test")
	e.start(t, cfg)

	m := e.waitMessage(t, refused, "deferral", func(m db.Message) bool {
		return m.Recipients[0].Status != db.StatusQueued && m.Recipients[0].Status != db.StatusSending &&
			m.Recipients[1].Status != db.StatusQueued && m.Recipients[1].Status != db.StatusSending
	})
	for _, r := range m.Recipients {
		if r.Status != db.StatusDeferred || r.LastCode != 554 || r.LastEnhancedCode != "5.7.1" ||
			r.LastText != "no mail from you" || r.NextAttemptAt == nil || r.Attempts != 1 {
			t.Fatalf("recipient %+v, want deferred with the 554 as its last reply", r)
		}
	}
	if len(m.Attempts) != 2 {
		t.Fatalf("%d attempt rows, want 2", len(m.Attempts))
	}
	for _, a := range m.Attempts {
		if a.Outcome != db.StatusDeferred || a.Code != 554 || a.MXHost != "mx.refuse.test" {
			t.Fatalf("attempt %+v", a)
		}
	}

	m = e.waitMessage(t, backup, "delivery through the second MX", final)
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.LastCode != 250 || r.Attempts != 1 {
		t.Fatalf("recipient %+v", r)
	}
	if len(m.Attempts) != 2 || m.Attempts[0].MXHost != "mx1.backup.test" || m.Attempts[0].Code != 554 ||
		m.Attempts[0].Outcome != db.StatusDeferred || m.Attempts[1].MXHost != "mx2.backup.test" ||
		m.Attempts[1].Outcome != db.StatusDelivered {
		t.Fatalf("attempts %+v, want the refusing MX's then the second's", m.Attempts)
	}
	if msgs := accepting.Messages(); len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"a@backup.test"}) {
		t.Fatalf("second MX got %+v", msgs)
	}
}

// TestDispatchRecordsEveryHostTried checks that each MX host tried in one
// delivery attempt leaves an attempt row for every recipient, in the order
// the hosts were tried, with that host's reply (code 0 when it gave none),
// while the recipients' attempt count goes up by one.
func TestDispatchRecordsEveryHostTried(t *testing.T) {
	t.Parallel()
	type row struct {
		host     string
		code     int
		enhanced string
		text     string // a part of the text
		outcome  string
		source   string
	}
	busy := &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "too busy"}
	tests := []struct {
		name          string
		first, second []testenv.SMTPOption // nil: refuse connections
		status        string
		code          int
		rows          []row
	}{
		{"421 greeting then delivered", []testenv.SMTPOption{testenv.WithGreeting(busy)}, []testenv.SMTPOption{},
			db.StatusDelivered, 250, []row{
				{"mx1.multi.test", 421, "4.3.2", "too busy", db.StatusDeferred, db.AttemptSourceRemote},
				{"mx2.multi.test", 250, "2.0.0", "", db.StatusDelivered, db.AttemptSourceRemote},
			}},
		{"connection refused then delivered", nil, []testenv.SMTPOption{},
			db.StatusDelivered, 250, []row{
				{"mx1.multi.test", 0, "", "connection refused", db.StatusDeferred, db.AttemptSourceLocal},
				{"mx2.multi.test", 250, "2.0.0", "", db.StatusDelivered, db.AttemptSourceRemote},
			}},
		{"421 greeting then connection refused", []testenv.SMTPOption{testenv.WithGreeting(busy)}, nil,
			db.StatusDeferred, 451, []row{
				{"mx1.multi.test", 421, "4.3.2", "too busy", db.StatusDeferred, db.AttemptSourceRemote},
				{"mx2.multi.test", 0, "", "connection refused", db.StatusDeferred, db.AttemptSourceLocal},
			}},
		{"broken TLS with verification", []testenv.SMTPOption{testenv.WithBrokenTLS()}, []testenv.SMTPOption{},
			db.StatusDelivered, 250, []row{
				{"mx1.multi.test", 0, "", "TLS", db.StatusDeferred, db.AttemptSourceLocal},
				{"mx2.multi.test", 250, "2.0.0", "", db.StatusDelivered, db.AttemptSourceRemote},
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newDispatchEnv(t)
			addr := func(opts []testenv.SMTPOption) string {
				if opts == nil {
					return ""
				}
				return testenv.StartSMTP(t, opts...).Addr
			}
			e.mxAt("multi.test", "mx1.multi.test", 10, addr(tt.first))
			e.mxAt("multi.test", "mx2.multi.test", 20, addr(tt.second))
			cfg := e.config()
			cfg.Retry.InitialInterval = time.Hour // stay deferred
			cfg.Retry.MaxInterval = time.Hour
			// Without fallback to plain text, a failed handshake fails
			// the host.
			cfg.SMTP.VerifyTLS = true
			id := e.insert(t, time.Time{}, "a@multi.test", "b@multi.test")
			e.start(t, cfg)

			m := e.waitMessage(t, id, "the outcome", func(m db.Message) bool {
				for _, r := range m.Recipients {
					if r.Status != tt.status {
						return false
					}
				}
				return true
			})
			if len(m.Attempts) != 2*len(tt.rows) {
				t.Fatalf("%d attempt rows, want %d: %+v", len(m.Attempts), 2*len(tt.rows), m.Attempts)
			}
			for _, r := range m.Recipients {
				if r.Attempts != 1 || r.LastCode != tt.code {
					t.Errorf("recipient %+v, want one attempt ending in %d", r, tt.code)
				}
				var got []db.Attempt
				for _, a := range m.Attempts {
					if a.RecipientID == r.ID {
						got = append(got, a)
					}
				}
				if len(got) != len(tt.rows) {
					t.Fatalf("%s: %d attempt rows, want %d", r.Address, len(got), len(tt.rows))
				}
				for i, want := range tt.rows {
					a := got[i]
					if a.MXHost != want.host || a.Code != want.code || a.EnhancedCode != want.enhanced ||
						!strings.Contains(a.Text, want.text) || a.Outcome != want.outcome || a.IP != fmt.Sprintf("192.0.2.%d", i+1) ||
						a.Source != want.source {
						t.Errorf("%s: attempt %d = %+v, want %+v", r.Address, i, a, want)
					}
				}
				if first, second := got[0], got[1]; second.StartedAt.Before(first.StartedAt.Add(first.Duration)) {
					t.Errorf("%s: second host started at %s, before the first was done (%s + %s)",
						r.Address, second.StartedAt, first.StartedAt, first.Duration)
				}
			}
		})
	}
}

// TestDispatchClaimsWholeGroups checks that recipients of one message at one
// domain go out in one transaction even when they do not fit in one claim.
func TestDispatchClaimsWholeGroups(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("group.test", srv)
	cfg := e.config()
	cfg.BatchSize = 3
	to := []string{"1@group.test", "2@group.test", "3@group.test", "4@group.test", "5@group.test"}
	id := e.insert(t, time.Time{}, to...)
	e.start(t, cfg)

	if m := e.waitMessage(t, id, "delivery", final); m.Status != db.StatusDelivered {
		t.Fatalf("message %s", m.Status)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 {
		t.Fatalf("%d transactions, want 1 with all 5 recipients", len(msgs))
	}
	if got := slices.Sorted(slices.Values(msgs[0].To)); !slices.Equal(got, to) {
		t.Fatalf("recipients %v, want %v", got, to)
	}
}

func TestDispatchReusesConnection(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("reuse.test", srv)
	d := e.start(t, e.config())

	first := e.insert(t, time.Time{}, "a@reuse.test")
	d.Wake()
	e.waitMessage(t, first, "first delivery", final)
	second := e.insert(t, time.Time{}, "b@reuse.test")
	d.Wake()
	if m := e.waitMessage(t, second, "second delivery", final); m.Status != db.StatusDelivered {
		t.Fatalf("second message %s", m.Status)
	}
	if n := srv.Connections(); n != 1 {
		t.Fatalf("%d connections for two messages, want 1", n)
	}
	if n := len(srv.Messages()); n != 2 {
		t.Fatalf("%d messages", n)
	}
	// The second transaction found the MX in the DNS cache.
	if n := e.dns.Queries("reuse.test", dns.TypeMX); n != 1 {
		t.Fatalf("%d MX queries for two messages, want 1", n)
	}
}

func TestDispatchDNSOutcomes(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	e.dns.AddNullMX("nullmx.test")
	e.dns.AddA("nullmx.test", "192.0.2.200")
	e.dns.SetRcode("servfail.test", dns.RcodeServerFailure)
	cfg := e.config()
	cfg.Retry.InitialInterval = time.Hour // stay deferred
	cfg.Retry.MaxInterval = time.Hour
	null := e.insert(t, time.Time{}, "a@nullmx.test")
	missing := e.insert(t, time.Time{}, "a@missing.test")
	servfail := e.insert(t, time.Time{}, "a@servfail.test")
	e.start(t, cfg)

	// Each attempt that tried no host still leaves one row: no host, the
	// local reply, the DNS error in its text.
	hostless := func(t *testing.T, m db.Message, outcome, enhanced, text string) {
		t.Helper()
		if len(m.Attempts) != 1 {
			t.Fatalf("attempts %+v, want one row", m.Attempts)
		}
		a := m.Attempts[0]
		if a.MXHost != "" || a.IP != "" || a.Source != db.AttemptSourceLocal || a.Outcome != outcome ||
			a.EnhancedCode != enhanced || !strings.Contains(a.Text, text) || a.StartedAt.IsZero() {
			t.Fatalf("attempt %+v, want a %s row without a host, source local, %s, text with %q", a, outcome, enhanced, text)
		}
	}
	m := e.waitMessage(t, null, "null MX bounce", final)
	r := m.Recipients[0]
	if r.Status != db.StatusBounced || r.LastCode != 556 || r.LastEnhancedCode != "5.1.10" || r.Attempts != 1 {
		t.Fatalf("null MX: %+v, attempts %+v", r, m.Attempts)
	}
	hostless(t, m, db.StatusBounced, "5.1.10", "null MX")
	m = e.waitMessage(t, missing, "NXDOMAIN bounce", final)
	if r := m.Recipients[0]; r.Status != db.StatusBounced || r.LastEnhancedCode != "5.1.2" {
		t.Fatalf("NXDOMAIN: %+v", r)
	}
	hostless(t, m, db.StatusBounced, "5.1.2", "NXDOMAIN")
	m = e.waitMessage(t, servfail, "SERVFAIL deferral", func(m db.Message) bool {
		return m.Recipients[0].Status == db.StatusDeferred
	})
	if r := m.Recipients[0]; r.LastCode != 451 || r.LastEnhancedCode != "4.4.3" || r.NextAttemptAt == nil || r.Attempts != 1 {
		t.Fatalf("SERVFAIL: %+v", r)
	}
	hostless(t, m, db.StatusDeferred, "4.4.3", "SERVFAIL")
	if got := e.dialer.dialed(); len(got) != 0 {
		t.Fatalf("connections attempted: %v", got)
	}
}

func TestDispatchFailsPastMaxAge(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "mailbox full"}
	}))
	e.mx("full.test", srv)
	cfg := e.config()
	cfg.Retry.MaxAge = time.Millisecond // any retry falls past it
	id := e.insert(t, time.Time{}, "a@full.test")
	e.start(t, cfg)

	m := e.waitMessage(t, id, "failure", final)
	r := m.Recipients[0]
	if r.Status != db.StatusFailed || r.LastCode != 452 || r.LastEnhancedCode != "4.2.2" || r.Attempts != 1 {
		t.Fatalf("recipient %+v", r)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.StatusFailed {
		t.Fatalf("attempts %+v", m.Attempts)
	}
}

// TestDispatchMaxAgeCountsFromSendAt checks that a message scheduled further
// ahead than MaxAge is retried after a 4yz at its first attempt: its age
// counts from send_at, not from its creation.
func TestDispatchMaxAgeCountsFromSendAt(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted"}
	}))
	e.mx("sched-grey.test", srv)
	cfg := e.config()
	cfg.Retry.MaxAge = 2 * time.Second
	// Created more than MaxAge before it is due.
	id := e.insert(t, time.Now().Add(3*time.Second), "a@sched-grey.test")
	e.start(t, cfg)

	m := e.waitMessage(t, id, "the first attempt", func(m db.Message) bool { return len(m.Attempts) > 0 })
	if a := m.Attempts[0]; a.Outcome != db.StatusDeferred || a.Code != 451 || a.EnhancedCode != "4.7.1" {
		t.Fatalf("first attempt %+v, want deferred", a)
	}
}

// TestOutcomesMaxAgeCountsFromDueSince checks the retry decision for a
// message scheduled 30 days ahead against one created 30 days ago, both
// refused with a 4yz now.
func TestOutcomesMaxAgeCountsFromDueSince(t *testing.T) {
	t.Parallel()
	d := &Dispatcher{retry: newRetryPolicy(RetryConfig{}.WithDefaults())}
	now := time.Now()
	created := now.Add(-30 * 24 * time.Hour)
	j := &job{owner: "o", rcpts: []db.ClaimedRecipient{
		{ID: uuid.New(), Address: "scheduled@a.test", MessageCreatedAt: created, DueSince: now.Add(-time.Minute)},
		{ID: uuid.New(), Address: "old@a.test", MessageCreatedAt: created, DueSince: created},
	}}
	refused := &SMTPError{Code: 451, EnhancedCode: "4.7.1", Message: "greylisted"}
	outs := d.outcomes(j, attemptResult{Rcpts: failAll(2, refused)}, now)
	if o := outs[0]; o.Status != db.StatusDeferred || !o.NextAttemptAt.After(now) || o.Code != 451 {
		t.Fatalf("scheduled message: %+v, want deferred", o)
	}
	if o := outs[1]; o.Status != db.StatusFailed || o.Code != 451 || o.EnhancedCode != "4.7.1" {
		t.Fatalf("old message: %+v, want failed", o)
	}
}

func TestDispatchScheduledWaitsForSendAt(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("later.test", srv)
	sendAt := time.Now().Add(time.Second)
	id := e.insert(t, sendAt, "a@later.test")
	if m := e.get(t, id); m.Recipients[0].Status != db.StatusScheduled {
		t.Fatalf("status %s, want scheduled", m.Recipients[0].Status)
	}
	d := e.start(t, e.config())
	// Several claims run before send_at, none may take it.
	waitFor(t, 5*time.Second, "claims before send_at", func() bool { return d.claims.Load() >= 3 })
	if time.Now().Before(sendAt) {
		if m := e.get(t, id); m.Recipients[0].Status != db.StatusScheduled || len(srv.Messages()) != 0 {
			t.Fatalf("attempted before send_at: %+v", m.Recipients[0])
		}
	}
	m := e.waitMessage(t, id, "delivery", final)
	if m.Status != db.StatusDelivered || len(m.Attempts) != 1 {
		t.Fatalf("message %+v", m)
	}
	if m.Attempts[0].StartedAt.Before(sendAt) || m.Recipients[0].DeliveredAt.Before(sendAt) {
		t.Fatalf("attempted at %s, before send_at %s", m.Attempts[0].StartedAt, sendAt)
	}
}

func TestDispatchGroupsRecipientsIntoTransactions(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	g := testenv.StartSMTP(t)
	h := testenv.StartSMTP(t)
	e.mx("g.test", g)
	e.mx("h.test", h)
	cfg := e.config()
	cfg.MaxRecipientsPerTransaction = 2
	id := e.insert(t, time.Time{}, "1@g.test", "x@h.test", "2@g.test", "3@g.test")
	e.start(t, cfg)

	if m := e.waitMessage(t, id, "delivery", final); m.Status != db.StatusDelivered {
		t.Fatalf("message %s", m.Status)
	}
	var sizes []int
	for _, msg := range g.Messages() {
		sizes = append(sizes, len(msg.To))
	}
	if len(sizes) != 2 || sizes[0]+sizes[1] != 3 || max(sizes[0], sizes[1]) != 2 {
		t.Fatalf("g.test transactions with %v recipients, want 2 and 1", sizes)
	}
	if msgs := h.Messages(); len(msgs) != 1 || len(msgs[0].To) != 1 {
		t.Fatalf("h.test messages %+v", msgs)
	}
}

func TestDispatchTakesOverExpiredLease(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("crash.test", srv)
	id := e.insert(t, time.Time{}, "a@crash.test")

	// A dispatcher that claimed the recipient and died without a word.
	ctx := t.Context()
	claimed, err := e.store.ClaimRecipients(ctx, db.ClaimParams{Owner: "dead-1", Limit: 10, LeaseFor: 500 * time.Millisecond})
	if err != nil || len(claimed) != 1 {
		t.Fatalf("claim: %v, %d rows", err, len(claimed))
	}
	e.start(t, e.config())

	m := e.waitMessage(t, id, "delivery after the lease expired", final)
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 1 {
		t.Fatalf("recipient %+v", r)
	}
	// The dead owner's late outcome is fenced off.
	applied, err := e.store.RecordOutcomes(ctx, []db.Outcome{{
		RecipientID: claimed[0].ID, LeaseOwner: "dead-1", Status: db.StatusBounced, Code: 550,
	}})
	if err != nil || len(applied) != 0 {
		t.Fatalf("stale outcome applied: %v, %v", applied, err)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d deliveries, want 1", n)
	}
}

// frozenDialer is the dialer of a worker that freezes: its first dial
// blocks, whatever the context says, until thaw is closed, and then connects
// all the same.
type frozenDialer struct {
	next    Dialer
	entered chan struct{} // closed when the first dial begins
	thaw    chan struct{}
	once    sync.Once
}

func (f *frozenDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	first := false
	f.once.Do(func() { first = true })
	if first {
		close(f.entered)
		<-f.thaw
		ctx = context.WithoutCancel(ctx)
	}
	return f.next.DialContext(ctx, network, addr)
}

// logBuffer collects a logger's output across goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestDispatchFrozenWorkerLosesItsLease runs two dispatchers. A claims a
// recipient and its worker freezes in the dial, ignoring its context, for
// longer than the attempt's cap; A stops renewing the lease of a stuck
// attempt, and B rescues the recipient once the lease has run out and
// delivers it. When A's worker wakes up it must neither deliver (its
// attempt's deadline has passed) nor overwrite B's outcome (the lease is
// fenced).
func TestDispatchFrozenWorkerLosesItsLease(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("frozen.test", srv)
	id := e.insert(t, time.Time{}, "a@frozen.test")

	frozen := &frozenDialer{next: e.dialer, entered: make(chan struct{}), thaw: make(chan struct{})}
	var logs logBuffer
	cfgA := e.config()
	cfgA.InstanceID = "a"
	cfgA.Dialer = frozen
	cfgA.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfgA.MaxAttemptDuration = 500 * time.Millisecond
	cfgA.LeaseDuration = 2 * time.Second
	// A claims once, at start, and never again: nothing else notifies.
	cfgA.PollInterval = time.Hour
	cfgA.RescueInterval = cfgA.LeaseDuration
	a := e.start(t, cfgA)
	select {
	case <-frozen.entered:
	case <-time.After(20 * time.Second):
		t.Fatal("A never dialed")
	}
	thawed := false
	defer func() {
		if !thawed {
			close(frozen.thaw)
		}
	}()

	cfgB := e.config()
	cfgB.InstanceID = "b"
	e.start(t, cfgB)
	waitFor(t, 30*time.Second, "B's delivery after A's lease ran out", func() bool {
		return e.get(t, id).Recipients[0].Status == db.StatusDelivered
	})

	close(frozen.thaw)
	thawed = true
	waitFor(t, 20*time.Second, "A's worker to finish", func() bool { return a.pending.Load() == 0 })

	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages at the server, want 1", n)
	}
	if n := srv.Commands("MAIL"); n != 1 {
		t.Fatalf("%d MAIL commands: A began a transaction after its deadline", n)
	}
	m := e.get(t, id)
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 1 || r.LastCode != 250 {
		t.Fatalf("recipient %+v, want B's delivery", r)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.StatusDelivered {
		t.Fatalf("attempts %+v, want only B's", m.Attempts)
	}
	if !strings.Contains(logs.String(), "lease lost") {
		t.Fatalf("A did not report its outcome fenced off; its log:\n%s", logs.String())
	}
}

func TestDispatchStopReleasesUnattemptedLeases(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	entered := make(chan struct{}, 1)
	gate := make(chan struct{})
	srv := testenv.StartSMTP(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-gate
		return nil
	}))
	e.mx("slow.test", srv)
	var ids []uuid.UUID
	for i := range 3 {
		ids = append(ids, e.insert(t, time.Time{}, fmt.Sprintf("%d@slow.test", i)))
	}
	cfg := e.config()
	cfg.Concurrency = 1
	cfg.PerDomainConcurrency = 1
	d, err := NewDispatcher(cfg, e.store)
	if err != nil {
		t.Fatal(err)
	}
	d.Start(context.Background())
	<-entered // one transaction in flight, two jobs waiting for the slot

	stopped := make(chan struct{})
	go func() {
		d.Stop()
		close(stopped)
	}()
	queued := func() int {
		n := 0
		for _, id := range ids {
			if r := e.get(t, id).Recipients[0]; r.Status == db.StatusQueued && r.Attempts == 0 {
				n++
			}
		}
		return n
	}
	waitFor(t, 10*time.Second, "the waiting jobs' leases to be released", func() bool { return queued() == 2 })
	close(gate) // the transaction in flight completes within ShutdownTimeout
	<-stopped

	delivered := 0
	for _, id := range ids {
		m := e.get(t, id)
		switch r := m.Recipients[0]; r.Status {
		case db.StatusDelivered:
			delivered++
		case db.StatusQueued:
			if r.Attempts != 0 || len(m.Attempts) != 0 {
				t.Fatalf("released recipient was attempted: %+v", r)
			}
		default:
			t.Fatalf("recipient %+v after Stop", r)
		}
	}
	if delivered != 1 || len(srv.Messages()) != 1 {
		t.Fatalf("%d delivered, %d at the server; want 1 and 1", delivered, len(srv.Messages()))
	}
	d.Stop() // idempotent

	// A released recipient is due at once for the next dispatcher.
	e.start(t, e.config())
	for _, id := range ids {
		e.waitMessage(t, id, "delivery by the next dispatcher", final)
	}
	if n := len(srv.Messages()); n != 3 {
		t.Fatalf("%d messages at the server, want 3", n)
	}
}

func TestDispatchDataTimeoutDefers(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithStalledData())
	e.mx("stall.test", srv)
	cfg := e.config()
	cfg.SMTP.DataTimeout = 300 * time.Millisecond
	cfg.Retry.InitialInterval = time.Hour
	cfg.Retry.MaxInterval = time.Hour
	id, err := e.tryInsertRaw(bigMessage(), time.Time{}, "a@stall.test")
	if err != nil {
		t.Fatal(err)
	}
	e.start(t, cfg)

	m := e.waitMessage(t, id, "deferral after the data timeout", func(m db.Message) bool {
		return m.Recipients[0].Status == db.StatusDeferred
	})
	r := m.Recipients[0]
	if r.LastCode != 451 || r.LastEnhancedCode != "4.4.2" || !strings.Contains(r.LastText, "timeout") || r.Attempts != 1 {
		t.Fatalf("recipient %+v", r)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.StatusDeferred || m.Attempts[0].MXHost != "mx.stall.test" {
		t.Fatalf("attempts %+v", m.Attempts)
	}
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("%d messages accepted", n)
	}
}

// TestDispatchAttemptCapDefers checks that MaxAttemptDuration cuts off an
// attempt whose steps are all within their own timeouts, and that the
// recipient is deferred.
func TestDispatchAttemptCapDefers(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithStalledData())
	e.mx("capped.test", srv)
	cfg := e.config()
	cfg.MaxAttemptDuration = 500 * time.Millisecond
	cfg.SMTP.CommandTimeout = time.Minute
	cfg.SMTP.DataTimeout = time.Minute
	cfg.Retry.InitialInterval = time.Hour
	cfg.Retry.MaxInterval = time.Hour
	id := e.insert(t, time.Time{}, "a@capped.test")
	e.start(t, cfg)

	m := e.waitMessage(t, id, "deferral at the cap", func(m db.Message) bool {
		return m.Recipients[0].Status == db.StatusDeferred
	})
	r := m.Recipients[0]
	if r.LastCode != 451 || r.LastEnhancedCode != "4.4.2" || !strings.Contains(r.LastText, "MaxAttemptDuration") || r.Attempts != 1 {
		t.Fatalf("recipient %+v", r)
	}
	// The end of the data was written before the server stalled, so the
	// outcome is unknown: the row says so, in words of its own.
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.AttemptAmbiguous || m.Attempts[0].Code != 451 ||
		m.Attempts[0].EnhancedCode != "4.4.2" || !strings.Contains(m.Attempts[0].Text, "MaxAttemptDuration") ||
		!strings.Contains(m.Attempts[0].Text, "may have the message") || m.Attempts[0].Source != db.AttemptSourceLocal {
		t.Fatalf("attempts %+v, want one ambiguous, cut off by MaxAttemptDuration", m.Attempts)
	}
	if srv.Commands("DATA") != 1 || len(srv.Messages()) != 0 {
		t.Fatalf("DATA %d times, %d messages accepted", srv.Commands("DATA"), len(srv.Messages()))
	}
}

// stopWithin runs d.Stop and fails the test if it has not returned slack
// after d's ShutdownTimeout: a guard against Stop hanging, not a measurement.
func stopWithin(t *testing.T, d *Dispatcher, slack time.Duration) {
	t.Helper()
	stopped := make(chan struct{})
	go func() {
		d.Stop()
		close(stopped)
	}()
	timer := time.NewTimer(d.cfg.ShutdownTimeout + slack)
	defer timer.Stop()
	select {
	case <-stopped:
	case <-timer.C:
		t.Fatalf("Stop still running %s after its ShutdownTimeout of %s", slack, d.cfg.ShutdownTimeout)
	}
}

func TestDispatchStopInterruptsAfterShutdownTimeout(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithStalledData())
	e.mx("hung.test", srv)
	cfg := e.config()
	cfg.ShutdownTimeout = 2 * time.Second
	cfg.SMTP.CommandTimeout = time.Minute
	cfg.SMTP.DataTimeout = time.Minute
	cfg.Retry.InitialInterval = time.Hour
	cfg.Retry.MaxInterval = time.Hour
	id := e.insert(t, time.Time{}, "a@hung.test")
	d, err := NewDispatcher(cfg, e.store)
	if err != nil {
		t.Fatal(err)
	}
	d.Start(context.Background())
	waitFor(t, 10*time.Second, "DATA in flight", func() bool { return srv.Commands("DATA") == 1 })
	stopWithin(t, d, 10*time.Second)

	r := e.get(t, id).Recipients[0]
	if r.Status != db.StatusDeferred || r.Attempts != 1 || r.LastCode != 451 || r.LastEnhancedCode != "4.4.2" ||
		!strings.Contains(r.LastText, "interrupted") {
		t.Fatalf("recipient %+v, want deferred after the interrupted attempt", r)
	}
}

// TestDispatchStopBoundedWhenEverythingHangs checks that Stop keeps to
// ShutdownTimeout when a transaction hangs, the database goes away so no
// outcome can be written, and a pooled connection would never answer QUIT
// (whether QUIT is sent at all depends on the time left).
func TestDispatchStopBoundedWhenEverythingHangs(t *testing.T) {
	t.Parallel()
	direct, proxied, proxy := testenv.ProxiedDatabase(t)
	e := newDispatchEnvAt(t, direct)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	store, err := db.Open(ctx, proxied)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)

	release := make(chan struct{})
	quiet := scriptedServer(t, func(cmd string) string {
		if strings.EqualFold(cmd, "QUIT") {
			<-release
		}
		return ""
	}, "250-mx.test", "250 8BITMIME")
	t.Cleanup(func() { close(release) }) // runs before the server's cleanup
	e.mxAt("quiet.test", "mx.quiet.test", 10, quiet.addr)
	stalled := testenv.StartSMTP(t, testenv.WithStalledData())
	e.mx("stall.test", stalled)

	cfg := e.config()
	cfg.ShutdownTimeout = time.Second
	cfg.SMTP.CommandTimeout = time.Minute
	cfg.SMTP.DataTimeout = time.Minute
	cfg.SMTP.IdleTimeout = time.Minute
	d, err := NewDispatcher(cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	d.Start(context.Background())
	t.Cleanup(d.Stop)

	pooled := e.insert(t, time.Time{}, "a@quiet.test")
	d.Wake()
	e.waitMessage(t, pooled, "delivery to the host that will not answer QUIT", final)
	hung := e.insert(t, time.Time{}, "a@stall.test")
	d.Wake()
	waitFor(t, 10*time.Second, "DATA in flight", func() bool { return stalled.Commands("DATA") == 1 })
	proxy.Stop()

	stopWithin(t, d, 10*time.Second)
	// Its outcome could not be written: the recipient stays leased, and
	// goes back to the queue when the lease runs out.
	if r := e.get(t, hung).Recipients[0]; r.Status != db.StatusSending || r.Attempts != 0 {
		t.Fatalf("recipient %+v, want it still leased", r)
	}
	if n := len(stalled.Messages()); n != 0 {
		t.Fatalf("%d messages accepted by the stalled server", n)
	}
}

func TestDispatchReleasesJobThatWaitedTooLong(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("busy.test", srv)
	id := e.insert(t, time.Time{}, "a@busy.test")
	cfg := e.config()
	cfg.PerDomainConcurrency = 1
	d, err := NewDispatcher(cfg, e.store)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()

	// Claim by hand; the dispatcher is not running, so nothing renews the
	// lease, which stops being known to be held in 300ms.
	lease := d.leases.margin + 300*time.Millisecond
	claimedAt := time.Now()
	claimed, err := e.store.ClaimRecipients(t.Context(), db.ClaimParams{Owner: "test-1", Limit: 10, LeaseFor: lease})
	if err != nil || len(claimed) != 1 {
		t.Fatalf("claim: %v, %d", err, len(claimed))
	}
	contents, err := e.store.LoadMessageContents(t.Context(), []uuid.UUID{id})
	if err != nil {
		t.Fatal(err)
	}
	jobs, _ := groupJobs(claimed, contents, "test-1", 100)
	d.leases.add("test-1", claimedAt.Add(lease), len(jobs))
	// The domain's only slot is taken for longer than the job can wait.
	if !d.limits.acquireDomain("busy.test", nil, nil) {
		t.Fatal("slot not free")
	}
	d.pending.Add(1)
	d.waiting.Add(1)
	d.jobs.Add(1)
	d.run(context.Background(), jobs[0])
	d.limits.releaseDomain("busy.test")

	m := e.get(t, id)
	if r := m.Recipients[0]; r.Status != db.StatusQueued || r.Attempts != 0 {
		t.Fatalf("recipient %+v, want queued without an attempt", r)
	}
	if srv.Connections() != 0 {
		t.Fatal("a connection was made")
	}
	if d.pending.Load() != 0 || d.waiting.Load() != 0 || d.leases.count() != 0 {
		t.Fatalf("counters pending %d waiting %d", d.pending.Load(), d.waiting.Load())
	}
}

// TestDispatchWakeups checks both wake-up paths with polling off: Wake, and
// a NOTIFY on the outbox channel received through LISTEN.
func TestDispatchWakeups(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("wake.test", srv)
	cfg := e.config()
	cfg.PollInterval = time.Hour
	cfg.RescueInterval = time.Hour
	d := e.start(t, cfg)
	waitFor(t, 10*time.Second, "the first claim", func() bool { return d.claims.Load() >= 1 })

	id := e.insert(t, time.Time{}, "a@wake.test")
	d.Wake()
	e.waitMessage(t, id, "delivery after Wake", final)

	// Only NOTIFYs sent after LISTEN took effect arrive; wait for it.
	conn, err := pgx.Connect(t.Context(), e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	waitFor(t, 10*time.Second, "LISTEN", func() bool {
		var n int
		err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND query ILIKE 'LISTEN%'`).Scan(&n)
		return err == nil && n > 0
	})
	claims := d.claims.Load()
	id = e.insert(t, time.Time{}, "b@wake.test")
	if err := e.store.NotifyOutbox(t.Context()); err != nil {
		t.Fatal(err)
	}
	e.waitMessage(t, id, "delivery after NOTIFY", final)
	if d.claims.Load() == claims {
		t.Fatal("delivered without a claim")
	}
}

func TestTwoDispatchersDeliverEachRecipientOnce(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	const domains, messages = 5, 1000
	servers := make([]*testenv.SMTPServer, domains)
	for i := range servers {
		servers[i] = testenv.StartSMTP(t)
		e.mx(fmt.Sprintf("d%d.test", i), servers[i])
	}
	cfg := e.config()
	cfg.BatchSize = 50
	cfg.Concurrency = 20
	cfg.PerDomainConcurrency = 4
	cfg.InstanceID = "one"
	e.start(t, cfg)
	cfg.InstanceID = "two"
	e.start(t, cfg)

	// Insert while both run; every 10th message goes to two domains.
	ids := make([]uuid.UUID, messages)
	total := 0
	var wg sync.WaitGroup
	var mu sync.Mutex
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < messages; i += 8 {
				to := []string{fmt.Sprintf("u%d@d%d.test", i, i%domains)}
				if i%10 == 0 {
					to = append(to, fmt.Sprintf("v%d@d%d.test", i, (i+1)%domains))
				}
				id, err := e.tryInsert(time.Time{}, to...)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				ids[i] = id
				total += len(to)
				mu.Unlock()
				if i%100 == 0 {
					e.store.NotifyOutbox(context.Background())
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if err := e.store.NotifyOutbox(t.Context()); err != nil {
		t.Fatal(err)
	}

	seen := map[string]int{}
	waitFor(t, 45*time.Second, "every recipient at the servers", func() bool {
		n := 0
		for _, s := range servers {
			for _, m := range s.Messages() {
				n += len(m.To)
			}
		}
		return n >= total
	})
	for _, s := range servers {
		for _, m := range s.Messages() {
			for _, to := range m.To {
				seen[to]++
			}
		}
	}
	if len(seen) != total {
		t.Fatalf("%d distinct recipients at the servers, want %d", len(seen), total)
	}
	for addr, n := range seen {
		if n != 1 {
			t.Fatalf("%s delivered %d times", addr, n)
		}
	}
	for _, id := range ids {
		m := e.waitMessage(t, id, "delivered in the database", final)
		for _, r := range m.Recipients {
			if r.Status != db.StatusDelivered || r.Attempts != 1 {
				t.Fatalf("recipient %+v", r)
			}
		}
		if len(m.Attempts) != len(m.Recipients) {
			t.Fatalf("message %s has %d attempts for %d recipients", m.ID, len(m.Attempts), len(m.Recipients))
		}
	}
}

// BenchmarkDispatch measures a dispatcher delivering b.N messages to one
// loopback SMTP server.
func BenchmarkDispatch(b *testing.B) { benchDispatch(b, nil) }

// BenchmarkDispatchVERP is BenchmarkDispatch with every transaction sent
// from a VERP address: an HMAC per transaction, no database work.
func BenchmarkDispatchVERP(b *testing.B) {
	verp, err := bounce.NewVERP("bounces.bench.test", "", [][]byte{[]byte("bench-secret-0123456789")})
	if err != nil {
		b.Fatal(err)
	}
	benchDispatch(b, verp)
}

func benchDispatch(b *testing.B, verp *bounce.VERP) {
	e := newDispatchEnv(b)
	srv := testenv.StartSMTP(b)
	e.mx("bench.test", srv)
	for i := range b.N {
		e.insert(b, time.Time{}, fmt.Sprintf("u%d@bench.test", i))
	}
	cfg := e.config()
	cfg.PerDomainConcurrency = 50
	cfg.VERP = verp
	walBefore := walPosition(b, e.store)
	b.ResetTimer()
	start := time.Now()
	d := e.start(b, cfg)
	srv.WaitMessages(b, b.N, 5*time.Minute)
	d.Stop() // waits for the last outcomes to be recorded
	elapsed := time.Since(start)
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(n/elapsed.Seconds(), "msgs/s")
	// Every claim and every outcome write is a transaction of its own.
	b.ReportMetric(float64(d.claims.Load()+d.rec.txs.Load())/n, "commits/msg")
	b.ReportMetric(float64(e.dialer.roundTrips())/n, "smtp-rtt/msg")
	// WAL is counted for the whole server: other work running at the same
	// time adds to it.
	b.ReportMetric(float64(walPosition(b, e.store)-walBefore)/n, "wal-B/msg")
}

// walPosition returns the database server's WAL position in bytes.
func walPosition(t testing.TB, store *db.DB) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pos, err := store.WALPosition(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return pos
}

// BenchmarkIdleLatency measures how long one message accepted while the
// dispatcher is idle takes to reach the MX: from the commit of the insert,
// when the API would answer, and the wake-up the service sends after it, to
// the server's reply to the end of the data. The connection is pooled after
// the first message.
func BenchmarkIdleLatency(b *testing.B) {
	e := newDispatchEnv(b)
	srv := testenv.StartSMTP(b)
	e.mx("idle.test", srv)
	cfg := e.config()
	// Only wake-ups start a claim: the poll is out of the way.
	cfg.PollInterval = time.Hour
	d := e.start(b, cfg)
	var lat []time.Duration
	i := 0
	for b.Loop() {
		i++
		e.insert(b, time.Time{}, fmt.Sprintf("u%d@idle.test", i))
		start := time.Now()
		d.Wake()
		srv.WaitMessages(b, i, time.Minute)
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}
