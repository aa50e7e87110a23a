//go:build !(darwin || dragonfly || freebsd || linux || netbsd || openbsd)

package pgserver

import (
	"fmt"
	"os"
)

// lockDir only creates the lock file here; postgres's own postmaster.pid
// check still refuses a second server on the same cluster.
func lockDir(path string, own *owner) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("DataDir: open lock file: %w", err)
	}
	if err := chown(path, own); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("DataDir: %w", err)
	}
	return f, nil
}
