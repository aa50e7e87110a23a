package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the CPU times in /proc/PID/stat. The kernel fixes
// it at 100 for user space on every architecture Posthaste runs on,
// whatever its internal tick rate.
const userHZ = 100

// procTimes are the CPU fields of /proc/PID/stat.
type procTimes struct {
	ppid int
	// self is utime + stime: the process's own CPU, all threads.
	self time.Duration
	// reaped is cutime + cstime: the CPU of its children that have exited
	// and been waited for.
	reaped time.Duration
}

// readProcTimes parses /proc/PID/stat. The command name in field 2 may
// contain spaces and parentheses, so fields are counted from the last ')'.
func readProcTimes(pid int) (procTimes, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procTimes{}, fmt.Errorf("read cpu times of pid %d: %w", pid, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procTimes{}, fmt.Errorf("parse /proc/%d/stat: no command name", pid)
	}
	// After ')': state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return procTimes{}, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	var v [5]int64
	for k, idx := range []int{1, 11, 12, 13, 14} {
		if v[k], err = strconv.ParseInt(f[idx], 10, 64); err != nil {
			return procTimes{}, fmt.Errorf("parse /proc/%d/stat field %d: %w", pid, idx+3, err)
		}
	}
	tick := time.Second / userHZ
	return procTimes{
		ppid:   int(v[0]),
		self:   time.Duration(v[1]+v[2]) * tick,
		reaped: time.Duration(v[3]+v[4]) * tick,
	}, nil
}

// ProcessCPU returns the CPU time used so far by one process, all its
// threads, without its children.
func ProcessCPU(pid int) (time.Duration, error) {
	t, err := readProcTimes(pid)
	if err != nil {
		return 0, err
	}
	return t.self, nil
}

// TreeCPU returns the CPU time used so far by the process root and every
// descendant: the living ones' own time, plus what the kernel has added to
// each one's children's times for descendants that already exited. Servers
// that fork a process per connection or task (PostgreSQL's postmaster,
// Postfix's master) reap their children, so the CPU of a backend that came
// and went during a run is still in the difference of two calls.
func TreeCPU(root int) (time.Duration, error) {
	rt, err := readProcTimes(root)
	if err != nil {
		return 0, err
	}
	children, err := childMap()
	if err != nil {
		return 0, err
	}
	total := rt.self + rt.reaped
	queue := children[root]
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		t, err := readProcTimes(pid)
		if errors.Is(err, os.ErrNotExist) {
			// Exited since the scan; its time moves to its parent's reaped
			// time once waited for.
			continue
		}
		if err != nil {
			return 0, err
		}
		total += t.self + t.reaped
		queue = append(queue, children[pid]...)
	}
	return total, nil
}

// childMap maps every process id to its children's ids.
func childMap() (map[int][]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	m := make(map[int][]int)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		t, err := readProcTimes(pid)
		if err != nil {
			continue // exited, or not ours to read
		}
		m[t.ppid] = append(m[t.ppid], pid)
	}
	return m, nil
}

// PeakRSS returns the process's peak resident set size (VmHWM) in bytes.
func PeakRSS(pid int) (int64, error) { return statusBytes(pid, "VmHWM", "peak rss") }

// CurrentRSS returns the process's resident set size (VmRSS) in bytes, from
// the same file as PeakRSS so that samples and the peak agree.
func CurrentRSS(pid int) (int64, error) { return statusBytes(pid, "VmRSS", "rss") }

// statusBytes reads a size field, given in kB, of /proc/PID/status.
func statusBytes(pid int, field, what string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read %s of pid %d: %w", what, pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), field+":")
		if !ok {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s of pid %d: %w", field, pid, err)
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read %s of pid %d: %w", what, pid, err)
	}
	return 0, fmt.Errorf("pid %d has no %s", pid, field)
}

// resetPeakRSS sets the process's VmHWM back to its current RSS, so the peak
// measured afterwards belongs to the run, not to what the process did
// before (Linux 4.0+, clear_refs value 5). It needs the right to ptrace the
// process.
func resetPeakRSS(pid int) error {
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		return fmt.Errorf("reset peak rss of pid %d: %w", pid, err)
	}
	return nil
}

// DiskFlushes returns the flush requests completed by the block device
// major:minor, from /proc/diskstats (field 15 of the statistics, Linux 5.5+).
func DiskFlushes(major, minor uint32) (name string, flushes int64, err error) {
	b, err := os.ReadFile("/proc/diskstats")
	if err != nil {
		return "", 0, fmt.Errorf("read disk statistics: %w", err)
	}
	want := fmt.Sprintf("%d %d ", major, minor)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 3 || strings.Join(f[:2], " ")+" " != want {
			continue
		}
		if len(f) < 20 {
			return f[2], 0, fmt.Errorf("device %s: this kernel reports no flush counter", f[2])
		}
		n, err := strconv.ParseInt(f[18], 10, 64)
		if err != nil {
			return f[2], 0, fmt.Errorf("parse flush count of %s: %w", f[2], err)
		}
		return f[2], n, nil
	}
	return "", 0, fmt.Errorf("device %d:%d is not in /proc/diskstats (a virtual or network file system?)", major, minor)
}

// devNumbers splits a Linux dev_t into major and minor numbers.
func devNumbers(dev uint64) (major, minor uint32) {
	major = uint32((dev>>8)&0xfff) | uint32((dev>>32)&^0xfff)
	minor = uint32(dev&0xff) | uint32((dev>>12)&^0xff)
	return major, minor
}
