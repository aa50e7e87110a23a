package deploy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/posthaste/posthaste/internal/testenv"
)

// TestBinary builds the binary with the image's build command and checks
// the deployment files against it: its version stamp, its settings, its
// ports, and a running sandbox server for the probes and the documents'
// examples.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	if !regexp.MustCompile(`(?m)^RUN .*sh deploy/build\.sh /out/posthaste$`).MatchString(readFile(t, "Dockerfile")) {
		t.Fatal("Dockerfile: the build stage does not run deploy/build.sh, which this test checks")
	}
	bin := filepath.Join(t.TempDir(), "posthaste")
	build := exec.Command("sh", "build.sh", bin)
	build.Env = append(os.Environ(), "VERSION=1.2.3-test")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build.sh: %v\n%s", err, out)
	}

	t.Run("version", func(t *testing.T) {
		out, err := exec.Command(bin, "version").Output()
		// The first line is the stamped version; the Go version and the
		// commit follow.
		first, _, _ := strings.Cut(string(out), "\n")
		if err != nil || first != "posthaste 1.2.3-test" {
			t.Errorf("posthaste version: %q, %v; want the version given to build.sh", out, err)
		}
	})

	flags := serveFlags(t, bin)

	t.Run("settings", func(t *testing.T) {
		// Every POSTHASTE_ variable a deployment file mentions, in
		// manifests, env files and comments alike, must be a serve setting.
		env := regexp.MustCompile(`\bPOSTHASTE_[A-Z0-9_]+`)
		for _, path := range deployFiles(t) {
			for _, name := range env.FindAllString(readFile(t, path), -1) {
				if _, ok := flags[name]; !ok {
					t.Errorf("%s: %s is not a setting of posthaste serve", path, name)
				}
			}
		}
	})

	t.Run("ports", func(t *testing.T) {
		port := func(name string) int {
			m := regexp.MustCompile(`:(\d+)\b`).FindStringSubmatch(flags[name])
			if m == nil {
				t.Fatalf("%s: no default port in %q", name, flags[name])
			}
			p, _ := strconv.Atoi(m[1])
			return p
		}
		want := map[string]int{
			"http":   port("POSTHASTE_HTTP_ADDR"),
			"grpc":   port("POSTHASTE_GRPC_ADDR"),
			"bounce": port("POSTHASTE_BOUNCE_ADDR"),
		}
		c := dig(kubeObject(t, "Deployment", "posthaste"), "spec", "template", "spec", "containers", 0)
		for _, p := range dig(c, "ports").([]any) {
			name := dig(p, "name").(string)
			if got := dig(p, "containerPort"); got != want[name] {
				t.Errorf("container port %s = %v, want %d", name, got, want[name])
			}
		}
		for _, probe := range []string{"startupProbe", "livenessProbe", "readinessProbe"} {
			p := dig(c, probe, "grpc", "port")
			if p == nil {
				p = dig(c, probe, "httpGet", "port")
			}
			if p != want["grpc"] && p != "http" && p != "grpc" {
				t.Errorf("%s: port %v is not a port serve listens on", probe, p)
			}
		}
		expose := regexp.MustCompile(`(?m)^EXPOSE (.*)$`).FindStringSubmatch(readFile(t, "Dockerfile"))
		if expose == nil || expose[1] != fmt.Sprintf("%d %d %d", want["http"], want["grpc"], want["bounce"]) {
			t.Errorf("Dockerfile EXPOSE %v, want %d %d %d", expose, want["http"], want["grpc"], want["bounce"])
		}
		// Compose publishes the container's REST and gRPC ports.
		compose := yamlDocs(t, "docker-compose.yml")[0]
		for _, svc := range []string{"posthaste", "posthaste-sandbox"} {
			for _, p := range dig(compose, "services", svc, "ports").([]any) {
				s := p.(string)
				if !strings.HasPrefix(s, "${PUBLISH_ADDRESS:-127.0.0.1}:") {
					t.Errorf("compose %s: port %s is not bound to 127.0.0.1 by default", svc, s)
				}
				target, _ := strconv.Atoi(s[strings.LastIndex(s, ":")+1:])
				if target != want["http"] && target != want["grpc"] {
					t.Errorf("compose %s: port %s is not one serve listens on", svc, s)
				}
			}
		}
	})

	t.Run("sandbox", func(t *testing.T) {
		s := startSandbox(t, bin)
		t.Run("probes", func(t *testing.T) { checkProbes(t, s) })
		t.Run("docs", func(t *testing.T) { runDocExamples(t, s, bin) })
	})
}

// serveFlags maps each environment variable of posthaste serve to the
// flag's usage text, as serve -h prints it.
func serveFlags(t *testing.T, bin string) map[string]string {
	t.Helper()
	cmd := exec.Command(bin, "serve", "-h")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("serve -h: %v\n%s", err, out)
	}
	flags := map[string]string{}
	head := regexp.MustCompile(`^  --[a-z0-9-]+ \((POSTHASTE_[A-Z0-9_]+)\)$`)
	var cur string
	for _, line := range strings.Split(string(out), "\n") {
		if m := head.FindStringSubmatch(line); m != nil {
			cur = m[1]
			flags[cur] = ""
		} else if cur != "" {
			flags[cur] += strings.TrimSpace(line)
		}
	}
	if len(flags) < 20 {
		t.Fatalf("serve -h listed %d settings:\n%s", len(flags), out)
	}
	return flags
}

type sandbox struct {
	http, grpc string
	key        string
	db         string // the database's URL, for the commands that use it directly
}

// startSandbox runs posthaste serve --sandbox on free loopback ports
// against a fresh database, stopped with SIGTERM at the end of the test.
func startSandbox(t *testing.T, bin string) sandbox {
	t.Helper()
	s := sandbox{key: "ph_deploytest_0123456789abcdef", db: testenv.Database(t)}
	cmd := exec.Command(bin, "serve", "--sandbox",
		"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0",
		"--database-url", s.db, "--data-dir", t.TempDir(),
		"--bootstrap-api-key", s.key,
		"--retry-initial", "1s", "--poll-interval", "200ms",
		// The documents' webhook examples use an endpoint of the test's.
		"--webhook-allow-private", "--webhook-poll-interval", "200ms")
	// Settings from this machine's environment must not leak in.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "POSTHASTE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var logs strings.Builder
	cmd.Stderr = &logs
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve exited with %v after SIGTERM:\n%s", err, logs.String())
			}
		case <-time.After(60 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("serve did not stop within 60s of SIGTERM")
		}
	})
	running := regexp.MustCompile(`REST on (\S+), gRPC on ([^,\s]+)`)
	found := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if m := running.FindStringSubmatch(sc.Text()); m != nil {
				found <- m
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		done <- cmd.Wait()
	}()
	select {
	case m := <-found:
		s.http, s.grpc = m[1], strings.TrimSuffix(m[2], ".")
	case <-time.After(2 * time.Minute):
		t.Fatalf("serve did not start within 2 minutes:\n%s", logs.String())
	}
	return s
}

// checkProbes asks the running server what the Deployment's probes ask.
func checkProbes(t *testing.T, s sandbox) {
	c := dig(kubeObject(t, "Deployment", "posthaste"), "spec", "template", "spec", "containers", 0)
	for _, probe := range []string{"startupProbe", "livenessProbe", "readinessProbe"} {
		if path, ok := dig(c, probe, "httpGet", "path").(string); ok {
			resp, err := http.Get("http://" + s.http + path)
			if err != nil {
				t.Fatalf("%s: %v", probe, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s: GET %s answered %d, want 200", probe, path, resp.StatusCode)
			}
			continue
		}
		if dig(c, probe, "grpc") == nil {
			t.Errorf("%s: neither httpGet nor grpc", probe)
			continue
		}
		service, _ := dig(c, probe, "grpc", "service").(string)
		conn, err := grpc.NewClient(s.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		cancel()
		conn.Close()
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("%s: gRPC health of %q: %v, %v; want SERVING", probe, service, resp.GetStatus(), err)
		}
	}
}
