//go:build !unix

package pgserver

import (
	"context"
	"log/slog"
	"os"
	"syscall"
)

// owner exists only where a root user hands the server to another user.
type owner struct{ name string }

func resolveOwner(context.Context, string, *slog.Logger) (*owner, error) { return nil, nil }

func sysProcAttr(*owner, syscall.Signal) *syscall.SysProcAttr { return nil }

// Without signals a clean shutdown cannot be requested; the server recovers
// at its next start.
func interrupt(p *os.Process) error { return p.Kill() }

func quit(p *os.Process) error { return p.Kill() }

func chown(string, *owner) error { return nil }

func chownTree(string, *owner) error { return nil }

func ownedBy(string, *owner) (bool, error) { return true, nil }

func checkReachable(string, *owner) error { return nil }
