package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/credentials/insecure"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}

// The example runs against a real server in sandbox mode: it sends, and
// reads the status until the sandbox's answers are final.
func TestExample(t *testing.T) {
	const key = "ph_example_key_0123456789abcdef"
	a, err := app.New(app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: key,
		Sandbox:         true,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Stop(context.Background()); err != nil {
			t.Errorf("stop: %v", err)
		}
	})

	var out bytes.Buffer
	if err := run(ctx, a.GRPCAddr(), key, "shop@example.test", "bounce@example.test", insecure.NewCredentials(), &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "bounce@example.test: bounced 550 5.1.1") {
		t.Errorf("output:\n%s", out.String())
	}
	// Run again: the idempotency key replays the first receipt.
	out.Reset()
	if err := run(ctx, a.GRPCAddr(), key, "shop@example.test", "bounce@example.test", insecure.NewCredentials(), &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "replayed true") {
		t.Errorf("second run output:\n%s", out.String())
	}
}
