package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func TestBenchFlagErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no messages", []string{"bench", "-n", "0"}, "-n (POSTHASTE_N): must be at least 1"},
		{"unknown proto", []string{"bench", "--proto", "pigeon"}, "--proto (POSTHASTE_PROTO)"},
		{"smtp without a relay", []string{"bench", "--proto", "smtp"}, "--smtp-addr (POSTHASTE_SMTP_ADDR): needed"},
		{"smtp with start", []string{"bench", "--start", "--proto", "smtp", "--smtp-addr", "127.0.0.1:1"}, "--start and --proto smtp exclude each other"},
		{"batch over smtp", []string{"bench", "--proto", "smtp", "--smtp-addr", "127.0.0.1:1", "--batch", "5"}, "--batch (POSTHASTE_BATCH)"},
		{"no batch", []string{"bench", "--batch", "0"}, "--batch (POSTHASTE_BATCH): must be at least 1"},
		{"start with an address", []string{"bench", "--start", "--rest-url", "http://127.0.0.1:1"}, "--start and --rest-url exclude each other"},
		{"external without a key", []string{"bench", "--rest-url", "http://127.0.0.1:1"}, "--api-key (POSTHASTE_API_KEY)"},
		{"negative statements", []string{"bench", "--statements", "-1"}, "--statements (POSTHASTE_STATEMENTS): must not be negative"},
		{"pg_stat_statements with a database url", []string{"bench", "--pg-stat-statements", "--database-url", "postgres://127.0.0.1:1/x"}, "--pg-stat-statements (POSTHASTE_PG_STAT_STATEMENTS): only for the embedded database"},
		{"start with a metrics url", []string{"bench", "--start", "--metrics-url", "http://127.0.0.1:1/metrics"}, "--start and --metrics-url exclude each other"},
		{"metrics url in-process", []string{"bench", "--metrics-url", "http://127.0.0.1:1/metrics"}, "--metrics-url (POSTHASTE_METRICS_URL)"},
		{"cpu without a pid", []string{"bench", "cpu"}, "no process id"},
		{"cpu of no number", []string{"bench", "cpu", "x"}, "not a process id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out bytes.Buffer
			err := run(context.Background(), tt.args, &out, &out)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run(%q) = %v, want an error containing %q", tt.args, err, tt.want)
			}
		})
	}
}

func TestBenchCPU(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	if err := run(context.Background(), []string{"bench", "cpu", strconv.Itoa(os.Getpid())}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if _, err := strconv.ParseFloat(strings.TrimSpace(out.String()), 64); err != nil {
		t.Errorf("bench cpu printed %q, want a number of seconds", out.String())
	}
}

// TestBenchSinkCommand runs "bench sink" as the Postfix comparison does:
// it exits by itself after --count messages and prints what arrived.
func TestBenchSinkCommand(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stderrR, stderrW := io.Pipe()
	var stdout bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"bench", "sink", "--addr", "127.0.0.1:0", "--count", "3", "--timeout", "20s"}, &stdout, stderrW)
		stderrW.Close()
	}()
	line, err := bufio.NewReader(stderrR).ReadString('\n')
	if err != nil {
		t.Fatalf("no listening line: %v", err)
	}
	go func() { _, _ = io.Copy(io.Discard, stderrR) }()
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "sink listening on ")
	if !ok {
		t.Fatalf("first line %q does not name the address", line)
	}
	for i := range 3 {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c := smtp.NewClient(conn)
		msg := fmt.Sprintf("Subject: %d\r\n\r\nhello\r\n", i)
		if err := c.SendMail("a@sender.test", []string{"b@sink.test"}, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
		_ = c.Quit()
	}
	if err := <-done; err != nil {
		t.Fatalf("bench sink: %v", err)
	}
	var res sinkResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("output %q: %v", stdout.String(), err)
	}
	if res.Messages != 3 || !res.Complete || res.FirstUnix <= 0 || res.LastUnix < res.FirstUnix {
		t.Errorf("result = %+v, want 3 messages, complete, first <= last", res)
	}
}
