package db_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
)

// call is one use of the database, as the API or delivery would make it.
type call struct {
	name string
	do   func(context.Context, *db.DB) error
}

// everyCall lists a call of every method of DB that reaches the database.
// ids are existing recipient ids, msgID an existing message.
func everyCall(t *testing.T, msgID uuid.UUID, ids []uuid.UUID) []call {
	return []call{
		{"Ping", func(ctx context.Context, d *db.DB) error { return d.Ping(ctx) }},
		{"GetMessage", func(ctx context.Context, d *db.DB) error {
			_, err := d.GetMessage(ctx, db.DefaultProjectID(), msgID)
			return err
		}},
		{"ListMessages", func(ctx context.Context, d *db.DB) error {
			_, err := d.ListMessages(ctx, db.ListMessagesParams{ProjectID: db.DefaultProjectID()})
			return err
		}},
		{"InsertMessage", func(ctx context.Context, d *db.DB) error {
			_, err := d.InsertMessage(ctx, newMessage(t, 1))
			return err
		}},
		{"InsertMessage with idempotency key", func(ctx context.Context, d *db.DB) error {
			_, err := d.InsertMessage(ctx, withKey(newMessage(t, 1), "k", "h"))
			return err
		}},
		{"CancelMessage", func(ctx context.Context, d *db.DB) error {
			_, _, err := d.CancelMessage(ctx, db.DefaultProjectID(), msgID)
			return err
		}},
		{"ClaimRecipients", func(ctx context.Context, d *db.DB) error {
			_, err := d.ClaimRecipients(ctx, db.ClaimParams{Owner: "w", Limit: 10, LeaseFor: time.Minute})
			return err
		}},
		{"RecordOutcomes", func(ctx context.Context, d *db.DB) error {
			_, err := d.RecordOutcomes(ctx, []db.Outcome{{RecipientID: ids[0], LeaseOwner: "w", Status: db.StatusDelivered, Code: 250}})
			return err
		}},
		{"ReleaseLeases", func(ctx context.Context, d *db.DB) error {
			_, err := d.ReleaseLeases(ctx, "w", ids)
			return err
		}},
		{"RescueExpiredLeases", func(ctx context.Context, d *db.DB) error {
			_, err := d.RescueExpiredLeases(ctx, time.Time{})
			return err
		}},
		{"LoadMessageContents", func(ctx context.Context, d *db.DB) error {
			_, err := d.LoadMessageContents(ctx, []uuid.UUID{msgID})
			return err
		}},
		{"NotifyOutbox", func(ctx context.Context, d *db.DB) error { return d.NotifyOutbox(ctx) }},
		{"DeleteExpiredIdempotencyKeys", func(ctx context.Context, d *db.DB) error {
			_, err := d.DeleteExpiredIdempotencyKeys(ctx)
			return err
		}},
		{"CreateAPIKey", func(ctx context.Context, d *db.DB) error {
			_, err := d.CreateAPIKey(ctx, db.NewAPIKeyParams{Name: "k", Prefix: "ph_k", Hash: []byte("h-" + uuid.NewString()), Scopes: []string{db.ScopeSend}})
			return err
		}},
		{"CreateAPIKeyIfNone", func(ctx context.Context, d *db.DB) error {
			_, _, err := d.CreateAPIKeyIfNone(ctx, db.NewAPIKeyParams{Name: "k", Prefix: "ph_k", Hash: []byte("h"), Scopes: []string{db.ScopeAdmin}})
			return err
		}},
		{"ListAPIKeys", func(ctx context.Context, d *db.DB) error {
			_, err := d.ListAPIKeys(ctx, db.DefaultProjectID())
			return err
		}},
		{"RevokeAPIKey", func(ctx context.Context, d *db.DB) error {
			_, err := d.RevokeAPIKey(ctx, db.DefaultProjectID(), uuid.New())
			return err
		}},
		{"LookupAPIKey", func(ctx context.Context, d *db.DB) error {
			_, err := d.LookupAPIKey(ctx, []byte("h"))
			return err
		}},
	}
}

// expectUnavailable runs every call on d and wants ErrUnavailable from each,
// promptly: an unreachable database must not hold callers.
func expectUnavailable(t *testing.T, d *db.DB, calls []call) {
	t.Helper()
	for _, c := range calls {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := c.do(ctx, d)
		cancel()
		if !errors.Is(err, db.ErrUnavailable) {
			t.Errorf("%s: err = %v, want ErrUnavailable", c.name, err)
		}
	}
}

// seed stores a message through d and returns its id and recipient ids, so
// that the calls have real rows to aim at.
func seed(t *testing.T, d *db.DB) (uuid.UUID, []uuid.UUID) {
	t.Helper()
	m := newMessage(t, 2)
	insert(t, d, m)
	return m.ID, []uuid.UUID{m.Recipients[0].ID, m.Recipients[1].ID}
}

// A database server that went away: pooled connections break, new ones are
// refused.
func TestServerGoneIsUnavailable(t *testing.T) {
	t.Parallel()
	_, proxied, proxy := testenv.ProxiedDatabase(t)
	ctx := context.Background()
	d, err := db.Open(ctx, proxied)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	msgID, ids := seed(t, d)

	proxy.Stop()
	expectUnavailable(t, d, everyCall(t, msgID, ids))

	listenCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := d.ListenOutbox(listenCtx, func() {}); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("ListenOutbox: err = %v, want ErrUnavailable", err)
	}
	if _, err := db.Open(ctx, proxied); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Open: err = %v, want ErrUnavailable", err)
	}
	if err := db.Migrate(ctx, proxied); !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Migrate: err = %v, want ErrUnavailable", err)
	}
}

// Connections terminated by the server, which then admits no new ones (as
// while it shuts down or an operator fences it off).
func TestTerminatedConnectionsAreUnavailable(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	msgID, ids := seed(t, b.db)
	// Every pool connection is idle now, so terminating them breaks no
	// statement half-way, and the next call meets a dead connection.
	if err := b.db.Ping(ctx); err != nil {
		t.Fatal(err)
	}

	// The fencing is done from the maintenance database: a database cannot
	// shut itself off, and the connection doing it must not be one of those
	// terminated.
	cfg, err := pgx.ParseConfig(b.url)
	if err != nil {
		t.Fatal(err)
	}
	name := cfg.Database
	cfg.Database = "postgres"
	admin, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, `ALTER DATABASE `+pgx.Identifier{name}.Sanitize()+` ALLOW_CONNECTIONS false`); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1`, name); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the terminated backends to exit", func() bool {
		var n int
		err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, name).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n == 0
	})

	expectUnavailable(t, b.db, everyCall(t, msgID, ids))
}

// A closed DB, as during shutdown while a request is still in flight.
func TestClosedDBIsUnavailable(t *testing.T) {
	t.Parallel()
	u := testenv.Database(t)
	d, err := db.Open(context.Background(), u)
	if err != nil {
		t.Fatal(err)
	}
	msgID, ids := seed(t, d)
	d.Close()
	expectUnavailable(t, d, everyCall(t, msgID, ids))
}

// A server that accepts connections and never answers (a hung host, a
// black-holing firewall in front of a listener) is bounded by the connect
// timeout and reported unavailable, not as the caller's deadline.
func TestSilentServerIsUnavailable(t *testing.T) {
	t.Parallel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 16)
	go func() {
		defer close(accepted)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		for c := range accepted {
			c.Close()
		}
	})

	u := "postgres://postgres@" + lis.Addr().String() + "/postgres?connect_timeout=1"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	_, err = db.Open(ctx, u)
	if !errors.Is(err, db.ErrUnavailable) {
		t.Errorf("Open: err = %v, want ErrUnavailable", err)
	}
	if ctx.Err() != nil {
		t.Errorf("Open took %v: the connect timeout did not bound it", time.Since(start))
	}
}

func TestPing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	if err := b.db.Ping(context.Background()); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

// waitFor polls cond every 20ms until it holds, failing after 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
