package app_test

import (
	"context"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestSandboxOutcomes(t *testing.T) {
	t.Parallel()
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Sandbox:         true,
	}
	cfg.Delivery.PollInterval = 100 * time.Millisecond
	cfg.Delivery.Retry.InitialInterval = 200 * time.Millisecond
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	b := &bundle{app: a, base: "http://" + a.HTTPAddr()}

	send := func(t *testing.T, to string) string {
		code, resp := b.do(t, "POST", "/v1/messages", map[string]any{
			"from":    map[string]any{"address": "sender@posthaste.test"},
			"to":      []any{map[string]any{"address": to}},
			"subject": "sandbox",
			"text":    "hello",
		})
		if code != 202 {
			t.Fatalf("send to %s: %d %v", to, code, resp)
		}
		return resp["id"].(string)
	}
	cases := []struct {
		to, status   string
		code         float64
		enhancedCode string
	}{
		{"someone@example.com", "delivered", 250, ""},
		{"bounce@example.com", "bounced", 550, "5.1.1"},
		{"reject-data@example.com", "bounced", 554, "5.6.0"},
		{"defer@example.com", "delivered", 250, ""},
	}
	for _, c := range cases {
		t.Run(c.to, func(t *testing.T) {
			t.Parallel()
			msg := b.waitStatus(t, send(t, c.to), c.status)
			rec := msg["recipients"].([]any)[0].(map[string]any)
			reply := rec["last_reply"].(map[string]any)
			if reply["code"] != c.code {
				t.Errorf("code = %v, want %v", reply["code"], c.code)
			}
			if c.enhancedCode != "" && reply["enhanced_code"] != c.enhancedCode {
				t.Errorf("enhanced code = %v, want %v", reply["enhanced_code"], c.enhancedCode)
			}
			if c.to == "defer@example.com" {
				if rec["attempt_count"] != float64(2) {
					t.Errorf("defer@ attempt_count = %v, want 2 (451 then 250)", rec["attempt_count"])
				}
			}
		})
	}
}
