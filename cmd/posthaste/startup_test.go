package main

import (
	"bytes"
	"context"
	"net"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/internal/testenv"
)

// Asking any command for help prints its usage and succeeds.
func TestHelpExitsZero(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"-h"}, {"--help"}, {"help"},
		{"serve", "-h"}, {"serve", "--help"},
		{"migrate", "-h"},
		{"keys", "-h"}, {"keys", "--help"},
		{"keys", "create", "-h"}, {"keys", "list", "--help"},
		{"projects", "-h"}, {"projects", "--help"}, {"projects", "create", "-h"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if err := run(context.Background(), args, &stdout, &stderr); err != nil {
				t.Fatalf("run: %v", err)
			}
			if out := stdout.String() + stderr.String(); !strings.Contains(out, "Usage") {
				t.Errorf("no usage printed:\n%s", out)
			}
		})
	}
	// serve's usage lists every flag with its environment variable.
	var stderr bytes.Buffer
	_ = run(context.Background(), []string{"serve", "-h"}, &bytes.Buffer{}, &stderr)
	for _, want := range []string{"--http-read-timeout (POSTHASTE_HTTP_READ_TIMEOUT)", "--database-wait (POSTHASTE_DATABASE_WAIT)"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("serve -h does not list %s", want)
		}
	}
	// A default of 0 that stands for a derived one is explained by the
	// flag's text, not shown as "(default 0s)".
	if strings.Contains(stderr.String(), "(default 0s)") {
		t.Errorf("serve -h shows a zero default:\n%s", stderr.String())
	}
}

// Every setting a configuration error can name is a flag serve has.
func TestConfigFlagsExist(t *testing.T) {
	t.Parallel()
	var stderr bytes.Buffer
	_ = run(context.Background(), []string{"serve", "-h"}, &bytes.Buffer{}, &stderr)
	for field, name := range configFlags {
		if !strings.Contains(stderr.String(), flagRef(name)+"\n") {
			t.Errorf("%s maps to --%s, which serve does not have", field, name)
		}
	}
}

// Configuration errors name the flag and the environment variable, never a
// Go field, and come before serve touches the database.
func TestServeConfigErrorsNameFlags(t *testing.T) {
	t.Parallel()
	// Nothing listens there; no case may get as far as connecting.
	base := []string{"serve", "--database-url", "postgres://postgres@127.0.0.1:1/none", "--database-wait", "0"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--bootstrap-api-key", "tooshort"}, "--bootstrap-api-key (POSTHASTE_BOOTSTRAP_API_KEY): must be at least 16 characters"},
		{[]string{"--max-recipients", "-1"}, "--max-recipients (POSTHASTE_MAX_RECIPIENTS): must be at least 1, got -1"},
		{[]string{"--max-message-bytes", "100"}, "--max-message-bytes (POSTHASTE_MAX_MESSAGE_BYTES): must be at least 4096, got 100"},
		{[]string{"--hostname", "single"}, `--hostname (POSTHASTE_HOSTNAME): "single" is not a fully qualified host name`},
		{[]string{"--smtp-port", "70000"}, "--smtp-port (POSTHASTE_SMTP_PORT): 70000 is out of range"},
		{[]string{"--concurrency", "-3"}, "--concurrency (POSTHASTE_CONCURRENCY): must be at least 1"},
		{[]string{"--retry-initial", "2h", "--retry-max", "1h"}, "--retry-max (POSTHASTE_RETRY_MAX): must not be less than --retry-initial"},
		{[]string{"--route", "a.test=host:bad"}, "--route (POSTHASTE_ROUTE): a.test: bad port"},
		{[]string{"--route", "nothing"}, "--route (POSTHASTE_ROUTE): want domain=host:port"},
		{[]string{"--tls-policy", "a.test=strict"}, `--tls-policy (POSTHASTE_TLS_POLICY): a.test: "strict" is not none, opportunistic, require or require-verified`},
		{[]string{"--tls-policy", "a.test"}, "--tls-policy (POSTHASTE_TLS_POLICY): want domain=policy"},
		{[]string{"--allow-destination", "10.0.0.0/33"}, "--allow-destination (POSTHASTE_ALLOW_DESTINATION): "},
		{[]string{"--ip-version", "5"}, `--ip-version (POSTHASTE_IP_VERSION): "5" is not prefer-4, prefer-6, 4 or 6`},
		{[]string{"--http-read-timeout", "2m", "--http-write-timeout", "1m"}, "--http-write-timeout (POSTHASTE_HTTP_WRITE_TIMEOUT): must be longer than"},
		{[]string{"--http-max-connections", "-1"}, "--http-max-connections (POSTHASTE_HTTP_MAX_CONNECTIONS): must be at least 1"},
		{[]string{"--database-wait", "-1s"}, "--database-wait (POSTHASTE_DATABASE_WAIT): must not be negative"},
		{[]string{"--log-level", "loud"}, "--log-level (POSTHASTE_LOG_LEVEL):"},
		{[]string{"--lease", "500ms"}, "--lease (POSTHASTE_LEASE): 500ms is shorter than 1s"},
		{[]string{"--retention-interval", "-1s"}, "--retention-interval (POSTHASTE_RETENTION_INTERVAL): must not be negative"},
		{[]string{"--max-ambiguous-retries", "-1"}, "--max-ambiguous-retries (POSTHASTE_MAX_AMBIGUOUS_RETRIES): must not be negative"},
		{[]string{"--bounce-domain", "bounces.example.test"}, "--bounce-secret (POSTHASTE_BOUNCE_SECRET): required with --bounce-domain"},
		{[]string{"--bounce-domain", "bounces.example.test", "--bounce-secret", "0123456789abcdef,short"}, "--bounce-secret (POSTHASTE_BOUNCE_SECRET): secret 1 is 5 bytes, at least 16 are required"},
		{[]string{"--bounce-domain", "not a domain", "--bounce-secret", "0123456789abcdef"}, "--bounce-domain (POSTHASTE_BOUNCE_DOMAIN): "},
		{[]string{"--bounce-secret", "0123456789abcdef"}, "--bounce-secret (POSTHASTE_BOUNCE_SECRET): set without a bounce domain (--bounce-domain)"},
		{[]string{"--bounce-domain", "bounces.example.test", "--bounce-secret", "0123456789abcdef", "--bounce-addr", "2525"}, "--bounce-addr (POSTHASTE_BOUNCE_ADDR): \"2525\" is not host:port"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), append(append([]string{}, base...), tc.args...), &stdout, &stderr)
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("error %v, want it to start with %q", err, tc.want)
			}
		})
	}
}

// A bad value in an environment variable names the variable, its flag, its
// file key and what it should hold.
func TestEnvironmentErrorsSayWhatIsExpected(t *testing.T) {
	t.Setenv("POSTHASTE_LEASE", "abc")
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"serve", "--database-wait", "0"}, &stdout, &stderr)
	want := `--lease (POSTHASTE_LEASE, file key "lease"): invalid duration "abc" in the environment`
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %v, want it to start with %q", err, want)
	}
}

// doubledPrefix finds "x: x:" in an error, a step's name said twice.
var doubledPrefix = regexp.MustCompile(`(?:^|: )([a-z][a-z ]*): ([a-z][a-z ]*): `)

func checkNoDoubledPrefix(t *testing.T, err error) {
	t.Helper()
	for _, m := range doubledPrefix.FindAllStringSubmatch(err.Error(), -1) {
		if m[1] == m[2] {
			t.Errorf("%q is said twice in: %v", m[1], err)
		}
	}
}

// A start that fails at migration says "migrate" once.
func TestMigrationFailureNamedOnce(t *testing.T) {
	t.Parallel()
	u := testenv.EmptyDatabase(t)
	conn, err := pgx.Connect(t.Context(), u)
	if err != nil {
		t.Fatal(err)
	}
	// The first migration creates this table; finding it makes it fail.
	_, err = conn.Exec(t.Context(), `CREATE TABLE messages (x int)`)
	conn.Close(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"serve", "--database-url", u, "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--log-level", "error"},
		{"migrate", "--database-url", u},
		{"keys", "list", "--database-url", u},
	} {
		var stdout, stderr bytes.Buffer
		err := run(context.Background(), args, &stdout, &stderr)
		if err == nil {
			t.Fatalf("%s: started on a database whose migration fails", args[0])
		}
		if !strings.HasPrefix(err.Error(), "migrate: ") || strings.Count(err.Error(), "migrate:") != 1 {
			t.Errorf("%s: %v, want one leading \"migrate: \"", args[0], err)
		}
		checkNoDoubledPrefix(t, err)
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

func urlAt(t *testing.T, u, addr string) string {
	t.Helper()
	parsed, err := url.Parse(u)
	if err != nil || (parsed.Scheme != "postgres" && parsed.Scheme != "postgresql") {
		t.Skipf("database URL is not a postgres:// URL: %v", err)
	}
	parsed.Host = addr
	return parsed.String()
}

// serve started before its database logs that it waits, and comes up once
// the database is there.
func TestServeWaitsForDatabase(t *testing.T) {
	t.Parallel()
	_, proxied, proxy := testenv.ProxiedDatabase(t)
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stdout, stderr := &lockedBuffer{}, &lockedBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--database-url", urlAt(t, proxied, addr),
			"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"}, stdout, stderr)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	waitForOutput(t, stderr, "waiting for database", done)
	testenv.NewProxyOn(t, addr, "tcp", proxy.Addr())
	waitForOutput(t, stdout, "Posthaste is running", done)
}

// waitForOutput polls w until it contains want, failing if serve exits
// first or nothing comes within a generous deadline.
func waitForOutput(t *testing.T, w *lockedBuffer, want string, done chan error) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(w.String(), want) {
		select {
		case err := <-done:
			done <- err // for the deferred check
			t.Fatalf("serve exited before printing %q: %v", want, err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve never printed %q:\n%s", want, w.String())
		}
	}
}

func TestServeGivesUpWaitingForDatabase(t *testing.T) {
	t.Parallel()
	u := urlAt(t, "postgres://postgres@127.0.0.1/posthaste", freeAddr(t))
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"serve", "--database-url", u, "--database-wait", "1s",
		"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"}, &stdout, &stderr)
	if err == nil || !strings.HasPrefix(err.Error(), "database not reachable after waiting 1s: ") {
		t.Fatalf("serve: %v, want a clear error after the wait", err)
	}
	checkNoDoubledPrefix(t, err)
	if !strings.Contains(stderr.String(), "waiting for database") {
		t.Errorf("the wait was not logged:\n%s", stderr.String())
	}
}
