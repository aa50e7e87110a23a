package bench_test

import (
	"bytes"
	"context"
	"net"
	"net/mail"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/posthaste/posthaste/internal/bench"
	"github.com/posthaste/posthaste/internal/testenv"
)

// freeAddr returns a loopback address that nothing listens on: the relay
// must know where the sink is before the run starts it.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// startRelay starts an SMTP server that answers the end of each message's
// data with reply(to), nil accepting it, and relays every message it
// accepted to sinkAddr after that, as a queueing relay such as Postfix
// does.
func startRelay(t *testing.T, sinkAddr string, reply func(to []string) *smtp.SMTPError) *testenv.SMTPServer {
	t.Helper()
	var wg sync.WaitGroup
	relay := testenv.StartSMTP(t, testenv.WithDataReply(func(from string, to []string, data []byte) *smtp.SMTPError {
		if r := reply(to); r != nil {
			return r
		}
		data = bytes.Clone(data)
		wg.Go(func() {
			if err := relayTo(sinkAddr, from, to, data); err != nil {
				t.Errorf("relay to the sink: %v", err)
			}
		})
		return nil
	}))
	t.Cleanup(wg.Wait)
	return relay
}

// relayTo sends one message to addr over a connection of its own, without
// the STARTTLS that go-smtp's SendMail insists on.
func relayTo(addr, from string, to []string, data []byte) error {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	if err := c.SendMail(from, to, bytes.NewReader(data)); err != nil {
		return err
	}
	// The run may stop the sink as soon as the last message is in, before
	// it answers QUIT.
	_ = c.Quit()
	return nil
}

// runOverSMTP runs cfg through relay, with the sink at sinkAddr.
func runOverSMTP(relay *testenv.SMTPServer, sinkAddr string, cfg bench.Config) (*bench.Report, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg.Proto, cfg.SMTPAddr, cfg.SinkAddr = "smtp", relay.Addr, sinkAddr
	cfg.Timeout, cfg.StatsSettle = 30*time.Second, -1
	return bench.Run(ctx, cfg)
}

func acceptAll([]string) *smtp.SMTPError { return nil }

// TestRunOverSMTP drives a relay instead of Posthaste: every message the
// relay accepted must reach the sink, over one reused connection per
// caller, as a well-formed message.
func TestRunOverSMTP(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		rate float64
	}{{"closed loop", 0}, {"open loop", 400}} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sinkAddr := freeAddr(t)
			relay := startRelay(t, sinkAddr, acceptAll)
			const n, c, size = 60, 3, 300
			rep, err := runOverSMTP(relay, sinkAddr, bench.Config{
				Messages:    n,
				Concurrency: c,
				Rate:        tt.rate,
				Size:        size,
				Recipients:  2,
				Domains:     2,
			})
			if err != nil {
				t.Fatalf("run: %v (report %+v)", err, rep)
			}
			if rep.Mode != "relay" || rep.Proto != "smtp" || rep.SMTPAddr != relay.Addr || rep.SinkAddr != sinkAddr {
				t.Errorf("mode %q proto %q relay %q sink %q", rep.Mode, rep.Proto, rep.SMTPAddr, rep.SinkAddr)
			}
			if rep.Accepted != n || rep.Failed != 0 || rep.Delivered != n || rep.Missing != 0 || rep.Duplicates != 0 || rep.RecipientsArrived != 2*n {
				t.Errorf("accepted %d, failed %d (%v), delivered %d, missing %d, duplicates %d, recipients %d; want %d, 0, %d, 0, 0, %d",
					rep.Accepted, rep.Failed, rep.Errors, rep.Delivered, rep.Missing, rep.Duplicates, rep.RecipientsArrived, n, n, 2*n)
			}
			if rep.APILatency.Count != n || rep.ToSinkLatency.Count != n || rep.APILatency.MaxMs <= 0 {
				t.Errorf("latencies %+v transaction, %+v to sink; want %d samples each", rep.APILatency, rep.ToSinkLatency, n)
			}
			if got := relay.Connections(); got != c {
				t.Errorf("relay saw %d connections, want %d: one per caller, reused", got, c)
			}
			var text strings.Builder
			if err := rep.WriteText(&text); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(text.String(), "smtp transaction") {
				t.Errorf("report does not name the SMTP transaction time:\n%s", text.String())
			}

			msgs := relay.Messages()
			if len(msgs) != n {
				t.Fatalf("relay got %d messages, want %d", len(msgs), n)
			}
			for _, m := range msgs[:3] {
				checkMessage(t, m, size)
			}
		})
	}
}

// checkMessage checks that m is an RFC 5322 message with the fields the
// API senders set.
func checkMessage(t *testing.T, m testenv.ReceivedMessage, size int) {
	t.Helper()
	if bytes.Count(m.Data, []byte("\n")) != bytes.Count(m.Data, []byte("\r\n")) {
		t.Errorf("message has bare LF line ends:\n%q", m.Data)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(m.Data))
	if err != nil {
		t.Fatalf("parse message: %v\n%s", err, m.Data)
	}
	h := msg.Header
	if _, err := h.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	to, err := h.AddressList("To")
	if err != nil || len(to) != len(m.To) {
		t.Errorf("To %q (%v), want the %d envelope recipients", h.Get("To"), err, len(m.To))
	}
	id := h.Get(bench.IDHeader)
	if id == "" || h.Get("Message-Id") == "" || h.Get("From") == "" || !strings.HasSuffix(h.Get("Subject"), " message "+id[strings.LastIndexByte(id, '-')+1:]) {
		t.Errorf("header %v: want Message-ID, From, %s and a Subject naming the message", h, bench.IDHeader)
	}
	var body bytes.Buffer
	if _, err := body.ReadFrom(msg.Body); err != nil {
		t.Fatal(err)
	}
	if text := strings.ReplaceAll(body.String(), "\r\n", "\n"); len(text) < size || len(text) > size+1 {
		t.Errorf("body of %d bytes, want %d", len(text), size)
	}
}

// TestRunOverSMTPCountsRefusals has the relay answer 451 to one message:
// the run counts it by its reply code, reports the others, and keeps using
// the connection after a reset.
func TestRunOverSMTPCountsRefusals(t *testing.T) {
	t.Parallel()
	sinkAddr := freeAddr(t)
	relay := startRelay(t, sinkAddr, func(to []string) *smtp.SMTPError {
		if strings.Contains(to[0], "-5-0@") {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}
		}
		return nil
	})
	const n, c = 20, 2
	rep, err := runOverSMTP(relay, sinkAddr, bench.Config{Messages: n, Concurrency: c, Size: 100})
	if err == nil || !strings.Contains(err.Error(), "1 of 20") {
		t.Errorf("run = %v, want an error saying 1 of 20 failed", err)
	}
	if rep == nil {
		t.Fatal("no report")
	}
	if rep.Accepted != n-1 || rep.Failed != 1 || rep.Errors["smtp_451"] != 1 || len(rep.Errors) != 1 {
		t.Errorf("accepted %d, failed %d, errors %v; want %d, 1, smtp_451: 1", rep.Accepted, rep.Failed, rep.Errors, n-1)
	}
	if rep.Delivered != n-1 || rep.Missing != 0 || rep.APILatency.Count != n-1 {
		t.Errorf("delivered %d, missing %d, %d latencies; want %d, 0, %d", rep.Delivered, rep.Missing, rep.APILatency.Count, n-1, n-1)
	}
	if got := relay.Connections(); got != c {
		t.Errorf("relay saw %d connections, want %d: a refusal does not need a new one", got, c)
	}
	if relay.Commands("RSET") != 1 {
		t.Errorf("relay saw %d RSET, want 1, after the refusal", relay.Commands("RSET"))
	}
	var text strings.Builder
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "smtp_451") {
		t.Errorf("report does not show the refusal:\n%s", text.String())
	}
}

// TestRunOverSMTPWithoutRelay stops before sending when nothing answers at
// the relay's address.
func TestRunOverSMTPWithoutRelay(t *testing.T) {
	t.Parallel()
	rep, err := bench.Run(context.Background(), bench.Config{
		Proto:    "smtp",
		SMTPAddr: freeAddr(t),
		SinkAddr: "127.0.0.1:0",
		Messages: 1,
	})
	if err == nil || !strings.Contains(err.Error(), "check smtp relay") || rep != nil {
		t.Errorf("Run = %v, %v; want no report and an error from the check", rep, err)
	}
}
