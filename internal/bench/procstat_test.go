package bench

import (
	"os"
	"runtime"
	"testing"
)

func TestProcessCounters(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	t.Parallel()
	pid := os.Getpid()
	self, err := ProcessCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := TreeCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	if tree < self {
		t.Errorf("tree cpu %v < own cpu %v", tree, self)
	}
	if rss, err := PeakRSS(pid); err != nil || rss <= 0 {
		t.Errorf("PeakRSS = %d, %v; want a positive size", rss, err)
	}
	if rss, err := CurrentRSS(pid); err != nil || rss <= 0 {
		t.Errorf("CurrentRSS = %d, %v; want a positive size", rss, err)
	}
	if _, err := ProcessCPU(-1); err == nil {
		t.Error("ProcessCPU(-1) succeeded")
	}
}

func TestDevNumbers(t *testing.T) {
	t.Parallel()
	// 0xfe00 is 254:0, the encoding stat(2) returns for a virtio disk.
	if major, minor := devNumbers(0xfe00); major != 254 || minor != 0 {
		t.Errorf("devNumbers(0xfe00) = %d:%d, want 254:0", major, minor)
	}
	if major, minor := devNumbers(0x10302); major != 259 || minor != 2 {
		t.Errorf("devNumbers(0x10302) = %d:%d, want 259:2", major, minor)
	}
}
