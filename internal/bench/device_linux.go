package bench

import (
	"fmt"
	"syscall"
)

// deviceOf returns the block device that holds path.
func deviceOf(path string) (major, minor uint32, err error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, 0, fmt.Errorf("stat %s: %w", path, err)
	}
	major, minor = devNumbers(uint64(st.Dev))
	return major, minor, nil
}
