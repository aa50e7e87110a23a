package pgserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is a running postgres postmaster.
type process struct {
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has exited and its output is read
	waitErr error         // the result of Wait; read only after done is closed

	// mu orders a stop request against the exit, so that exactly one of
	// them sees the other: an exit before the request is a crash.
	mu            sync.Mutex
	exited        bool
	stopRequested bool
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// startPostgres launches the postmaster in the foreground (no pg_ctl), so it
// is our child: its exit is observed directly and, on Linux, the kernel stops
// it if this process dies without calling Stop. onExit is called when it
// exits without being asked to.
func startPostgres(bin string, l layout, port int, settings map[string]string, own *owner, out *logWriter, onExit func(error)) (*process, error) {
	args := []string{
		"-D", l.pgdata(),
		"-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1",
		// No Unix socket: nothing lands in /var/run, and long data
		// directory paths cannot exceed the socket path limit.
		"-c", "unix_socket_directories=",
		"-c", "logging_collector=off",
		"-c", "log_line_prefix=%m [%p] ",
	}
	// Sorted, so that the command line is the same from start to start.
	for _, name := range slices.Sorted(maps.Keys(settings)) {
		args = append(args, "-c", name+"="+settings[name])
	}
	cmd := exec.Command(filepath.Join(bin, "postgres"), args...)
	cmd.Dir = l.root
	cmd.Env = childEnv()
	// SIGINT is a fast shutdown: what Stop would have done.
	cmd.SysProcAttr = sysProcAttr(own, syscall.SIGINT)
	cmd.Stdout = out
	cmd.Stderr = out
	// Backends inherit the output pipe; if the postmaster is killed they
	// hold it open until they notice, which must not block Wait for long.
	cmd.WaitDelay = 10 * time.Second

	p := &process{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal follows the thread that forked the child,
		// so that thread stays reserved until the child exits.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.waitErr = cmd.Wait()
		p.mu.Lock()
		p.exited = true
		expected := p.stopRequested
		p.mu.Unlock()
		if !expected {
			onExit(p.waitErr)
		}
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	return p, nil
}

// stop asks for a fast shutdown and waits for the exit. When ctx ends first
// it escalates to an immediate shutdown and then to SIGKILL, and still waits,
// so nothing is left running when it returns. A process that had already
// exited on its own is reported as an error.
func (p *process) stop(ctx context.Context) error {
	p.mu.Lock()
	exited := p.exited
	p.stopRequested = true
	p.mu.Unlock()
	if exited {
		<-p.done
		return fmt.Errorf("postgres had already exited: %w", exitError(p.waitErr))
	}
	if err := interrupt(p.cmd.Process); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal postgres: %w", err)
	}
	select {
	case <-p.done:
		if p.waitErr != nil {
			return fmt.Errorf("postgres shut down with %w", p.waitErr)
		}
		return nil
	case <-ctx.Done():
	}
	_ = quit(p.cmd.Process)
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return fmt.Errorf("fast shutdown did not finish: %w", ctx.Err())
}

func exitError(err error) error {
	if err == nil {
		return errors.New("exit status 0")
	}
	return err
}

// runLocked runs cmd from a goroutine locked to its OS thread, for the same
// parent-death reason as startPostgres.
func runLocked(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		errc <- cmd.Run()
	}()
	return <-errc
}

// logWriter receives the server's output: each line goes to the log file of
// the current run and to the logger, and the last lines are kept for error
// messages.
type logWriter struct {
	log  *slog.Logger
	file *os.File

	mu      sync.Mutex
	partial []byte
	lines   []string // ring of the last tailLines lines
	next    int
	level   slog.Level // of the previous line, for DETAIL and HINT lines
}

const (
	tailLines = 40
	maxLine   = 64 << 10
)

func newLogWriter(path string, own *owner, log *slog.Logger) (*logWriter, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open postgres log: %w", err)
	}
	if err := chown(path, own); err != nil {
		_ = f.Close()
		return nil, err
	}
	return &logWriter{log: log, file: f}, nil
}

func (w *logWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	// A failing log file must not stop the server (a write error would
	// break the pipe postgres writes to), so file errors are dropped.
	_, _ = w.file.Write(b)
	w.partial = append(w.partial, b...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		line := strings.TrimRight(string(w.partial[:i]), "\r")
		w.partial = w.partial[i+1:]
		w.addLine(line)
	}
	if len(w.partial) > maxLine {
		w.addLine(string(w.partial))
		w.partial = w.partial[:0]
	}
	return len(b), nil
}

func (w *logWriter) addLine(line string) {
	if len(w.lines) < tailLines {
		w.lines = append(w.lines, line)
	} else {
		w.lines[w.next] = line
		w.next = (w.next + 1) % tailLines
	}
	pid, severity, msg, ok := parseLogLine(line)
	if !ok {
		w.log.Log(context.Background(), w.level, "postgres: "+line)
		return
	}
	switch severity {
	case "DETAIL", "HINT", "CONTEXT", "STATEMENT", "QUERY", "LOCATION":
		// Belongs to the previous line: keep its level.
	case "LOG", "INFO", "NOTICE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3", "DEBUG4", "DEBUG5":
		w.level = slog.LevelDebug
	case "PANIC":
		w.level = slog.LevelError
	default: // WARNING, ERROR (a failed statement), FATAL (a failed session)
		w.level = slog.LevelWarn
	}
	w.log.Log(context.Background(), w.level, "postgres: "+msg, "severity", severity, "pid", pid)
}

// parseLogLine splits a line written with log_line_prefix '%m [%p] ', as in
// "2025-01-02 03:04:05.678 UTC [42] LOG:  database system is ready".
func parseLogLine(line string) (pid, severity, msg string, ok bool) {
	open := strings.Index(line, " [")
	if open < 0 {
		return "", "", "", false
	}
	closing := strings.Index(line[open:], "] ")
	if closing < 0 {
		return "", "", "", false
	}
	pid = line[open+2 : open+closing]
	rest := line[open+closing+2:]
	severity, msg, ok = strings.Cut(rest, ":  ")
	if !ok || severity == "" || strings.ToUpper(severity) != severity || strings.ContainsRune(severity, ' ') {
		return "", "", "", false
	}
	return pid, severity, msg, true
}

// resetTail forgets the kept lines, so an error shows only the current run.
func (w *logWriter) resetTail() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lines = w.lines[:0]
	w.next = 0
}

// tail returns the last lines written, oldest first.
func (w *logWriter) tail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(w.lines)
	out := make([]string, 0, n+1)
	for i := range n {
		out = append(out, w.lines[(w.next+i)%n])
	}
	if len(w.partial) > 0 {
		out = append(out, string(w.partial))
	}
	return strings.Join(out, "\n")
}

func (w *logWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.file.Close()
}
