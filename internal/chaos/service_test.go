//go:build chaos && linux

package chaos

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// apiKey is the bootstrap key every service of the suite starts with.
const apiKey = "ph_chaos_key_0123456789abcdef"

// lease is the service's --lease: short, so that a killed instance's
// recipients come back within seconds.
const lease = 3 * time.Second

// buildPosthaste builds cmd/posthaste into the test's directory. The go
// command's cache makes every build after the first a link only.
func buildPosthaste(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "posthaste")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/posthaste/posthaste/cmd/posthaste").CombinedOutput()
	if err != nil {
		t.Fatalf("build posthaste: %v\n%s", err, out)
	}
	return bin
}

// instance runs `posthaste serve` as a child process, again and again on
// the same addresses, each run's log appended to one file.
type instance struct {
	bin      string
	args     []string
	httpAddr string
	grpcAddr string
	logPath  string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when the current run's process has been reaped
	starts int
}

// serviceConfig is what differs between the suite's services.
type serviceConfig struct {
	databaseURL  string
	sinkAddr     string
	pollInterval time.Duration
	extra        []string
}

func newService(t *testing.T, bin string, cfg serviceConfig) *instance {
	t.Helper()
	if cfg.pollInterval == 0 {
		cfg.pollInterval = time.Second
	}
	s := &instance{
		bin:      bin,
		httpAddr: freeAddr(t),
		grpcAddr: freeAddr(t),
		logPath:  filepath.Join(t.TempDir(), "posthaste.log"),
	}
	s.args = append([]string{"serve",
		"--database-url", cfg.databaseURL,
		"--http-addr", s.httpAddr,
		"--grpc-addr", s.grpcAddr,
		"--bootstrap-api-key", apiKey,
		"--route", "*=" + cfg.sinkAddr,
		"--hostname", "posthaste.test",
		// The senders use a From domain nobody verified.
		"--allow-unverified-domains",
		"--lease", lease.String(),
		"--poll-interval", cfg.pollInterval.String(),
		// Deferrals (a session cut by a database outage) come back soon.
		"--retry-initial", "500ms",
		"--retry-max", "2s",
		"--database-wait", "30s",
		"--shutdown-timeout", "5s",
	}, cfg.extra...)
	t.Cleanup(func() {
		if err := s.kill(); err != nil {
			t.Errorf("stop posthaste: %v", err)
		}
		if t.Failed() {
			t.Logf("posthaste log (last lines):\n%s", tail(s.logPath, 300))
		}
		if dir := os.Getenv(keepLogsEnv); dir != "" {
			if err := keepLog(s.logPath, dir, t.Name()); err != nil {
				t.Errorf("keep posthaste log: %v", err)
			}
		}
	})
	return s
}

// freeAddr returns a loopback address that was free a moment ago. The
// service is restarted on it, so it is chosen once.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// start launches the service and waits until /healthz answers 200.
func (s *instance) start(ctx context.Context) error {
	logFile, err := os.OpenFile(s.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open service log: %w", err)
	}
	cmd := exec.Command(s.bin, s.args...)
	cmd.Env = append(os.Environ(), "POSTHASTE_LOG_LEVEL=info")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Should the test process die without its cleanups, the kernel kills
	// the service too (the signal follows the forking thread, which the
	// Go runtime keeps while the process lives).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logFile.Close()
		return fmt.Errorf("start posthaste: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = logFile.Close()
		close(exited)
	}()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.starts++
	s.mu.Unlock()

	client := &http.Client{Timeout: time.Second}
	defer client.CloseIdleConnections()
	err = poll(ctx, 50*time.Millisecond, func() (bool, error) {
		select {
		case <-exited:
			return false, fmt.Errorf("posthaste exited during start: %s", cmd.ProcessState)
		default:
		}
		return s.healthy(ctx, client), nil
	})
	if err != nil {
		_ = s.kill()
		return fmt.Errorf("wait for posthaste to answer /healthz: %w", err)
	}
	return nil
}

// healthy reports whether /healthz answers 200 (the database is reachable).
func (s *instance) healthy(ctx context.Context, client *http.Client) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.httpAddr+"/healthz", nil)
	if err != nil {
		return false
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// running reports whether the current run's process is alive.
func (s *instance) running() bool {
	s.mu.Lock()
	exited := s.exited
	s.mu.Unlock()
	if exited == nil {
		return false
	}
	select {
	case <-exited:
		return false
	default:
		return true
	}
}

// pid is the current run's process id, 0 when none was started.
func (s *instance) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// kill sends SIGKILL to the current run, if it is alive, and waits until it
// has been reaped, so that its ports and SMTP connections are closed.
func (s *instance) kill() error {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill posthaste %d: %w", cmd.Process.Pid, err)
	}
	select {
	case <-exited:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("posthaste %d still running 30s after SIGKILL", cmd.Process.Pid)
	}
}

// keepLogsEnv names a directory to copy each service's whole log into,
// for reading after the run.
const keepLogsEnv = "POSTHASTE_CHAOS_LOG_DIR"

func keepLog(path, dir, name string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	dst := filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(name)+".log")
	return os.WriteFile(dst, b, 0o644)
}

// tail returns the last n lines of a file, for failure messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	var sb strings.Builder
	for _, l := range lines {
		sb.Write(l)
		sb.WriteByte('\n')
	}
	return sb.String()
}

// leaseLostRE matches the warnings of outcomes fenced off because the
// lease was lost, which announce that the recipient will be sent again.
var leaseLostRE = regexp.MustCompile(`msg="delivery: outcomes (?:dropped|skipped), lease lost".* message_id=(\S+)`)

// leaseLostMessages returns the message ids of the service log's lease
// lost warnings.
func (s *instance) leaseLostMessages() []string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return nil
	}
	var ids []string
	for _, m := range leaseLostRE.FindAllSubmatch(b, -1) {
		ids = append(ids, string(m[1]))
	}
	return ids
}

// logCount counts the lines of the service's log that contain substr.
func (s *instance) logCount(substr string) int {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return 0
	}
	return bytes.Count(b, []byte(substr))
}
