package pgserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// layout names the files under DataDir. The cluster lives one level down so
// the password file and the log sit next to it without touching anything
// outside DataDir, and because initdb wants an empty directory.
type layout struct{ root string }

func (l layout) pgdata() string       { return filepath.Join(l.root, "pgdata") }
func (l layout) passwordFile() string { return filepath.Join(l.root, "password") }
func (l layout) logFile() string      { return filepath.Join(l.root, "postgres.log") }
func (l layout) lockFile() string     { return filepath.Join(l.root, "lock") }

// prepare creates DataDir if needed, refuses a directory that holds someone
// else's files, and, when running as root, hands it to the owner after
// checking the owner can reach it.
func (l layout) prepare(own *owner, log *slog.Logger) error {
	// Parents are created traversable; the check below still catches a
	// restrictive umask or an existing private parent.
	if err := os.MkdirAll(filepath.Dir(l.root), 0o755); err != nil {
		return fmt.Errorf("DataDir: create parent of %s: %w", l.root, err)
	}
	if err := os.Mkdir(l.root, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("DataDir: create %s: %w", l.root, err)
	}
	entries, err := os.ReadDir(l.root)
	if err != nil {
		return fmt.Errorf("DataDir: %w", err)
	}
	known := map[string]bool{"pgdata": true, "password": true, "postgres.log": true, "lock": true}
	for _, e := range entries {
		if !known[e.Name()] {
			return fmt.Errorf("DataDir: %s holds %q, so it is not a directory this package made; "+
				"choose an empty or new directory", l.root, e.Name())
		}
	}
	if own == nil {
		return nil
	}
	if err := checkReachable(l.root, own); err != nil {
		return err
	}
	// A whole-tree walk only when the owner changed (first start, or RunAs
	// changed since the last one).
	if owned, err := ownedBy(l.root, own); err != nil {
		return fmt.Errorf("DataDir: %w", err)
	} else if !owned || !ownedByOrMissing(l.pgdata(), own) {
		log.Info("embedded postgres: giving data directory to its user", "data_dir", l.root, "user", own.name)
		if err := chownTree(l.root, own); err != nil {
			return fmt.Errorf("DataDir: give %s to user %s: %w", l.root, own.name, err)
		}
	}
	return nil
}

func ownedByOrMissing(path string, own *owner) bool {
	ok, err := ownedBy(path, own)
	return ok || errors.Is(err, fs.ErrNotExist)
}

// initialized reports whether initdb completed. A pgdata without PG_VERSION
// is what an interrupted initdb leaves behind (it cleans up only when it can
// run its exit handler); it is removed so initdb can run again.
func (l layout) initialized() (bool, error) {
	_, err := os.Stat(filepath.Join(l.pgdata(), "PG_VERSION"))
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("DataDir: %w", err)
	}
	if _, err := os.Stat(l.pgdata()); err == nil {
		if err := os.RemoveAll(l.pgdata()); err != nil {
			return false, fmt.Errorf("DataDir: remove incomplete cluster %s: %w", l.pgdata(), err)
		}
	}
	return false, nil
}

// clusterVersion returns the major version that created the cluster, as
// written in PG_VERSION ("15", or "9.6" before version 10), or "" when there
// is no cluster yet.
func (l layout) clusterVersion() (string, error) {
	b, err := os.ReadFile(filepath.Join(l.pgdata(), "PG_VERSION"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("DataDir: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// password returns the superuser password, generating and storing it before
// the first initdb. An initialized cluster without its password file cannot
// be connected to, so that is an error rather than a new password.
func (l layout) password(initialized bool, own *owner) (string, error) {
	b, err := os.ReadFile(l.passwordFile())
	switch {
	case err == nil:
		pw := strings.TrimSpace(string(b))
		if pw == "" {
			return "", fmt.Errorf("DataDir: password file %s is empty", l.passwordFile())
		}
		return pw, nil
	case !errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("DataDir: read password: %w", err)
	case initialized:
		return "", fmt.Errorf("DataDir: the cluster in %s exists but its password file %s is missing; "+
			"restore it or remove %s to start over", l.pgdata(), l.passwordFile(), l.root)
	}

	var raw [24]byte
	_, _ = rand.Read(raw[:]) // crypto/rand.Read never fails; it crashes the program instead
	pw := hex.EncodeToString(raw[:])
	f, err := os.OpenFile(l.passwordFile(), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("DataDir: create password file: %w", err)
	}
	_, werr := f.WriteString(pw + "\n")
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		_ = os.Remove(l.passwordFile())
		return "", fmt.Errorf("DataDir: write password file: %w", err)
	}
	// initdb, running as the owner, reads it through --pwfile.
	if err := chown(l.passwordFile(), own); err != nil {
		return "", fmt.Errorf("DataDir: %w", err)
	}
	return pw, nil
}

// initdb creates the cluster: superuser "posthaste" with a SCRAM password for
// local and TCP connections, UTF8, C locale (byte order collation, no locale
// packages needed).
func initdb(ctx context.Context, bin string, l layout, own *owner, log *slog.Logger) error {
	start := time.Now()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "initdb"),
		"-D", l.pgdata(),
		"-U", superuser,
		"--auth=scram-sha-256",
		"--pwfile="+l.passwordFile(),
		"-E", "UTF8",
		"--locale=C",
	)
	cmd.Dir = l.root // the owner may not be able to enter our working directory
	cmd.Env = childEnv()
	// SIGTERM lets initdb remove the half-made cluster; SIGKILL would not.
	cmd.SysProcAttr = sysProcAttr(own, syscall.SIGTERM)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	var out strings.Builder
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := runLocked(cmd); err != nil {
		return fmt.Errorf("initdb %s: %w; output:\n%s", l.pgdata(), err, strings.TrimSpace(out.String()))
	}
	log.Info("embedded postgres: created cluster", "pgdata", l.pgdata(), "took", time.Since(start).Round(time.Millisecond))
	log.Debug("initdb output", "output", out.String())
	return nil
}

// Exists reports whether dataDir holds a cluster that initdb completed,
// without creating, repairing or starting anything. Commands that only make
// sense against existing data use it to refuse a wrong directory.
func Exists(dataDir string) (bool, error) {
	_, err := os.Stat(filepath.Join(layout{root: dataDir}.pgdata(), "PG_VERSION"))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return false, fmt.Errorf("DataDir: %w", err)
}
