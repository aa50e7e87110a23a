package bench

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// tracker joins what the load generator sent with what arrived at the
// sink. Every recipient address is unique to the run and names its
// message and position ("<run>-<message>-<recipient>@..."), so arrivals
// are matched by recipient, whatever the grouping into SMTP transactions.
type tracker struct {
	run  string
	n, r int

	mu          sync.Mutex
	acceptedAt  []time.Time // zero: not (yet) accepted
	arrivals    []uint16    // per recipient, n*r
	remaining   []int       // per message: recipients not arrived yet
	completedAt []time.Time // per message: when its last recipient arrived
	outstanding int         // recipients of accepted messages not arrived yet
	duplicates  int         // arrivals of a recipient beyond the first
	foreign     int         // recipients that are not this run's
	first       time.Time   // the run's first arrival
	changed     chan struct{}
	completed   int           // messages whose every recipient arrived
	markAt      int           // completed count that closes mark
	mark        chan struct{} // nil once closed, or when nobody waits
}

func newTracker(run string, n, r int) *tracker {
	t := &tracker{
		run:         run,
		n:           n,
		r:           r,
		acceptedAt:  make([]time.Time, n),
		arrivals:    make([]uint16, n*r),
		remaining:   make([]int, n),
		completedAt: make([]time.Time, n),
		changed:     make(chan struct{}),
	}
	for i := range t.remaining {
		t.remaining[i] = r
	}
	return t
}

// recipient is the address of message i's j-th recipient.
func (t *tracker) recipient(i, j, domains int) string {
	return fmt.Sprintf("%s-%d-%d@d%d.bench.test", t.run, i, j, i%domains)
}

// parse returns the message and recipient index an address names.
func (t *tracker) parse(addr string) (i, j int, ok bool) {
	local, _, found := strings.Cut(addr, "@")
	if !found {
		return 0, 0, false
	}
	parts := strings.Split(local, "-")
	if len(parts) != 3 || !strings.EqualFold(parts[0], t.run) {
		return 0, 0, false
	}
	i, err1 := strconv.Atoi(parts[1])
	j, err2 := strconv.Atoi(parts[2])
	if err1 != nil || err2 != nil || i < 0 || i >= t.n || j < 0 || j >= t.r {
		return 0, 0, false
	}
	return i, j, true
}

// accepted records that the API accepted message i at when.
func (t *tracker) accepted(i int, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.acceptedAt[i] = at
	t.outstanding += t.remaining[i]
	t.signal()
}

// arrived records an arrival at the sink.
func (t *tracker) arrived(a Arrival) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, addr := range a.To {
		i, j, ok := t.parse(addr)
		if !ok {
			t.foreign++
			continue
		}
		if t.first.IsZero() {
			t.first = a.At
		}
		k := i*t.r + j
		t.arrivals[k]++
		if t.arrivals[k] > 1 {
			t.duplicates++
			continue
		}
		t.remaining[i]--
		if t.remaining[i] == 0 {
			t.completedAt[i] = a.At
			t.completed++
			if t.mark != nil && t.completed >= t.markAt {
				close(t.mark)
				t.mark = nil
			}
		}
		if !t.acceptedAt[i].IsZero() {
			t.outstanding--
		}
	}
	t.signal()
}

func (t *tracker) signal() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// whenCompleted returns a channel closed once n messages have arrived
// whole. Only one such channel is kept: a second call replaces the first.
func (t *tracker) whenCompleted(n int) <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	ch := make(chan struct{})
	if t.completed >= n {
		close(ch)
		return ch
	}
	t.markAt, t.mark = n, ch
	return ch
}

// completedCount returns how many messages have arrived whole.
func (t *tracker) completedCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.completed
}

// state returns the recipients still awaited and a channel closed at the
// next change.
func (t *tracker) state() (outstanding int, changed <-chan struct{}) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.outstanding, t.changed
}

// counts is the tracker's final tally.
type counts struct {
	accepted            int
	delivered           int // accepted messages whose every recipient arrived
	deliveredUnaccepted int // messages that arrived though their call failed
	recipientsArrived   int // distinct recipients of this run that arrived
	duplicates          int
	foreign             int
	firstArrival        time.Time       // of any of the run's recipients
	lastCompletion      time.Time       // of an accepted message's last recipient
	toSink              []time.Duration // accepted -> last recipient arrived
}

func (t *tracker) tally() counts {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := counts{duplicates: t.duplicates, foreign: t.foreign}
	for _, a := range t.arrivals {
		if a > 0 {
			c.recipientsArrived++
		}
	}
	c.firstArrival = t.first
	for i := range t.n {
		acc, done := t.acceptedAt[i], t.completedAt[i]
		if !acc.IsZero() {
			c.accepted++
		}
		if done.IsZero() {
			continue
		}
		if acc.IsZero() {
			c.deliveredUnaccepted++
			continue
		}
		c.delivered++
		if done.After(c.lastCompletion) {
			c.lastCompletion = done
		}
		// A message can reach the sink before the API's answer reaches the
		// caller; that counts as no delay rather than a negative one.
		c.toSink = append(c.toSink, max(0, done.Sub(acc)))
	}
	return c
}
