package bench_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/internal/bench"
)

// sendSMTP delivers one message to addr as a real client would.
func sendSMTP(t *testing.T, addr, id string, to ...string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	msg := fmt.Sprintf("From: a@sender.test\r\nTo: %s\r\n%s: %s\r\nSubject: hi\r\n\r\nbody\r\n", to[0], bench.IDHeader, id)
	if err := c.SendMail("a@sender.test", to, strings.NewReader(msg)); err != nil {
		t.Fatalf("send %s: %v", id, err)
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}
}

func TestSinkCountsEveryMessage(t *testing.T) {
	t.Parallel()
	var (
		mu  sync.Mutex
		ids = make(map[string]int)
	)
	sink := bench.NewSink(bench.SinkConfig{OnArrival: func(a bench.Arrival) {
		mu.Lock()
		defer mu.Unlock()
		ids[a.ID] += len(a.To)
	}})
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer sink.Stop()

	const senders, each = 4, 5
	var wg sync.WaitGroup
	for s := range senders {
		wg.Go(func() {
			for i := range each {
				id := fmt.Sprintf("m%d-%d", s, i)
				sendSMTP(t, sink.Addr(), id, id+"-a@d.test", id+"-b@d.test")
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sink.WaitMessages(ctx, senders*each); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	st := sink.Stats()
	if st.Messages != senders*each || st.Recipients != 2*senders*each {
		t.Errorf("stats = %d messages, %d recipients; want %d, %d", st.Messages, st.Recipients, senders*each, 2*senders*each)
	}
	if st.Bytes <= 0 || st.First.IsZero() || st.Last.Before(st.First) {
		t.Errorf("stats = %+v: want bytes and first <= last", st)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ids) != senders*each {
		t.Errorf("%d distinct %s values, want %d", len(ids), bench.IDHeader, senders*each)
	}
	for id, n := range ids {
		if n != 2 {
			t.Errorf("%s: %d recipients, want 2", id, n)
		}
	}
}

func TestSinkWaitEndsWithContext(t *testing.T) {
	t.Parallel()
	sink := bench.NewSink(bench.SinkConfig{})
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer sink.Stop()
	sendSMTP(t, sink.Addr(), "only", "x@d.test")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sink.WaitMessages(ctx, 2); err == nil || !strings.Contains(err.Error(), "1 of 2") {
		t.Errorf("WaitMessages on a cancelled context = %v, want an error saying 1 of 2 arrived", err)
	}
}

func TestSinkStopEndsOpenSessions(t *testing.T) {
	t.Parallel()
	sink := bench.NewSink(bench.SinkConfig{})
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	conn, err := net.DialTimeout("tcp", sink.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := smtp.NewClient(conn)
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	// A client that stays connected must not keep Stop waiting.
	sink.Stop()
	if err := c.Noop(); err == nil {
		t.Error("the session survived Stop")
	}
}
