package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/posthaste/posthaste/internal/pgserver"
)

// lockedBuffer is an io.Writer the test can read while serve writes to it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

var (
	restAddrRE = regexp.MustCompile(`REST on (127\.0\.0\.1:\d+)`)
	keyRE      = regexp.MustCompile(`\n\s+(ph_[a-z2-7]+)\n`)
)

// TestServeSandboxWithEmbeddedDatabase follows the README: serve --sandbox
// with no database configured, a send to someone@ is delivered, one to
// bounce@ bounces with 550 5.1.1, and a CR/LF in the subject is a 400 that
// names the field and stores nothing. It then restarts serve on the same
// data directory: the message and the key survive.
func TestServeSandboxWithEmbeddedDatabase(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL server")
	}
	if _, err := pgserver.FindBinDir(context.Background()); errors.Is(err, pgserver.ErrNoBinaries) {
		t.Skip("no PostgreSQL server binaries on this machine")
	}
	tmp := t.TempDir()
	dataDir := filepath.Join(tmp, "data")
	// The embedded database runs as an unprivileged user when the test runs
	// as root; it must be able to reach the data directory.
	for _, dir := range []string{filepath.Dir(tmp), tmp} {
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"serve", "--sandbox", "--data-dir", dataDir,
		"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0",
		"--poll-interval", "200ms", "--log-level", "warn"}

	stdout, base, stop := startServe(t, args)
	m := keyRE.FindStringSubmatch(stdout.String())
	if m == nil {
		stop()
		t.Fatalf("serve printed no API key:\n%s", stdout.String())
	}
	key := m[1]

	send := func(to, subject string) (int, map[string]any) {
		return call(t, key, http.MethodPost, base+"/v1/messages", map[string]any{
			"from":    map[string]any{"address": "shop@example.com"},
			"to":      []any{map[string]any{"address": to}},
			"subject": subject,
			"text":    "hello",
		})
	}
	code, ok := send("someone@example.com", "hi")
	if code != http.StatusAccepted {
		stop()
		t.Fatalf("send: %d %v", code, ok)
	}
	code, bounced := send("bounce@example.com", "hi")
	if code != http.StatusAccepted {
		stop()
		t.Fatalf("send: %d %v", code, bounced)
	}
	waitFor(t, key, base, ok["id"].(string), "delivered", 250, "")
	waitFor(t, key, base, bounced["id"].(string), "bounced", 550, "5.1.1")

	code, refused := send("someone@example.com", "hi\r\nBcc: x@example.com")
	if code != http.StatusBadRequest || !strings.Contains(refused["error"].(map[string]any)["message"].(string), "subject") {
		t.Errorf("CR/LF in subject: %d %v", code, refused)
	}
	_, list := call(t, key, http.MethodGet, base+"/v1/messages", nil)
	if n := len(list["messages"].([]any)); n != 2 {
		t.Errorf("%d messages stored, want 2 (the refused one must not be stored)", n)
	}
	stop()

	// Restart on the same data directory: no new key, the data is there.
	stdout, base, stop = startServe(t, args)
	defer stop()
	if keyRE.MatchString(stdout.String()) {
		t.Errorf("a second key was printed on restart:\n%s", stdout.String())
	}
	code, got := call(t, key, http.MethodGet, base+"/v1/messages/"+ok["id"].(string), nil)
	if code != http.StatusOK || got["status"] != "delivered" {
		t.Errorf("after restart: %d %v", code, got)
	}
}

// startServe runs serve in the background until it says where it listens,
// and returns a function that stops it and waits.
func startServe(t *testing.T, args []string) (*lockedBuffer, string, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stdout := &lockedBuffer{}
	stderr := &lockedBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, stdout, stderr) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("serve: %v\n%s", err, stderr.String())
				}
			case <-time.After(60 * time.Second):
				t.Errorf("serve did not stop within 60s")
			}
		})
	}
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if m := restAddrRE.FindStringSubmatch(stdout.String()); m != nil {
			return stdout, "http://" + m[1], stop
		}
		select {
		case err := <-done:
			cancel()
			t.Fatalf("serve exited early: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	stop()
	t.Fatalf("serve did not start:\n%s\n%s", stdout.String(), stderr.String())
	return nil, "", nil
}

func call(t *testing.T, key, method, url string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, url, rd)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(bufio.NewReader(resp.Body)).Decode(&out); err != nil && err != io.EOF {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return resp.StatusCode, out
}

func waitFor(t *testing.T, key, base, id, status string, code float64, enhanced string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, msg := call(t, key, http.MethodGet, base+"/v1/messages/"+id, nil)
		if msg["status"] == status {
			reply := msg["recipients"].([]any)[0].(map[string]any)["last_reply"].(map[string]any)
			if reply["code"] != code || (enhanced != "" && reply["enhanced_code"] != enhanced) {
				t.Errorf("%s: reply %v, want %v %s", id, reply, code, enhanced)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached %s: %v", id, status, msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
