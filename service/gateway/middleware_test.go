package gateway_test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/posthaste/posthaste/service"
	"github.com/posthaste/posthaste/service/gateway"
)

// openBody sends a request's head and the first bytes of a body announced
// as much longer over a raw connection, and keeps the rest back: the
// caller decides whether it ever arrives.
func openBody(t *testing.T, base, head string) net.Conn {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, head+"Content-Length: 100000\r\n\r\n{\"subject\":"); err != nil {
		t.Fatal(err)
	}
	return conn
}

// readResponse reads one response from conn, failing the test if none
// comes within a generous deadline, and says whether the server announced
// it closes the connection.
func readResponse(t *testing.T, conn net.Conn) (response, bool) {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no response while the body was held back: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{code: resp.StatusCode, header: resp.Header, body: b}, resp.Close
}

// expectClosed fails the test unless the server closes conn soon, although
// the body it announced never arrives (the test server has no read
// timeout, so only the refusal itself can end the connection).
func expectClosed(t *testing.T, conn net.Conn) {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(io.Discard, conn); err != nil {
		t.Errorf("connection still open after the refusal (%v)", err)
	} else if n != 0 {
		t.Errorf("%d bytes after the refusal", n)
	}
}

// A request without a valid key is refused while its body is still
// arriving: the server answers before the client sent it, and closes the
// connection instead of waiting for the rest.
func TestUnauthenticatedRefusedBeforeBody(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	wrongKey, _, _, _ := service.NewAPIKey()
	for name, auth := range map[string]string{
		"no key":    "",
		"wrong key": "Authorization: Bearer " + wrongKey + "\r\n",
		"two keys":  "Authorization: Bearer " + e.key + "\r\nAuthorization: Bearer " + e.key + "\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			conn := openBody(t, e.url, "POST /v1/messages HTTP/1.1\r\nHost: posthaste.test\r\nContent-Type: application/json\r\n"+auth)
			r, closing := readResponse(t, conn)
			if r.code != http.StatusUnauthorized {
				t.Fatalf("HTTP %d %s, want 401", r.code, r.body)
			}
			if decodeError(t, r).Error.Status != "UNAUTHENTICATED" {
				t.Errorf("body %s", r.body)
			}
			if !closing {
				t.Error("no Connection: close; the rest of the body is never read")
			}
			expectClosed(t, conn)
		})
	}
	// Public routes need no key.
	if r := e.do(t, http.MethodGet, "/openapi.json", nil, "Authorization", ""); r.code != http.StatusOK {
		t.Errorf("openapi.json without a key: HTTP %d", r.code)
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("stored %d messages", m)
	}
}

// A body declared as something other than JSON is refused before it
// arrives, and its connection closed, like one without a key.
func TestUnsupportedContentTypeRefusedBeforeBody(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	conn := openBody(t, e.url, "POST /v1/messages HTTP/1.1\r\nHost: posthaste.test\r\nContent-Type: text/plain\r\nAuthorization: Bearer "+e.key+"\r\n")
	r, closing := readResponse(t, conn)
	if r.code != http.StatusUnsupportedMediaType || !closing {
		t.Fatalf("HTTP %d (closing %v) %s, want 415 and Connection: close", r.code, closing, r.body)
	}
	expectClosed(t, conn)
}

func TestUnsupportedContentType(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	body := toJSON(t, validRequest())
	for _, tc := range []struct {
		contentType string
		code        int
	}{
		{"text/plain", http.StatusUnsupportedMediaType},
		{"application/x-www-form-urlencoded", http.StatusUnsupportedMediaType},
		{"application/json; charset=iso-8859-1", http.StatusUnsupportedMediaType},
		{"application/json;;", http.StatusUnsupportedMediaType},
		{"application/json", http.StatusAccepted},
		{"application/json; charset=utf-8", http.StatusAccepted},
		{"Application/JSON; charset=UTF-8", http.StatusAccepted},
		{"", http.StatusAccepted},
	} {
		r := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(body), "Content-Type", tc.contentType)
		if r.code != tc.code {
			t.Errorf("%q: HTTP %d %s, want %d", tc.contentType, r.code, r.body, tc.code)
			continue
		}
		if tc.code == http.StatusUnsupportedMediaType && !strings.Contains(decodeError(t, r).Error.Message, "Content-Type") {
			t.Errorf("%q: %s does not name the header", tc.contentType, r.body)
		}
	}
	// A request without a body is not refused for its Content-Type.
	if r := e.do(t, http.MethodGet, "/v1/messages", nil, "Content-Type", "text/plain"); r.code != http.StatusOK {
		t.Errorf("GET with text/plain: HTTP %d %s", r.code, r.body)
	}
	if m, _ := e.counts(t); m != 4 {
		t.Errorf("stored %d messages, want the 4 accepted ones", m)
	}
}

// syncBuffer is a log destination the test reads while the server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A panic in code that runs only for REST (here the injected key check, a
// middleware) is a 500 in the usual shape, logged with its stack, and the
// server goes on serving.
func TestPanicInRESTHandlerIsRecovered(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	check := func(_ context.Context, authorization string) error {
		if authorization == "Bearer boom" {
			panic("key check exploded")
		}
		return nil
	}
	// No gRPC server behind it: nothing in this test reaches one.
	h, closeGateway, err := gateway.New(t.Context(), "127.0.0.1:1", logger, gateway.WithAuthCheck(check))
	if err != nil {
		t.Fatal(err)
	}
	defer closeGateway()
	hs := httptest.NewServer(h)
	defer hs.Close()

	for i := range 2 {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, hs.URL+"/v1/messages", nil)
		req.Header.Set("Authorization", "Bearer boom")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		r := response{code: resp.StatusCode, header: resp.Header, body: b}
		if r.code != http.StatusInternalServerError || decodeError(t, r).Error.Status != "INTERNAL" {
			t.Errorf("request %d: HTTP %d %s, want 500 INTERNAL", i, r.code, r.body)
		}
		if strings.Contains(string(b), "exploded") {
			t.Errorf("the panic value reached the caller: %s", b)
		}
	}
	resp, err := http.Get(hs.URL + "/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("after the panics, /openapi.json: HTTP %d", resp.StatusCode)
	}
	out := logs.String()
	if !strings.Contains(out, "panic in http handler") || !strings.Contains(out, "key check exploded") || !strings.Contains(out, "goroutine") {
		t.Errorf("panic not logged with its stack:\n%s", out)
	}
}
