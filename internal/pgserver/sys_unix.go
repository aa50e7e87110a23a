//go:build unix

package pgserver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// owner is the unprivileged user that owns the cluster and runs the server
// when this process runs as root. A nil *owner means "this process's user".
type owner struct {
	name   string
	uid    uint32
	gid    uint32
	groups []uint32
}

// resolveOwner returns nil unless the effective user is root; then it looks up
// name, creating it as a system user when it is the default "posthaste".
func resolveOwner(ctx context.Context, name string, log *slog.Logger) (*owner, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup(name)
	if errors.As(err, new(user.UnknownUserError)) && name == createdUser {
		if err := createSystemUser(ctx, name); err != nil {
			return nil, err
		}
		log.Info("embedded postgres: created system user", "user", name)
		u, err = user.Lookup(name)
	}
	if errors.As(err, new(user.UnknownUserError)) {
		return nil, fmt.Errorf("RunAs: user %q does not exist; create it or name another unprivileged user", name)
	}
	if err != nil {
		return nil, fmt.Errorf("RunAs: look up user %q: %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("RunAs: user %q has uid %q: %w", name, u.Uid, err)
	}
	if uid == 0 {
		return nil, fmt.Errorf("RunAs: user %q is root; initdb and postgres refuse to run as root", name)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("RunAs: user %q has gid %q: %w", name, u.Gid, err)
	}
	o := &owner{name: name, uid: uint32(uid), gid: uint32(gid)}
	gids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("RunAs: groups of user %q: %w", name, err)
	}
	for _, g := range gids {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			o.groups = append(o.groups, uint32(n))
		}
	}
	return o, nil
}

func createSystemUser(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	args := []string{"--system", "--no-create-home"}
	// A service account needs no login shell.
	if _, err := os.Stat("/usr/sbin/nologin"); err == nil {
		args = append(args, "--shell", "/usr/sbin/nologin")
	}
	out, err := exec.CommandContext(ctx, "useradd", append(args, name)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("RunAs: create system user %q with useradd (create it yourself or set RunAs): %w: %s",
			name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sysProcAttr runs a child as own (if set), in its own process group so a
// terminal's Ctrl-C reaches only us and we decide when the database stops,
// and with parentDeath sent to it if we die first (Linux).
func sysProcAttr(own *owner, parentDeath syscall.Signal) *syscall.SysProcAttr {
	a := &syscall.SysProcAttr{Setpgid: true}
	if own != nil {
		a.Credential = &syscall.Credential{Uid: own.uid, Gid: own.gid, Groups: own.groups}
	}
	setParentDeathSignal(a, parentDeath)
	return a
}

func interrupt(p *os.Process) error { return p.Signal(syscall.SIGINT) }

// quit asks for an immediate shutdown: no checkpoint, crash recovery at the
// next start.
func quit(p *os.Process) error { return p.Signal(syscall.SIGQUIT) }

func chown(path string, own *owner) error {
	if own == nil {
		return nil
	}
	if err := os.Lchown(path, int(own.uid), int(own.gid)); err != nil {
		return fmt.Errorf("give %s to user %s: %w", path, own.name, err)
	}
	return nil
}

func chownTree(root string, own *owner) error {
	return filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return chown(path, own)
	})
}

func ownedBy(path string, own *owner) (bool, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return false, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false, fmt.Errorf("no owner information for %s", path)
	}
	return st.Uid == own.uid && st.Gid == own.gid, nil
}

// checkReachable fails unless own may search every directory above dir, as
// the server needs to reach its data directory by path. Permission bits
// decide (owner, else group, else other); ACLs are not consulted.
func checkReachable(dir string, own *owner) error {
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("DataDir: %w", err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if ok && !searchable(fi.Mode().Perm(), st, own) {
			return fmt.Errorf("DataDir: %s is not reachable by user %q, which runs PostgreSQL: "+
				"it cannot enter %s (mode %s, owner uid %d); use a directory it can reach, "+
				"such as /var/lib/posthaste, or allow it with chmod o+x %s",
				dir, own.name, p, fi.Mode().Perm(), st.Uid, p)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

func searchable(perm fs.FileMode, st *syscall.Stat_t, own *owner) bool {
	if st.Uid == own.uid {
		return perm&0o100 != 0
	}
	if st.Gid == own.gid {
		return perm&0o010 != 0
	}
	for _, g := range own.groups {
		if st.Gid == g {
			return perm&0o010 != 0
		}
	}
	return perm&0o001 != 0
}
