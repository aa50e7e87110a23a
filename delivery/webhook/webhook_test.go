package webhook_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/webhook"
	"github.com/posthaste/posthaste/internal/netguard"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}

// bundle is a migrated database, opened twice: store for the code under
// test, raw to look at the rows.
type bundle struct {
	store *db.DB
	raw   *pgxpool.Pool
}

func setup(t *testing.T) bundle {
	t.Helper()
	u := testenv.Database(t)
	store, err := db.Open(t.Context(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	raw, err := pgxpool.New(t.Context(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	return bundle{store: store, raw: raw}
}

// testConfig retries every 10ms and lets loopback through the guard, where
// the test receivers listen.
func testConfig(t *testing.T) webhook.Config {
	return webhook.Config{
		PollInterval:  10 * time.Millisecond,
		Timeout:       5 * time.Second,
		RetrySchedule: []time.Duration{10 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond},
		Guard:         netguard.New(netip.MustParsePrefix("127.0.0.0/8")),
		Logger:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
}

// start runs a fan-out and a sender until the test ends.
func start(t *testing.T, cfg webhook.Config, store *db.DB) (*webhook.FanOut, *webhook.Sender) {
	t.Helper()
	sender, err := webhook.NewSender(cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	fanOut, err := webhook.NewFanOut(cfg, store, sender.Wake)
	if err != nil {
		t.Fatal(err)
	}
	sender.Start(t.Context())
	fanOut.Start(t.Context())
	t.Cleanup(func() {
		fanOut.Stop()
		sender.Stop()
	})
	return fanOut, sender
}

// request is one request a receiver got.
type request struct {
	header http.Header
	body   []byte
	event  event
	status int
}

type event struct {
	ID        string         `json:"id"`
	Type      string         `json:"type"`
	CreatedAt time.Time      `json:"created_at"`
	Data      map[string]any `json:"data"`
}

// receiver is an HTTP endpoint on loopback that records what it gets and
// answers what respond says (200 when respond is nil).
type receiver struct {
	*httptest.Server
	mu       sync.Mutex
	requests []request
	respond  func(e event, n int) int // n counts the requests for e.ID
	changed  chan struct{}
}

func newReceiver(t *testing.T, respond func(e event, n int) int) *receiver {
	t.Helper()
	r := &receiver{respond: respond, changed: make(chan struct{}, 1)}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		var e event
		if err := json.Unmarshal(body, &e); err != nil {
			t.Errorf("receiver: body is not an event: %v: %s", err, body)
		}
		r.mu.Lock()
		n := 1
		for _, p := range r.requests {
			if p.event.ID == e.ID {
				n++
			}
		}
		status := http.StatusOK
		if r.respond != nil {
			status = r.respond(e, n)
		}
		r.requests = append(r.requests, request{header: req.Header.Clone(), body: body, event: e, status: status})
		r.mu.Unlock()
		select {
		case r.changed <- struct{}{}:
		default:
		}
		w.WriteHeader(status)
		fmt.Fprint(w, "ok")
	}))
	t.Cleanup(r.Close)
	return r
}

func (r *receiver) got() []request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.requests)
}

// delivered returns the requests answered with 2xx.
func (r *receiver) delivered() []request {
	var out []request
	for _, q := range r.got() {
		if q.status < 300 {
			out = append(out, q)
		}
	}
	return out
}

// waitFor polls cond until it holds, for at most 20 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		select {
		case <-t.Context().Done():
			t.Fatal(t.Context().Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func newEndpoint(t *testing.T, store *db.DB, url string, types ...string) db.WebhookEndpoint {
	t.Helper()
	secret, err := webhook.NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	w, err := store.CreateWebhookEndpoint(t.Context(), db.NewWebhookEndpointParams{
		ProjectID: db.DefaultProjectID(), URL: url, EventTypes: types, Enabled: true, Secret: secret,
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// sendMessage stores a message with n recipients (one accepted event) and
// returns it.
func sendMessage(t *testing.T, store *db.DB, n int) db.NewMessage {
	t.Helper()
	id := uuid.Must(uuid.NewV7())
	m := db.NewMessage{
		ID:              id,
		MessageIDHeader: "<" + id.String() + "@example.test>",
		EnvelopeFrom:    "bounces@example.test",
		FromHeader:      "shop@example.test",
		Subject:         "hi",
		Raw:             []byte("From: shop@example.test\r\nSubject: hi\r\n\r\nhello\r\n"),
		Tags:            []string{"receipt"},
		Metadata:        map[string]string{"order_id": "1234"},
	}
	for i := range n {
		m.Recipients = append(m.Recipients, db.NewRecipient{
			ID:      uuid.Must(uuid.NewV7()),
			Address: fmt.Sprintf("user%d@d%d.example.test", i, i),
			Domain:  fmt.Sprintf("d%d.example.test", i),
			Kind:    db.KindTo,
		})
	}
	if _, err := store.InsertMessage(t.Context(), m); err != nil {
		t.Fatal(err)
	}
	return m
}

// cancel writes a canceled event per recipient of m.
func cancel(t *testing.T, store *db.DB, m db.NewMessage) {
	t.Helper()
	if _, _, err := store.CancelMessage(t.Context(), db.DefaultProjectID(), m.ID); err != nil {
		t.Fatal(err)
	}
}

// verify checks a request's signature the way the Standard Webhooks
// specification describes it, independently of the package's signer: any
// of the space-separated "v1,<base64>" signatures must equal the
// HMAC-SHA256 of "id.timestamp.body" keyed with the secret's base64-decoded
// bytes after "whsec_".
func verify(secret string, h http.Header, body []byte) error {
	id, ts, sigs := h.Get("webhook-id"), h.Get("webhook-timestamp"), h.Get("webhook-signature")
	if id == "" || ts == "" || sigs == "" {
		return fmt.Errorf("missing headers: id %q, timestamp %q, signature %q", id, ts, sigs)
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("timestamp %q: %w", ts, err)
	}
	if d := time.Since(time.Unix(sec, 0)); d > 5*time.Minute || d < -5*time.Minute {
		return fmt.Errorf("timestamp %s too far from now", ts)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		return err
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "." + string(body)))
	want := mac.Sum(nil)
	for _, s := range strings.Split(sigs, " ") {
		version, b64, ok := strings.Cut(s, ",")
		if !ok || version != "v1" {
			continue
		}
		got, err := base64.StdEncoding.DecodeString(b64)
		if err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return fmt.Errorf("no signature in %q matches", sigs)
}

func TestSignedEventsVerify(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rcv := newReceiver(t, nil)
	ep := newEndpoint(t, b.store, rcv.URL+"/hooks")
	start(t, testConfig(t), b.store)

	m := sendMessage(t, b.store, 2)
	cancel(t, b.store, m)
	waitFor(t, "three events", func() bool { return len(rcv.delivered()) == 3 })

	var types []string
	for _, q := range rcv.got() {
		if err := verify(ep.Secret, q.header, q.body); err != nil {
			t.Errorf("%s: %v", q.event.Type, err)
		}
		if ct := q.header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("content-type %q", ct)
		}
		if !strings.HasPrefix(q.header.Get("User-Agent"), "Posthaste") {
			t.Errorf("user-agent %q", q.header.Get("User-Agent"))
		}
		if q.event.ID != q.header.Get("webhook-id") {
			t.Errorf("body id %q, webhook-id %q", q.event.ID, q.header.Get("webhook-id"))
		}
		if q.event.Data["message_id"] != m.ID.String() || q.event.CreatedAt.IsZero() {
			t.Errorf("event %s: data %v, created_at %v", q.event.Type, q.event.Data, q.event.CreatedAt)
		}
		if md, _ := q.event.Data["metadata"].(map[string]any); md["order_id"] != "1234" {
			t.Errorf("event %s: metadata %v", q.event.Type, q.event.Data["metadata"])
		}
		if q.event.Type == "canceled" {
			if q.event.Data["recipient_id"] == nil || !strings.HasSuffix(fmt.Sprint(q.event.Data["recipient"]), ".example.test") {
				t.Errorf("canceled event without its recipient: %v", q.event.Data)
			}
		}
		types = append(types, q.event.Type)
	}
	if !slices.Equal(types, []string{"accepted", "canceled", "canceled"}) {
		t.Errorf("event types %v", types)
	}

	// After a rotation both secrets sign, and a receiver knowing either
	// one verifies the request.
	rotated, err := b.store.RotateWebhookSecret(t.Context(), db.DefaultProjectID(), ep.ID, mustSecret(t), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	sendMessage(t, b.store, 1)
	waitFor(t, "the event after rotation", func() bool { return len(rcv.delivered()) == 4 })
	last := rcv.got()[3]
	if n := len(strings.Split(last.header.Get("webhook-signature"), " ")); n != 2 {
		t.Errorf("after rotation %d signatures, want 2", n)
	}
	for _, secret := range []string{ep.Secret, rotated.Secret} {
		if err := verify(secret, last.header, last.body); err != nil {
			t.Errorf("verify with one of the secrets: %v", err)
		}
	}
	if err := verify(mustSecret(t), last.header, last.body); err == nil {
		t.Error("a wrong secret verified")
	}
}

func mustSecret(t *testing.T) string {
	s, err := webhook.NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// deliveryOf returns the deliveries of an endpoint, newest first.
func deliveryOf(t *testing.T, b bundle, endpoint uuid.UUID) []db.WebhookDelivery {
	t.Helper()
	ds, err := b.store.ListWebhookDeliveries(t.Context(), db.ListWebhookDeliveriesParams{
		ProjectID: db.DefaultProjectID(), EndpointID: endpoint, Limit: 100,
	})
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

func TestServerErrorsAreRetried(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rcv := newReceiver(t, func(_ event, n int) int {
		if n <= 2 {
			return http.StatusInternalServerError
		}
		return http.StatusNoContent
	})
	ep := newEndpoint(t, b.store, rcv.URL)
	start(t, testConfig(t), b.store)
	sendMessage(t, b.store, 1)
	waitFor(t, "the delivery", func() bool { return len(rcv.delivered()) == 1 })
	waitFor(t, "the outcome", func() bool {
		ds := deliveryOf(t, b, ep.ID)
		return len(ds) == 1 && ds[0].State == db.WebhookDelivered
	})
	d := deliveryOf(t, b, ep.ID)[0]
	if d.Attempts != 3 || d.LastStatusCode != http.StatusNoContent || d.LastError != "" || d.LastAttemptAt == nil {
		t.Errorf("delivery after two 500s and a 204: %+v", d)
	}
	if got := len(rcv.got()); got != 3 {
		t.Errorf("%d requests, want 3", got)
	}
}

// A URL stored while private addresses were allowed (or resolving
// elsewhere at the time) is still refused when the sender connects.
func TestGuardRefusesAtSendTime(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rcv := newReceiver(t, nil)
	ep := newEndpoint(t, b.store, "http://localhost:"+rcv.URL[strings.LastIndex(rcv.URL, ":")+1:])
	cfg := testConfig(t)
	cfg.Guard = netguard.New()
	cfg.RetrySchedule = []time.Duration{}
	start(t, cfg, b.store)
	sendMessage(t, b.store, 1)
	waitFor(t, "the delivery to fail", func() bool {
		ds := deliveryOf(t, b, ep.ID)
		return len(ds) == 1 && ds[0].State == db.WebhookFailed
	})
	d := deliveryOf(t, b, ep.ID)[0]
	if !strings.Contains(d.LastError, "address guard") || d.LastStatusCode != 0 {
		t.Errorf("failed delivery: status %d, error %q", d.LastStatusCode, d.LastError)
	}
	if n := len(rcv.got()); n != 0 {
		t.Errorf("the receiver on loopback got %d requests", n)
	}
}

// Events written while no worker runs, and events whose fan-out happened
// before a restart but whose sending did not, are all delivered once.
func TestRestartLosesNothing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rcv := newReceiver(t, nil)
	ep := newEndpoint(t, b.store, rcv.URL)
	cfg := testConfig(t)

	// Written with nothing running.
	for range 3 {
		sendMessage(t, b.store, 1)
	}
	// A fan-out alone turns them into deliveries and stops: nothing sent.
	fanOut, err := webhook.NewFanOut(cfg, b.store, nil)
	if err != nil {
		t.Fatal(err)
	}
	fanOut.Start(t.Context())
	waitFor(t, "three deliveries", func() bool { return len(deliveryOf(t, b, ep.ID)) == 3 })
	fanOut.Stop()
	// More events while stopped.
	for range 3 {
		sendMessage(t, b.store, 2)
	}
	if n := len(rcv.got()); n != 0 {
		t.Fatalf("%d requests before any sender ran", n)
	}

	// The new process: two fan-outs and two senders, as two instances.
	start(t, cfg, b.store)
	start(t, cfg, b.store)
	waitFor(t, "six events", func() bool { return len(rcv.delivered()) >= 6 })
	waitFor(t, "every delivery's outcome", func() bool {
		for _, d := range deliveryOf(t, b, ep.ID) {
			if d.State != db.WebhookDelivered {
				return false
			}
		}
		return true
	})
	seen := map[string]int{}
	for _, q := range rcv.got() {
		seen[q.event.ID]++
	}
	if len(seen) != 6 || len(rcv.got()) != 6 {
		t.Errorf("got %d requests for %d events, want 6 for 6: %v", len(rcv.got()), len(seen), seen)
	}
	if n := len(deliveryOf(t, b, ep.ID)); n != 6 {
		t.Errorf("%d deliveries, want 6", n)
	}
}

// A message's later events wait while an earlier one is being retried.
func TestPerMessageOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rcv := newReceiver(t, func(e event, n int) int {
		if e.Type == "accepted" && n <= 3 {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	newEndpoint(t, b.store, rcv.URL)
	cfg := testConfig(t)
	cfg.Concurrency = 4
	msgs := []db.NewMessage{sendMessage(t, b.store, 3), sendMessage(t, b.store, 3)}
	for _, m := range msgs {
		cancel(t, b.store, m)
	}
	start(t, cfg, b.store)
	waitFor(t, "every event", func() bool { return len(rcv.delivered()) == 8 })
	for _, m := range msgs {
		var seq []string
		for _, q := range rcv.got() {
			if q.event.Data["message_id"] == m.ID.String() {
				seq = append(seq, fmt.Sprintf("%s:%d", q.event.Type, q.status))
			}
		}
		want := []string{"accepted:503", "accepted:503", "accepted:503", "accepted:200", "canceled:200", "canceled:200", "canceled:200"}
		if !slices.Equal(seq, want) {
			t.Errorf("message %s: requests %v, want %v", m.ID, seq, want)
		}
	}
}

// An endpoint that keeps failing is disabled, that is recorded, and the
// project's other endpoints hear of it.
func TestEndpointDisabledAfterFailures(t *testing.T) {
	t.Parallel()
	b := setup(t)
	failing := newReceiver(t, func(event, int) int { return http.StatusBadGateway })
	watcher := newReceiver(t, nil)
	bad := newEndpoint(t, b.store, failing.URL)
	good := newEndpoint(t, b.store, watcher.URL, string(db.EventEndpointDisabled))
	cfg := testConfig(t)
	cfg.DisableAfterFailures = 3
	start(t, cfg, b.store)
	sendMessage(t, b.store, 1)

	waitFor(t, "the endpoint.disabled event", func() bool { return len(watcher.delivered()) == 1 })
	e := watcher.got()[0].event
	if e.Type != "endpoint.disabled" || e.Data["endpoint_id"] != bad.ID.String() || e.Data["reason"] == "" {
		t.Errorf("event %+v", e)
	}
	if err := verify(good.Secret, watcher.got()[0].header, watcher.got()[0].body); err != nil {
		t.Error(err)
	}
	got, err := b.store.GetWebhookEndpoint(t.Context(), db.DefaultProjectID(), bad.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Enabled || got.DisabledAt == nil || !strings.Contains(got.DisabledReason, "3 attempts in a row failed") || got.ConsecutiveFailures != 3 {
		t.Errorf("endpoint after 3 failures: %+v", got)
	}
	if n := len(failing.got()); n != 3 {
		t.Errorf("the failing endpoint got %d requests, want 3", n)
	}
	// Its delivery waits, pending, for the endpoint to be enabled again.
	ds := deliveryOf(t, b, bad.ID)
	if len(ds) != 1 || ds[0].State != db.WebhookPending || !strings.Contains(ds[0].LastError, "HTTP 502") {
		t.Errorf("deliveries of the disabled endpoint: %+v", ds)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		cfg   webhook.Config
		field string
	}{
		{webhook.Config{Concurrency: -1}, "Concurrency"},
		{webhook.Config{Timeout: time.Minute, LeaseDuration: time.Minute}, "LeaseDuration"},
		{webhook.Config{RetrySchedule: []time.Duration{-time.Second}}, "RetrySchedule"},
		{webhook.Config{DisableAfterFailures: -1}, "DisableAfterFailures"},
	} {
		err := tt.cfg.Validate()
		if err == nil || !strings.HasPrefix(err.Error(), tt.field+":") {
			t.Errorf("Validate(%+v) = %v, want an error about %s", tt.cfg, err, tt.field)
		}
	}
	if err := (webhook.Config{}).Validate(); err != nil {
		t.Errorf("defaults: %v", err)
	}
}

func TestWithDefaults(t *testing.T) {
	t.Parallel()
	cfg := webhook.Config{}.WithDefaults()
	var total time.Duration
	for _, d := range cfg.RetrySchedule {
		total += d
	}
	if total < 24*time.Hour || total > 30*time.Hour {
		t.Errorf("the default schedule spans %s, want about a day", total)
	}
}
