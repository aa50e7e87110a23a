//go:build chaos && linux

package chaos

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/db"
)

// TestListenerKilled terminates the backend of the service's LISTEN
// connection from the database side, again and again, while messages keep
// arriving. The messages are stored by another process (here the test,
// through db) with a NOTIFY, so only the listener or the poll can wake the
// service: delivery must go on, each message delivered within the poll
// interval at worst, and the listener must come back.
func TestListenerKilled(t *testing.T) {
	const pollInterval = 2 * time.Second
	rounds := 5
	if testing.Short() {
		rounds = 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	cl := startCluster(t)
	databaseURL, err := cl.newDatabase(ctx, "posthaste")
	if err != nil {
		t.Fatal(err)
	}
	sk := startSink(t, 0)
	svc := newService(t, buildPosthaste(t), serviceConfig{databaseURL: databaseURL, sinkAddr: sk.addr, pollInterval: pollInterval})
	if err := svc.start(ctx); err != nil {
		t.Fatal(err)
	}
	store, err := db.Open(ctx, databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	admin, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = admin.Close(context.Background()) })

	var seq int
	// deliver stores a message with a NOTIFY, as another instance's API
	// would, and returns how long it took to reach the sink.
	deliver := func() (time.Duration, error) {
		seq++
		rcpt := fmt.Sprintf("l%d@chaos.test", seq)
		began := time.Now()
		if err := insert(ctx, store, rcpt); err != nil {
			return 0, err
		}
		if err := store.NotifyOutbox(ctx); err != nil {
			return 0, err
		}
		wctx, wcancel := context.WithTimeout(ctx, pollInterval+2*time.Second)
		defer wcancel()
		if missing := waitDelivered(wctx, sk, []string{rcpt}); len(missing) > 0 {
			return 0, fmt.Errorf("%s not delivered within %s of its NOTIFY", rcpt, pollInterval+2*time.Second)
		}
		return time.Since(began), nil
	}

	pid, err := listenerPID(ctx, admin, 0)
	if err != nil {
		t.Fatal(err)
	}
	var listening, afterKill, reconnects []time.Duration
	for range 3 {
		d, err := deliver()
		if err != nil {
			t.Fatal(err)
		}
		listening = append(listening, d)
	}
	for i := range rounds {
		killedAt := time.Now()
		var ok bool
		if err := admin.QueryRow(ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil || !ok {
			t.Fatalf("round %d: pg_terminate_backend(%d): %v %v", i+1, pid, ok, err)
		}
		// Right after the kill, before the listener is back.
		for range 3 {
			d, err := deliver()
			if err != nil {
				t.Fatalf("round %d: %v", i+1, err)
			}
			afterKill = append(afterKill, d)
		}
		if pid, err = listenerPID(ctx, admin, pid); err != nil {
			t.Fatalf("round %d: %v", i+1, err)
		}
		reconnects = append(reconnects, time.Since(killedAt))
		for range 3 {
			d, err := deliver()
			if err != nil {
				t.Fatalf("round %d: %v", i+1, err)
			}
			listening = append(listening, d)
		}
	}
	received, _ := sk.snapshot()
	var dups int
	for _, n := range received {
		dups += max(0, n-1)
	}
	t.Logf("LISTEN backend terminated x%d: %d messages stored with NOTIFY, %d delivered, %d duplicated (poll interval %s)",
		rounds, seq, len(received), dups, pollInterval)
	t.Logf("NOTIFY to delivery: listening median %s max %s; right after the kill median %s max %s; listener back after median %s max %s",
		percentile(listening, 0.5).Round(time.Millisecond), percentile(listening, 1).Round(time.Millisecond),
		percentile(afterKill, 0.5).Round(time.Millisecond), percentile(afterKill, 1).Round(time.Millisecond),
		percentile(reconnects, 0.5).Round(time.Millisecond), percentile(reconnects, 1).Round(time.Millisecond))
	if len(received) != seq || dups > 0 {
		t.Errorf("want %d messages delivered once each, got %d distinct and %d duplicates", seq, len(received), dups)
	}
	// With the listener up, a notified message must not wait for the poll.
	if p := percentile(listening, 0.5); p >= pollInterval/2 {
		t.Errorf("median delivery with the listener up took %s: the NOTIFY did not wake the service", p)
	}
}

// listenerPID waits for the service's listening backend other than old and
// returns its pid. pg_stat_activity shows the last statement of an idle
// backend, which for the listener is its LISTEN.
func listenerPID(ctx context.Context, admin *pgx.Conn, old int32) (int32, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var pid int32
	err := poll(ctx, 20*time.Millisecond, func() (bool, error) {
		err := admin.QueryRow(ctx, `SELECT pid FROM pg_stat_activity
			WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> $1
			AND query ILIKE 'LISTEN %' LIMIT 1`, old).Scan(&pid)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		return 0, fmt.Errorf("find the service's LISTEN backend: %w", err)
	}
	return pid, nil
}

// insert stores a one-recipient message directly, as the service's intake
// would, without waking anything.
func insert(ctx context.Context, store *db.DB, rcpt string) error {
	id, err := uuid.NewV7()
	if err != nil {
		return err
	}
	rid, err := uuid.NewV7()
	if err != nil {
		return err
	}
	_, domain, _ := strings.Cut(rcpt, "@")
	raw := "From: chaos@posthaste.test\r\nTo: " + rcpt + "\r\nSubject: listen\r\nMessage-ID: <" + id.String() +
		"@posthaste.test>\r\n\r\nhello\r\n"
	_, err = store.InsertMessage(ctx, db.NewMessage{
		ID:              id,
		MessageIDHeader: "<" + id.String() + "@posthaste.test>",
		EnvelopeFrom:    "chaos@posthaste.test",
		FromHeader:      "chaos@posthaste.test",
		Subject:         "listen",
		Raw:             []byte(raw),
		Recipients:      []db.NewRecipient{{ID: rid, Address: rcpt, Domain: domain, Kind: db.KindTo}},
	})
	if err != nil {
		return fmt.Errorf("insert message for %s: %w", rcpt, err)
	}
	return nil
}
