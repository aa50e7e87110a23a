package app_test

import (
	"bytes"
	"context"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/internal/testenv"
)

// setupStrict is setup without unverified domains: a process that signs
// and refuses, with a key-encryption key, verifying through the same DNS
// server delivery uses.
func setupStrict(t *testing.T) *bundle {
	t.Helper()
	dns := testenv.StartDNS(t)
	smtpSrv := testenv.StartSMTP(t)
	dns.AddMX("example.test", "mx.example.test", 10)
	dns.AddA("mx.example.test", "127.0.0.1")
	kek, err := keyenc.Parse(keyenc.Generate())
	if err != nil {
		t.Fatal(err)
	}
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Delivery:        delivery.Config{DNSServer: dns.Addr, PollInterval: 100 * time.Millisecond},
	}
	// The test MX is on loopback, which the address guard refuses unless
	// allowed.
	cfg.Delivery.AllowDestinations = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	cfg.Delivery.SMTP.Port = smtpSrv.Port
	cfg.Delivery.SMTP.Hostname = "posthaste.test"
	cfg.Service.KeyEncryptionKey = kek
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
		_ = a.Stop(ctx)
	})
	return &bundle{app: a, smtp: smtpSrv, dns: dns, base: "http://" + a.HTTPAddr()}
}

func firstViolation(body map[string]any) string {
	e, _ := body["error"].(map[string]any)
	vs, _ := e["field_violations"].([]any)
	if len(vs) == 0 {
		return ""
	}
	f, _ := vs[0].(map[string]any)["field"].(string)
	return f
}

// Over REST: an unverified From is refused with 403 and nothing is stored;
// once the domain's DKIM record is published and verified, the message is
// delivered signed, and the signature verifies against DNS at the receiver.
func TestDKIMSignedDelivery(t *testing.T) {
	t.Parallel()
	b := setupStrict(t)
	send := map[string]any{
		"from":    map[string]any{"address": "shop@example.test"},
		"to":      []any{map[string]any{"address": "ada@example.test"}},
		"subject": "Your receipt",
		"text":    "Thanks for your order.",
		"headers": []any{map[string]any{"name": "List-Unsubscribe", "value": "<https://example.test/u>"}},
	}
	code, body := b.do(t, http.MethodPost, "/v1/messages", send)
	if code != http.StatusForbidden || !strings.Contains(body["error"].(map[string]any)["message"].(string), "from: example.test") {
		t.Fatalf("unverified From: %d %v, want 403 naming from", code, body)
	}
	if code, list := b.do(t, http.MethodGet, "/v1/messages", nil); code != http.StatusOK || len(list["messages"].([]any)) != 0 {
		t.Fatalf("stored after a refusal: %d %v", code, list)
	}

	if code, body := b.do(t, http.MethodPost, "/v1/domains", map[string]any{"domain": "exa mple.test"}); code != http.StatusBadRequest || firstViolation(body) != "domain" {
		t.Errorf("bad domain: %d %v, want 400 naming domain", code, body)
	}
	code, dom := b.do(t, http.MethodPost, "/v1/domains", map[string]any{"domain": "example.test"})
	if code != http.StatusOK {
		t.Fatalf("create domain: %d %v", code, dom)
	}
	if code, _ := b.do(t, http.MethodPost, "/v1/domains", map[string]any{"domain": "example.test"}); code != http.StatusConflict {
		t.Errorf("duplicate domain: %d, want 409", code)
	}
	if code, _ := b.do(t, http.MethodGet, "/v1/domains/0193a0c4-7d2f-7c4e-9b1a-3f1e2d3c4b5a", nil); code != http.StatusNotFound {
		t.Errorf("unknown domain: %d, want 404", code)
	}
	id := dom["id"].(string)
	for _, r := range dom["records"].([]any) {
		rec := r.(map[string]any)
		if rec["purpose"] == "dkim" {
			b.dns.AddTXT(rec["name"].(string), rec["value"].(string))
		}
	}
	code, ver := b.do(t, http.MethodPost, "/v1/domains/"+id+":verify", map[string]any{})
	if code != http.StatusOK || ver["status"] != "verified" {
		t.Fatalf("verify: %d %v", code, ver)
	}

	code, resp := b.do(t, http.MethodPost, "/v1/messages", send)
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, resp)
	}
	b.waitStatus(t, resp["id"].(string), "delivered")
	msgs := b.smtp.WaitMessages(t, 1, 10*time.Second)
	data := msgs[0].Data
	r := b.dns.Resolver()
	lookup := &dkim.VerifyOptions{LookupTXT: func(name string) ([]string, error) { return r.LookupTXT(context.Background(), name+".") }}
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(data), lookup)
	if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.test" {
		t.Fatalf("received message's signature: %+v, %v\n%s", vs, err, data)
	}
	if !strings.Contains(strings.ToLower(strings.Join(vs[0].HeaderKeys, ":")), "list-unsubscribe") {
		t.Errorf("List-Unsubscribe not signed: h=%v", vs[0].HeaderKeys)
	}
	tampered := bytes.Replace(data, []byte("Thanks for your order."), []byte("Thanks for your money."), 1)
	vs, err = dkim.VerifyWithOptions(bytes.NewReader(tampered), lookup)
	if err != nil || len(vs) != 1 || vs[0].Err == nil {
		t.Errorf("tampered message verified: %+v, %v", vs, err)
	}
}
