//go:build darwin || dragonfly || freebsd || linux || netbsd || openbsd

package pgserver

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// lockDir takes an exclusive lock on DataDir for as long as the server runs,
// so a second Start on the same directory fails before it touches anything.
// The kernel drops the lock when this process dies, so a crash leaves no
// stale lock behind.
func lockDir(path string, own *owner) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("DataDir: open lock file: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("DataDir: in use by another embedded server (lock %s is held)", path)
		}
		return nil, fmt.Errorf("DataDir: lock %s: %w", path, err)
	}
	if err := chown(path, own); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("DataDir: %w", err)
	}
	return f, nil
}
