//go:build unix && !linux

package pgserver

import "syscall"

// Only Linux has a parent-death signal; elsewhere a crashed parent leaves the
// server running until its next start finds the lock file.
func setParentDeathSignal(*syscall.SysProcAttr, syscall.Signal) {}
