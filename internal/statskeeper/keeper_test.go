package statskeeper

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

type countingStore struct {
	calls atomic.Int32
	err   error
}

func (s *countingStore) AnalyzeStale(ctx context.Context, minChanged int64, fraction float64) ([]string, error) {
	s.calls.Add(1)
	if minChanged != 1000 || fraction != 0.1 {
		return nil, errors.New("unexpected thresholds")
	}
	return []string{"recipients"}, s.err
}

func TestKeeperChecksAtOnceAndThenEveryInterval(t *testing.T) {
	store := &countingStore{}
	k, err := New(Config{Interval: 20 * time.Millisecond}, store)
	if err != nil {
		t.Fatal(err)
	}
	k.Start(context.Background())
	deadline := time.Now().Add(5 * time.Second)
	for store.calls.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	k.Stop()
	n := store.calls.Load()
	if n < 3 {
		t.Fatalf("%d checks in 5s at a 20ms interval", n)
	}
	time.Sleep(50 * time.Millisecond)
	if store.calls.Load() != n {
		t.Error("checks went on after Stop")
	}
	k.Stop() // idempotent
}

func TestKeeperOff(t *testing.T) {
	store := &countingStore{}
	k, err := New(Config{Interval: -1}, store)
	if err != nil {
		t.Fatal(err)
	}
	k.Start(context.Background())
	time.Sleep(30 * time.Millisecond)
	k.Stop()
	if store.calls.Load() != 0 {
		t.Error("a keeper with a negative interval checked")
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []Config{{MinChanged: -1}, {Fraction: -0.5}} {
		if _, err := New(c, &countingStore{}); err == nil {
			t.Errorf("New(%+v) accepted", c)
		}
	}
}
