package db

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
)

func TestMapError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		err         error
		notFound    bool
		unavailable bool
	}{
		{"nil", nil, false, false},
		{"no rows", fmt.Errorf("scan: %w", pgx.ErrNoRows), true, false},
		{"admin shutdown", &pgconn.PgError{Code: "57P01"}, false, true},
		{"cannot connect now", &pgconn.PgError{Code: "57P03"}, false, true},
		{"connection failure", &pgconn.PgError{Code: "08006"}, false, true},
		{"too many connections", &pgconn.PgError{Code: "53300"}, false, true},
		{"unique violation", &pgconn.PgError{Code: "23505"}, false, false},
		{"serialization failure", &pgconn.PgError{Code: "40001"}, false, false},
		{"refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, false, true},
		{"eof", fmt.Errorf("read: %w", io.ErrUnexpectedEOF), false, true},
		{"conn closed", fmt.Errorf("query: %w", pgconn.ErrConnClosed), false, true},
		{"canceled", fmt.Errorf("query: %w", context.Canceled), false, false},
		{"deadline", context.DeadlineExceeded, false, false},
		{"other", errors.New("boom"), false, false},
		{"closed pool", fmt.Errorf("get message: %w", puddle.ErrClosedPool), false, true},
		{"read-only after failover", &pgconn.PgError{Code: "25006"}, false, true},
		{"dial canceled by the caller", &net.OpError{Op: "dial", Net: "tcp", Err: fmt.Errorf("dial: %w", context.Canceled)}, false, false},
		{"statement timeout", &pgconn.PgError{Code: "57014"}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := mapError(tt.err)
			if (got == nil) != (tt.err == nil) {
				t.Fatalf("mapError(%v) = %v", tt.err, got)
			}
			if errors.Is(got, ErrNotFound) != tt.notFound {
				t.Errorf("mapError(%v) = %v; ErrNotFound: %v, want %v", tt.err, got, !tt.notFound, tt.notFound)
			}
			if errors.Is(got, ErrUnavailable) != tt.unavailable {
				t.Errorf("mapError(%v) = %v; ErrUnavailable: %v, want %v", tt.err, got, !tt.unavailable, tt.unavailable)
			}
			if tt.err != nil && !tt.notFound && !errors.Is(got, tt.err) {
				t.Errorf("mapError(%v) = %v lost the cause", tt.err, got)
			}
		})
	}
}

func TestBoundConnect(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		url  string
		want time.Duration
	}{
		{"postgres://u@127.0.0.1:5432/d", DefaultConnectTimeout},
		{"postgres://u@127.0.0.1:5432/d?connect_timeout=0", DefaultConnectTimeout},
		{"postgres://u@127.0.0.1:5432/d?connect_timeout=3", 3 * time.Second},
		{"host=127.0.0.1 user=u dbname=d connect_timeout=2", 2 * time.Second},
	} {
		cfg, err := pgx.ParseConfig(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		boundConnect(cfg)
		if cfg.ConnectTimeout != tc.want {
			t.Errorf("%s: connect timeout %v, want %v", tc.url, cfg.ConnectTimeout, tc.want)
		}
	}
}

// TestRecordFieldsMatchColumns: a record column without a field would be
// skipped without an error, so the column lists and the scan destinations
// must have the same length.
func TestRecordFieldsMatchColumns(t *testing.T) {
	columns := func(list string) int {
		n, depth := 1, 0
		for _, c := range list {
			switch c {
			case '(':
				depth++
			case ')':
				depth--
			case ',':
				if depth == 0 {
					n++
				}
			}
		}
		return n
	}
	if got, want := len((&Recipient{}).scanFields()), columns(recipientColumns); got != want {
		t.Errorf("Recipient has %d scan fields for %d columns", got, want)
	}
	if got, want := len((&Attempt{}).scanFields()), columns(attemptColumns); got != want {
		t.Errorf("Attempt has %d scan fields for %d columns", got, want)
	}
}
