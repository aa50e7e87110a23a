package app_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/service"
)

// logBuffer is a log destination the test reads while the app writes.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// baseConfig is a process on loopback ports with a database of its own and
// the test key; nothing in these tests is delivered.
func baseConfig(t *testing.T) app.Config {
	return app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Logger:          slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		// Tests send from domains nobody verified.
		Service: service.Config{AllowUnverifiedDomains: true},
	}
}

// start starts an app from cfg and stops it when the test ends.
func start(t *testing.T, cfg app.Config) *app.App {
	t.Helper()
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
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
	return a
}

// countMessages looks at the database directly.
func countMessages(t *testing.T, databaseURL string) int {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(t.Context(), `SELECT count(*) FROM messages`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

const sendBody = `{"from":{"address":"a@posthaste.test"},"to":[{"address":"b@example.test"}],"subject":"slow","text":"hi"}`

// readResponse waits a generous time for one response on conn. It returns
// nil when the server closed the connection without one.
func readResponse(t *testing.T, conn net.Conn) *http.Response {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatal("the server neither answered nor closed the connection")
	case err != nil:
		return nil
	}
	_, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp
}

// A client with a valid key that sends its body a byte at a time is cut
// off when the read timeout passes, gets no 2xx, and nothing is stored.
func TestSlowBodyIsCutOffAtReadTimeout(t *testing.T) {
	t.Parallel()
	cfg := baseConfig(t)
	cfg.HTTPReadTimeout = time.Second
	a := start(t, cfg)

	conn, err := net.Dial("tcp", a.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST /v1/messages HTTP/1.1\r\nHost: posthaste.test\r\nAuthorization: Bearer %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n", testKey, len(sendBody))
	// The whole body would take several seconds at this pace, well past
	// the one second allowed.
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < len(sendBody); i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if _, err := conn.Write([]byte{sendBody[i]}); err != nil {
				return
			}
		}
	}()
	resp := readResponse(t, conn)
	close(stop)
	<-trickled
	if resp != nil && resp.StatusCode < 300 {
		t.Errorf("slow body answered %s", resp.Status)
	}
	if resp != nil && resp.StatusCode != http.StatusRequestTimeout {
		t.Errorf("slow body answered %s, want 408", resp.Status)
	}
	if n := countMessages(t, a.DatabaseURL()); n != 0 {
		t.Errorf("%d messages stored", n)
	}
}

// Through the whole process, the key is checked against the database
// before the body is read: a revoked or unknown key is refused while the
// body is still held back.
func TestWrongKeyRefusedBeforeBody(t *testing.T) {
	t.Parallel()
	a := start(t, baseConfig(t))
	for name, header := range map[string]string{
		"no key":      "",
		"unknown key": "Authorization: Bearer ph_not_a_stored_key_0123456789\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := net.Dial("tcp", a.HTTPAddr())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			fmt.Fprintf(conn, "POST /v1/messages HTTP/1.1\r\nHost: posthaste.test\r\n%sContent-Length: 100000\r\n\r\n{", header)
			resp := readResponse(t, conn)
			if resp == nil || resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("got %v, want 401 before the body was sent", resp)
			}
		})
	}
	// The right key still works.
	req, _ := http.NewRequest(http.MethodPost, "http://"+a.HTTPAddr()+"/v1/messages", strings.NewReader(sendBody))
	req.Header.Set("Authorization", "Bearer "+testKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Errorf("valid key: %s", resp.Status)
	}
}

// healthzOn sends GET /healthz on an open connection and reads the answer.
func healthzOn(t *testing.T, conn net.Conn, r *bufio.Reader, wait time.Duration) (*http.Response, error) {
	t.Helper()
	if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: posthaste.test\r\n\r\n"); err != nil {
		return nil, err
	}
	if err := conn.SetReadDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return nil, err
	}
	_, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, nil
}

// With N connections open, connection N+1 is not served until one of them
// closes.
func TestHTTPConnectionCap(t *testing.T) {
	t.Parallel()
	cfg := baseConfig(t)
	cfg.HTTPMaxConnections = 2
	a := start(t, cfg)

	var held []net.Conn
	for range 2 {
		conn, err := net.Dial("tcp", a.HTTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// A served request proves the connection was accepted; keep-alive
		// keeps it open.
		if resp, err := healthzOn(t, conn, bufio.NewReader(conn), 30*time.Second); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("connection %d: %v %v", len(held)+1, resp, err)
		}
		held = append(held, conn)
	}

	extra, err := net.Dial("tcp", a.HTTPAddr()) // the kernel's backlog takes it
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	r := bufio.NewReader(extra)
	_, err = healthzOn(t, extra, r, 500*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("third connection served while two were open: %v", err)
	}

	held[0].Close()
	// The request sent above is still waiting; read its answer.
	if err := extra.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("third connection not served after one closed: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("third connection: %s", resp.Status)
	}
}

// With every gRPC connection slot taken, further gRPC clients wait, but REST
// still works: the gateway reaches the gRPC server outside the cap.
func TestGRPCConnectionCap(t *testing.T) {
	t.Parallel()
	cfg := baseConfig(t)
	cfg.GRPCMaxConnections = 1
	a := start(t, cfg)

	dial := func() (*grpc.ClientConn, healthpb.HealthClient) {
		conn, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		return conn, healthpb.NewHealthClient(conn)
	}
	first, firstHealth := dial()
	defer first.Close()
	if _, err := firstHealth.Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}

	second, secondHealth := dial()
	defer second.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	_, err := secondHealth.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	cancel()
	if err == nil {
		t.Fatal("second gRPC connection served while the first held the only slot")
	}

	req, _ := http.NewRequest(http.MethodPost, "http://"+a.HTTPAddr()+"/v1/messages", strings.NewReader(sendBody))
	req.Header.Set("Authorization", "Bearer "+testKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Errorf("REST with the gRPC slots taken: %s", resp.Status)
	}

	first.Close()
	ctx, cancel = context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if _, err := secondHealth.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Errorf("second gRPC connection not served after the first closed: %v", err)
	}
}

// freeAddr returns a loopback address where nothing listens.
func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

// atAddr returns the database URL u pointed at addr.
func atAddr(t *testing.T, u, addr string) string {
	t.Helper()
	parsed, err := url.Parse(u)
	if err != nil || (parsed.Scheme != "postgres" && parsed.Scheme != "postgresql") {
		t.Skipf("database URL is not a postgres:// URL: %v", err)
	}
	parsed.Host = addr
	return parsed.String()
}

// The database comes up after the process: Start waits, says so, and
// returns once the database answers.
func TestStartWaitsForDatabase(t *testing.T) {
	t.Parallel()
	_, proxied, proxy := testenv.ProxiedDatabase(t)
	addr := freeAddr(t)
	var logs logBuffer
	cfg := baseConfig(t)
	cfg.DatabaseURL = atAddr(t, proxied, addr)
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 1)
	go func() { started <- a.Start(t.Context()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = a.Stop(ctx)
	})

	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(logs.String(), "waiting for database") {
		select {
		case err := <-started:
			t.Fatalf("Start returned before the database was up: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no waiting message logged:\n%s", logs.String())
		}
	}
	// The database appears where the process looks for it.
	testenv.NewProxyOn(t, addr, "tcp", proxy.Addr())
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("Start: %v\n%s", err, logs.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("Start did not return after the database came up:\n%s", logs.String())
	}
	resp, err := http.Get("http://" + a.HTTPAddr() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("healthz: %s", resp.Status)
	}
}

func TestStartGivesUpOnDatabase(t *testing.T) {
	t.Parallel()
	cfg := baseConfig(t)
	direct := cfg.DatabaseURL
	cfg.DatabaseURL = atAddr(t, direct, freeAddr(t))
	cfg.DatabaseWait = time.Second
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	err = a.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "database not reachable after waiting 1s") {
		t.Errorf("Start: %v, want a clear error after the wait", err)
	}
	if ctx.Err() != nil {
		t.Error("Start outlived its context instead of giving up after the wait")
	}

	// A database that refuses us (no such database) is not waited for.
	missing, _ := url.Parse(direct)
	missing.Path = "/posthaste_no_such_database"
	cfg.DatabaseURL = missing.String()
	cfg.DatabaseWait = time.Hour
	a, err = app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("Start against a missing database: %v", err)
	}
}

// Every bad setting is a FieldError naming the setting's path in Config,
// whichever component checks it, and is found before anything starts.
func TestConfigErrorsNameTheField(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		field  string
		change func(*app.Config)
	}{
		{"BootstrapAPIKey", func(c *app.Config) { c.BootstrapAPIKey = "short" }},
		{"HTTPWriteTimeout", func(c *app.Config) { c.HTTPReadTimeout, c.HTTPWriteTimeout = time.Minute, time.Second }},
		{"HTTPMaxConnections", func(c *app.Config) { c.HTTPMaxConnections = -1 }},
		{"GRPCKeepaliveMinTime", func(c *app.Config) { c.GRPCKeepaliveMinTime = -time.Second }},
		{"Service.MaxRecipients", func(c *app.Config) { c.Service.MaxRecipients = -1 }},
		{"Service.Hostname", func(c *app.Config) { c.Service.Hostname = "single" }},
		{"Delivery.Concurrency", func(c *app.Config) { c.Delivery.Concurrency = -1 }},
		{"Delivery.SMTP.Port", func(c *app.Config) { c.Delivery.SMTP.Port = 70000 }},
		{"Delivery.Retry.MaxInterval", func(c *app.Config) {
			c.Delivery.Retry.InitialInterval = time.Hour
			c.Delivery.Retry.MaxInterval = time.Minute
		}},
		{"Delivery.Routes", func(c *app.Config) { c.Delivery.Routes = map[string]string{"a.test": "host:notaport"} }},
	} {
		t.Run(tc.field, func(t *testing.T) {
			// No database: validation must not need one.
			cfg := app.Config{DatabaseURL: "postgres://127.0.0.1:1/none"}
			tc.change(&cfg)
			_, err := app.New(cfg)
			var fe *app.FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("New: %v, want a *app.FieldError", err)
			}
			if fe.Field != tc.field || fe.Problem == "" || strings.HasPrefix(fe.Problem, ":") {
				t.Errorf("FieldError{%q, %q}, want field %s", fe.Field, fe.Problem, tc.field)
			}
		})
	}
}

// Changing the read timeout alone stays valid: the write and header
// timeouts follow it unless set.
func TestReadTimeoutAloneIsValid(t *testing.T) {
	t.Parallel()
	for _, d := range []time.Duration{time.Second, 5 * time.Minute} {
		if _, err := app.New(app.Config{DatabaseURL: "postgres://127.0.0.1:1/none", HTTPReadTimeout: d}); err != nil {
			t.Errorf("HTTPReadTimeout %s: %v", d, err)
		}
	}
}
