package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/testenv"
)

// TestServeJSONOutput runs serve with --log-format json: every line it
// writes, on stdout and stderr, is one JSON object, the generated key
// included, and a REST call is one info line with protocol rest and its
// request id.
func TestServeJSONOutput(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	stdout, stderr := &lockedBuffer{}, &lockedBuffer{}
	done := make(chan error, 1)
	args := []string{"serve", "--sandbox", "--database-url", testenv.Database(t),
		"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--log-format", "json"}
	go func() { done <- run(ctx, args, stdout, stderr) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("serve did not stop within 60s")
		}
	}()

	// Wait for the "posthaste started" line, which names the listeners.
	var httpAddr string
	deadline := time.After(60 * time.Second)
	for httpAddr == "" {
		for _, rec := range jsonLines(t, stderr.String()) {
			if rec["msg"] == "posthaste started" {
				httpAddr, _ = rec["http"].(string)
			}
		}
		if httpAddr != "" {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("serve exited early: %v\n%s", err, stderr.String())
		case <-deadline:
			t.Fatalf("serve did not start:\n%s", stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	key := ""
	for _, rec := range jsonLines(t, stdout.String()) {
		key, _ = rec["api_key"].(string)
	}
	if !strings.HasPrefix(key, "ph_") {
		t.Fatalf("no API key in the JSON output:\n%s", stdout.String())
	}

	const requestID = "json-output-test"
	req, err := http.NewRequest(http.MethodGet, "http://"+httpAddr+"/v1/messages", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("X-Request-Id", requestID)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("list: %d", resp.StatusCode)
	}
	// The line is written when the handler returns, before net/http ends
	// a response this small.
	lines := 0
	for _, rec := range jsonLines(t, stderr.String()) {
		if rec["request_id"] != requestID || rec["level"] != "INFO" {
			continue
		}
		lines++
		if rec["msg"] != "rest call" || rec["protocol"] != "rest" || rec["route"] != "/v1/messages" {
			t.Errorf("request line: %v", rec)
		}
	}
	if lines != 1 {
		t.Errorf("%d info lines for the request, want 1:\n%s", lines, stderr.String())
	}
	if strings.Contains(stderr.String(), key) {
		t.Error("the API key is in the log")
	}
}

// jsonLines parses each line of out as a JSON object, failing on one that
// is not.
func jsonLines(t *testing.T, out string) []map[string]any {
	t.Helper()
	var recs []map[string]any
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("output line is not JSON: %q", line)
		}
		recs = append(recs, rec)
	}
	return recs
}

// The error that ends the process is a JSON line when JSON logs were asked
// for, on the command line or in the environment.
func TestReportErrorAsJSON(t *testing.T) {
	cause := errors.New("database not reachable")
	for _, tc := range []struct {
		args []string
		env  string
		json bool
	}{
		{[]string{"serve", "--log-format", "json"}, "", true},
		{[]string{"serve", "--log-format=json"}, "", true},
		{[]string{"serve"}, "json", true},
		{[]string{"serve", "--log-format", "text"}, "json", false},
		{[]string{"serve"}, "", false},
	} {
		var out bytes.Buffer
		reportError(&out, tc.args, func(string) string { return tc.env }, cause)
		var line map[string]any
		isJSON := json.Unmarshal(out.Bytes(), &line) == nil
		if isJSON != tc.json || (isJSON && line["err"] != cause.Error()) {
			t.Errorf("args %v env %q: %q, want JSON %v", tc.args, tc.env, out.String(), tc.json)
		}
	}
}
