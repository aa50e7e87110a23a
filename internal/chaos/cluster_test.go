//go:build chaos && linux

package chaos

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/internal/pgserver"
)

// cluster is a PostgreSQL of the suite's own, started from the machine's
// server binaries, so that it can be crashed and brought back: the shared
// server of the other tests must not be.
type cluster struct {
	dir  string // pgserver's DataDir
	port int    // kept across restarts, so the service's URL stays valid
	srv  *pgserver.Server
	url  string // of the "postgres" database
	down bool   // crashed and not restarted
}

// startCluster starts a fresh cluster and stops it when the test ends.
func startCluster(t *testing.T) *cluster {
	t.Helper()
	if _, err := pgserver.FindBinDir(context.Background()); err != nil {
		t.Fatalf("the fault suite needs the PostgreSQL server binaries: %v", err)
	}
	// Not t.TempDir: as root the server runs as another user, which must
	// be able to enter every directory above the cluster, and the test's
	// temporary directories are private.
	root, err := os.MkdirTemp("", "posthaste-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(root); err != nil {
			t.Errorf("remove cluster directory: %v", err)
		}
	})
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	c := &cluster{dir: filepath.Join(root, "cluster")}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.start(ctx); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(c.url)
	if err != nil {
		t.Fatal(err)
	}
	if c.port, err = strconv.Atoi(u.Port()); err != nil {
		t.Fatalf("port of %s: %v", u.Redacted(), err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// A crashed server reports that it had already exited; the test
		// that crashed it has checked what it needed.
		if err := c.srv.Stop(ctx); err != nil && !c.down {
			t.Errorf("stop postgres: %v", err)
		}
	})
	return c
}

func (c *cluster) start(ctx context.Context) error {
	srv, err := pgserver.Start(ctx, pgserver.Config{DataDir: c.dir, Port: c.port, Database: "postgres"})
	if err != nil {
		return fmt.Errorf("start postgres in %s: %w", c.dir, err)
	}
	c.srv, c.url = srv, srv.URL()
	return nil
}

// crashed reports whether the postmaster is gone, as after crash.
func (c *cluster) crashed() bool {
	_, err := os.Stat(filepath.Join(c.dir, "pgdata", "postmaster.pid"))
	return errors.Is(err, os.ErrNotExist)
}

// crash stops the server in immediate mode (what `pg_ctl stop -m
// immediate` does: SIGQUIT to the postmaster): every backend exits at once,
// nothing is checkpointed, and the next start runs crash recovery. It
// returns once the postmaster is gone.
func (c *cluster) crash(ctx context.Context) error {
	pidFile := filepath.Join(c.dir, "pgdata", "postmaster.pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("read postmaster pid: %w", err)
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	pid, err := strconv.Atoi(string(bytes.TrimSpace(line)))
	if err != nil {
		return fmt.Errorf("postmaster pid %q: %w", line, err)
	}
	if err := syscall.Kill(pid, syscall.SIGQUIT); err != nil {
		return fmt.Errorf("SIGQUIT postmaster %d: %w", pid, err)
	}
	// An immediate shutdown removes postmaster.pid last, after every
	// backend has exited.
	if err := poll(ctx, 20*time.Millisecond, func() (bool, error) { return c.crashed(), nil }); err != nil {
		return fmt.Errorf("postmaster %d did not exit after SIGQUIT: %w", pid, err)
	}
	// Stop reaps the process and releases the data directory; its error
	// says the server had already exited, which is the point.
	_ = c.srv.Stop(ctx)
	c.down = true
	return nil
}

// restart starts the crashed server again on the same port.
func (c *cluster) restart(ctx context.Context) error {
	if err := c.start(ctx); err != nil {
		return err
	}
	c.down = false
	return nil
}

// newDatabase creates an empty database and returns its URL.
func (c *cluster) newDatabase(ctx context.Context, name string) (string, error) {
	conn, err := pgx.Connect(ctx, c.url)
	if err != nil {
		return "", fmt.Errorf("connect to create database %s: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	u, err := url.Parse(c.url)
	if err != nil {
		return "", fmt.Errorf("parse cluster url: %w", err)
	}
	u.Path = "/" + name
	return u.String(), nil
}

// poll calls cond every interval until it reports true, returns an error,
// or ctx ends.
func poll(ctx context.Context, interval time.Duration, cond func() (bool, error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
