//go:build !linux

package bench

import "errors"

// deviceOf is only implemented on Linux, where /proc/diskstats exists.
func deviceOf(string) (major, minor uint32, err error) {
	return 0, 0, errors.New("disk statistics are only read on Linux")
}
