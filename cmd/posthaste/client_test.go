package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
)

const clientTestKey = "ph_client_test_key_0123456789"

// startServer runs the service in sandbox mode on the test database and
// returns its gRPC address.
func startServer(t *testing.T) string {
	t.Helper()
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: clientTestKey,
		Sandbox:         true,
	}
	cfg.Service.AllowUnverifiedDomains = true
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Stop(context.Background()); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return a.GRPCAddr()
}

func TestClientCommands(t *testing.T) {
	t.Parallel()
	addr := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := run(ctx, append(args, "--server", addr, "--api-key", clientTestKey), &out, &errOut)
		return out.String() + errOut.String(), err
	}

	out, err := client("send", "--from", "Shop <shop@example.test>", "--to", "someone@example.test",
		"--subject", "hi", "--text", "hello", "--tag", "welcome", "--header", "X-Campaign: a, b", "--wait")
	if err != nil {
		t.Fatalf("send --wait: %v\n%s", err, out)
	}
	if !strings.Contains(out, "delivered") || !strings.Contains(out, "is delivered") {
		t.Errorf("send --wait output:\n%s", out)
	}
	id := strings.Fields(out)[1]

	out, err = client("status", id)
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	for _, want := range []string{"someone@example.test", "delivered", "250"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}

	out, err = client("messages", "list", "--json", "--tag", "welcome", "--status", "delivered")
	if err != nil {
		t.Fatalf("messages list: %v\n%s", err, out)
	}
	var list struct {
		Messages []struct {
			ID     string `json:"id"`
			Status string `json:"status"`
		} `json:"messages"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("messages list --json: %v\n%s", err, out)
	}
	if len(list.Messages) != 1 || list.Messages[0].ID != id || list.Messages[0].Status != "delivered" {
		t.Errorf("messages list: %+v", list)
	}

	// A bounced recipient makes send --wait fail, for scripts.
	out, err = client("send", "--from", "shop@example.test", "--to", "bounce@example.test", "--text", "x", "--wait")
	if err == nil || !strings.Contains(out, "bounced") {
		t.Errorf("send --wait to a bouncing address: %v\n%s", err, out)
	}

	// A bad key: non-zero with the server's message.
	var errOut bytes.Buffer
	err = run(ctx, []string{"status", id, "--server", addr, "--api-key", "ph_wrong_wrong_wrong_wrong"}, &bytes.Buffer{}, &errOut)
	if err == nil || !strings.Contains(err.Error(), "Unauthenticated") {
		t.Errorf("bad key: %v", err)
	}
}

func TestClientEventsTail(t *testing.T) {
	t.Parallel()
	addr := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// tail writes into a pipe so the test reads events as they come.
	tailCtx, stopTail := context.WithCancel(ctx)
	defer stopTail()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(tailCtx, []string{"events", "tail", "--from-start", "--json", "--types", "delivered",
			"--server", addr, "--api-key", clientTestKey}, pw, &bytes.Buffer{})
		pw.Close()
	}()
	var out bytes.Buffer
	if err := run(ctx, []string{"send", "--from", "shop@example.test", "--to", "someone@example.test", "--text", "x",
		"--server", addr, "--api-key", clientTestKey}, &out, &out); err != nil {
		t.Fatalf("send: %v\n%s", err, out.String())
	}
	sc := bufio.NewScanner(pr)
	if !sc.Scan() {
		t.Fatalf("tail ended without an event: %v", <-done)
	}
	var ev struct {
		Type      string `json:"type"`
		MessageID string `json:"message_id"`
	}
	if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Type != "delivered" {
		t.Errorf("event %s: %v", sc.Text(), err)
	}
	stopTail()
	go func() {
		for sc.Scan() {
		}
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("tail after cancel: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("tail did not stop when its context ended")
	}
}
