package app_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/delivery/webhook"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
)

// startWithWebhooks is setup with webhooks enabled for loopback receivers
// and retried every 10ms.
func startWithWebhooks(t *testing.T, allowPrivate bool) *bundle {
	t.Helper()
	dns := testenv.StartDNS(t)
	smtpSrv := testenv.StartSMTP(t)
	dns.AddMX("example.test", "mx.example.test", 10)
	dns.AddA("mx.example.test", "127.0.0.1")
	cfg := app.Config{
		HTTPAddr:            "127.0.0.1:0",
		GRPCAddr:            "127.0.0.1:0",
		DatabaseURL:         testenv.Database(t),
		BootstrapAPIKey:     testKey,
		Delivery:            delivery.Config{DNSServer: dns.Addr, PollInterval: 100 * time.Millisecond},
		WebhookAllowPrivate: allowPrivate,
		Webhook: webhook.Config{
			PollInterval:  10 * time.Millisecond,
			RetrySchedule: []time.Duration{10 * time.Millisecond},
		},
	}
	cfg.Delivery.SMTP.Port = smtpSrv.Port
	cfg.Delivery.SMTP.Hostname = "posthaste.test"
	// The test MX is on loopback, which the destination guard refuses
	// unless allowed.
	cfg.Delivery.AllowDestinations = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	// Tests send from domains nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return &bundle{app: a, smtp: smtpSrv, dns: dns, base: "http://" + a.HTTPAddr()}
}

func TestWebhooksOverREST(t *testing.T) {
	t.Parallel()
	b := startWithWebhooks(t, true)
	var (
		mu    sync.Mutex
		types []string
	)
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var e struct{ Type string }
		_ = json.Unmarshal(body, &e)
		mu.Lock()
		types = append(types, e.Type)
		mu.Unlock()
	}))
	defer rcv.Close()
	got := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), types...)
	}

	code, created := b.do(t, http.MethodPost, "/v1/webhooks", map[string]any{
		"url": rcv.URL + "/hook", "event_types": []string{"accepted", "delivered"}, "description": "test",
	})
	if code != http.StatusOK || !strings.HasPrefix(created["secret"].(string), "whsec_") {
		t.Fatalf("create: %d %v", code, created)
	}
	id := created["webhook"].(map[string]any)["id"].(string)

	code, sent := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from":    map[string]any{"address": "shop@example.test"},
		"to":      []any{map[string]any{"address": "someone@example.test"}},
		"subject": "hi", "text": "hello",
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, sent)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(got()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("webhook events so far: %v", got())
		}
		select {
		case <-t.Context().Done():
			t.Fatal(t.Context().Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if g := got(); g[0] != "accepted" || g[1] != "delivered" {
		t.Errorf("events %v, want accepted then delivered", g)
	}

	// PATCH changes only the fields in the body.
	code, patched := b.do(t, http.MethodPatch, "/v1/webhooks/"+id, map[string]any{"enabled": false})
	if code != http.StatusOK || patched["enabled"] != nil && patched["enabled"] != false || patched["url"] != rcv.URL+"/hook" || patched["description"] != "test" {
		t.Errorf("patch: %d %v", code, patched)
	}
	code, list := b.do(t, http.MethodGet, "/v1/webhooks/"+id+"/deliveries?page_size=10", nil)
	deliveries, _ := list["deliveries"].([]any)
	if code != http.StatusOK || len(deliveries) != 2 {
		t.Fatalf("deliveries: %d %v", code, list)
	}
	did := deliveries[0].(map[string]any)["id"].(string)
	code, retried := b.do(t, http.MethodPost, "/v1/webhooks/"+id+"/deliveries/"+did+":retry", map[string]any{})
	if code != http.StatusOK || retried["state"] != "pending" {
		t.Errorf("retry: %d %v", code, retried)
	}
	code, rotated := b.do(t, http.MethodPost, "/v1/webhooks/"+id+":rotateSecret", map[string]any{})
	if code != http.StatusOK || rotated["secret"] == created["secret"] {
		t.Errorf("rotate: %d %v", code, rotated)
	}
	if code, _ := b.do(t, http.MethodDelete, "/v1/webhooks/"+id, nil); code != http.StatusOK {
		t.Errorf("delete: %d", code)
	}
	if code, body := b.do(t, http.MethodGet, "/v1/webhooks/"+id, nil); code != http.StatusNotFound {
		t.Errorf("get after delete: %d %v", code, body)
	}
}

// Without --webhook-allow-private, a loopback URL is a 400 naming url.
func TestWebhookPrivateURLRefusedOverREST(t *testing.T) {
	t.Parallel()
	b := startWithWebhooks(t, false)
	code, body := b.do(t, http.MethodPost, "/v1/webhooks", map[string]any{"url": "http://127.0.0.1:9/hook"})
	errBody, _ := body["error"].(map[string]any)
	fv, _ := errBody["field_violations"].([]any)
	if code != http.StatusBadRequest || len(fv) != 1 || fv[0].(map[string]any)["field"] != "url" {
		t.Errorf("create with a loopback URL: %d %v", code, body)
	}
	if code, list := b.do(t, http.MethodGet, "/v1/webhooks", nil); code != http.StatusOK || len(list["webhooks"].([]any)) != 0 {
		t.Errorf("list after the refusal: %d %v", code, list)
	}
}
