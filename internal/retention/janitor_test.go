package retention_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/retention"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}

const day = 24 * time.Hour

// env is a migrated database, the store on it, and a plain pool to look at
// and age rows directly.
type env struct {
	store *db.DB
	raw   *pgxpool.Pool
}

func setup(t testing.TB) env {
	t.Helper()
	u := testenv.Database(t)
	ctx := context.Background()
	store, err := db.Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	raw, err := pgxpool.New(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	return env{store: store, raw: raw}
}

func newID(t testing.TB) uuid.UUID {
	t.Helper()
	id, err := uuid.NewV7()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// newMessages returns n messages of one recipient each.
func newMessages(t testing.TB, n int) []db.NewMessage {
	t.Helper()
	out := make([]db.NewMessage, n)
	for i := range out {
		id := newID(t)
		out[i] = db.NewMessage{
			ID:           id,
			EnvelopeFrom: "bounces@example.test",
			Subject:      "hi",
			Raw:          []byte("From: sender@example.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\n" + strings.Repeat("hello ", 50) + "\r\n"),
			Recipients: []db.NewRecipient{{
				ID: newID(t), Address: "user@d" + fmt.Sprint(i%50) + ".example.test",
				Domain: "d" + fmt.Sprint(i%50) + ".example.test", Kind: db.KindTo,
			}},
		}
	}
	return out
}

func insertAll(t testing.TB, store *db.DB, msgs []db.NewMessage) {
	t.Helper()
	out, err := store.InsertMessages(context.Background(), msgs)
	if err != nil {
		t.Fatalf("InsertMessages: %v", err)
	}
	for _, o := range out {
		if o.Err != nil {
			t.Fatalf("InsertMessages: %v", o.Err)
		}
	}
}

// finish claims up to limit due recipients and records status for each,
// with one attempt row, and returns how many it claimed.
func finish(t testing.TB, store *db.DB, limit int, status string) int {
	t.Helper()
	ctx := context.Background()
	c, err := store.ClaimWithContents(ctx, db.ClaimParams{Owner: "w-" + newID(t).String(), Limit: limit, LeaseFor: time.Minute})
	if err != nil {
		t.Fatalf("ClaimWithContents: %v", err)
	}
	recordOutcomes(t, store, c.Recipients, status)
	return len(c.Recipients)
}

func recordOutcomes(t testing.TB, store *db.DB, claimed []db.ClaimedRecipient, status string) {
	t.Helper()
	if len(claimed) == 0 {
		return
	}
	now := time.Now()
	outcomes := make([]db.Outcome, len(claimed))
	for i, c := range claimed {
		outcomes[i] = db.Outcome{
			RecipientID: c.ID, LeaseOwner: c.LeaseOwner, Status: status, Code: 250, Text: "ok",
			Attempts: []db.NewAttempt{{StartedAt: now, Duration: time.Millisecond, MXHost: "mx." + c.Domain, Code: 250, Text: "ok"}},
		}
		if status == db.StatusDeferred {
			outcomes[i].NextAttemptAt = now.Add(time.Hour)
		}
	}
	if _, err := store.RecordOutcomes(context.Background(), outcomes); err != nil {
		t.Fatalf("RecordOutcomes: %v", err)
	}
}

// fanOutAll moves the webhook fan-out cursor past every event stored so
// far. Transactions of other databases on the same server hold the event
// feed back (transaction ids are server-wide), so it polls.
func fanOutAll(t testing.TB, e env) {
	t.Helper()
	ctx := context.Background()
	deadline := time.After(30 * time.Second)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for {
		if _, err := e.store.FanOutWebhooks(ctx, 1000); err != nil {
			t.Fatalf("FanOutWebhooks: %v", err)
		}
		if count(t, e.raw, `SELECT count(*) FROM events e, webhook_fanout_cursor c
			WHERE (e.txid, e.id) > (c.txid, c.event_id)`) == 0 {
			return
		}
		select {
		case <-deadline:
			t.Fatal("the webhook fan-out did not reach the end of the feed")
		case <-poll.C:
		}
	}
}

func count(t testing.TB, raw *pgxpool.Pool, query string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := raw.QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// age moves the updated_at of the messages back by d: as if they had been
// final that much longer.
func age(t testing.TB, e env, ids []uuid.UUID, d time.Duration) {
	t.Helper()
	_, err := e.raw.Exec(context.Background(),
		`UPDATE messages SET updated_at = updated_at - $2::bigint * interval '1 microsecond' WHERE id = ANY($1)`,
		ids, d.Microseconds())
	if err != nil {
		t.Fatal(err)
	}
}

func ids(msgs []db.NewMessage) []uuid.UUID {
	out := make([]uuid.UUID, len(msgs))
	for i, m := range msgs {
		out[i] = m.ID
	}
	return out
}

// fixture stores messages final for 40 days (bodies due), final for 100
// days (rows due), final today, and waiting (deferred) for 100 days, n of
// each.
type fixture struct {
	bodiesDue, rowsDue, young, waiting []uuid.UUID
}

func newFixture(t testing.TB, e env, n int) fixture {
	t.Helper()
	var f fixture
	for _, group := range []*[]uuid.UUID{&f.bodiesDue, &f.rowsDue, &f.young, &f.waiting} {
		msgs := newMessages(t, n)
		insertAll(t, e.store, msgs)
		status := db.StatusDelivered
		if group == &f.waiting {
			status = db.StatusDeferred
		}
		if got := finish(t, e.store, n, status); got != n {
			t.Fatalf("claimed %d of %d", got, n)
		}
		*group = ids(msgs)
	}
	age(t, e, f.bodiesDue, 40*day)
	age(t, e, f.rowsDue, 100*day)
	age(t, e, f.waiting, 100*day)
	fanOutAll(t, e)
	return f
}

func newJanitor(t testing.TB, store *db.DB, cfg retention.Config) *retention.Janitor {
	t.Helper()
	j, err := retention.New(cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(j.Stop)
	return j
}

func TestJanitorRun(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctx := context.Background()
	f := newFixture(t, e, 3)
	j := newJanitor(t, e.store, retention.Config{BatchPause: -1})

	run, err := j.RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The messages due for deletion have their bodies purged first, in the
	// same run.
	want := retention.Counts{BodiesPurged: 6, Messages: 3, Recipients: 3, Attempts: 3, Events: 6, Batches: 2}
	if run.Counts != want || run.Skipped {
		t.Errorf("run %+v, want %+v", run, want)
	}

	for _, id := range f.bodiesDue {
		m, err := e.store.GetMessage(ctx, db.DefaultProjectID(), id)
		if err != nil {
			t.Fatal(err)
		}
		if m.RawPurgedAt == nil || len(m.Recipients) != 1 || len(m.Attempts) != 1 {
			t.Errorf("message final for 40 days: purged at %v, %d recipients, %d attempts; want purged, 1, 1",
				m.RawPurgedAt, len(m.Recipients), len(m.Attempts))
		}
		if _, err := e.store.GetMessageRaw(ctx, db.DefaultProjectID(), id); !errors.Is(err, db.ErrRawPurged) {
			t.Errorf("GetMessageRaw: %v, want ErrRawPurged", err)
		}
	}
	for _, id := range f.rowsDue {
		if _, err := e.store.GetMessage(ctx, db.DefaultProjectID(), id); !errors.Is(err, db.ErrNotFound) {
			t.Errorf("message final for 100 days: %v, want ErrNotFound", err)
		}
	}
	if n := count(t, e.raw, `SELECT count(*) FROM recipients WHERE message_id = ANY($1)`, f.rowsDue); n != 0 {
		t.Errorf("%d recipients of deleted messages left", n)
	}
	for _, group := range [][]uuid.UUID{f.young, f.waiting} {
		for _, id := range group {
			m, err := e.store.GetMessage(ctx, db.DefaultProjectID(), id)
			if err != nil {
				t.Fatal(err)
			}
			if m.RawPurgedAt != nil || len(m.Recipients) != 1 || len(m.Attempts) != 1 {
				t.Errorf("message %s (%s) was touched", id, m.Status)
			}
		}
	}

	st := j.Stats()
	if st.Runs != 1 || st.Skipped != 0 || st.Failed != 0 || st.Total != want || st.Last.Counts != want {
		t.Errorf("stats %+v", st)
	}
}

func TestJanitorBatchesAreBounded(t *testing.T) {
	t.Parallel()
	e := setup(t)
	f := newFixture(t, e, 5)
	j := newJanitor(t, e.store, retention.Config{BatchSize: 2, BatchPause: -1})
	run, err := j.RunOnce(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// Purge: 10 bodies in 2+2+2+2+2 (and a last, empty batch); delete: 5
	// messages in 2+2+1.
	if run.BodiesPurged != 10 || run.Messages != 5 || run.Batches != 8 {
		t.Errorf("run %+v: want 10 purged, 5 deleted in 8 batches", run)
	}
	if n := count(t, e.raw, `SELECT count(*) FROM messages WHERE id = ANY($1)`, f.waiting); n != 5 {
		t.Errorf("%d of 5 waiting messages left", n)
	}
}

func TestJanitorsTakeTurns(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctx := context.Background()
	f := newFixture(t, e, 4)
	a := newJanitor(t, e.store, retention.Config{BatchPause: -1})
	b := newJanitor(t, e.store, retention.Config{BatchPause: -1})

	// Another instance holds the lock: a run does nothing.
	held, ok, err := e.store.TryRetentionLock(ctx)
	if err != nil || !ok {
		t.Fatalf("TryRetentionLock: %v, %v", ok, err)
	}
	run, err := a.RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !run.Skipped || run.Counts != (retention.Counts{}) {
		t.Errorf("run while the lock is held: %+v, want skipped", run)
	}
	if n := count(t, e.raw, `SELECT count(*) FROM messages WHERE id = ANY($1)`, f.rowsDue); n != 4 {
		t.Errorf("%d of 4 messages due left while another instance held the lock", n)
	}
	if st := a.Stats(); st.Skipped != 1 || st.Runs != 0 {
		t.Errorf("stats %+v, want one skipped run", st)
	}
	if err := held.Release(ctx); err != nil {
		t.Fatal(err)
	}

	// Two at once: whatever the timing, each message is deleted once and
	// neither fails.
	var (
		wg   sync.WaitGroup
		runs [2]retention.RunStats
		errs [2]error
	)
	for i, j := range []*retention.Janitor{a, b} {
		wg.Go(func() { runs[i], errs[i] = j.RunOnce(ctx) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := runs[0].Messages + runs[1].Messages; got != 4 {
		t.Errorf("the two runs deleted %d messages, want 4: %+v", got, runs)
	}
}

func TestJanitorStartStop(t *testing.T) {
	t.Parallel()
	e := setup(t)
	newFixture(t, e, 2)
	j := newJanitor(t, e.store, retention.Config{Interval: time.Hour, BatchPause: -1})
	j.Stop() // before Start: nothing to stop
	j2 := newJanitor(t, e.store, retention.Config{Interval: time.Hour, BatchPause: -1})
	j2.Start(context.Background())

	// The first run starts at once.
	deadline := time.After(30 * time.Second)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for j2.Stats().Runs == 0 {
		select {
		case <-deadline:
			t.Fatal("no run within 30s of Start")
		case <-poll.C:
		}
	}
	j2.Stop()
	j2.Stop()
	if st := j2.Stats(); st.Runs != 1 || st.Total.Messages != 2 {
		t.Errorf("stats %+v, want one run that deleted 2 messages", st)
	}
}

func TestJanitorKeepsForEverWhenNegative(t *testing.T) {
	t.Parallel()
	e := setup(t)
	newFixture(t, e, 1)
	j := newJanitor(t, e.store, retention.Config{BodyRetention: -1, MessageRetention: -1, BatchPause: -1})
	run, err := j.RunOnce(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if run.Counts != (retention.Counts{}) {
		t.Errorf("run %+v, want nothing done", run)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  retention.Config
		want string
	}{
		{"defaults", retention.Config{}, ""},
		{"negative interval", retention.Config{Interval: -time.Second}, "Interval"},
		{"negative batch", retention.Config{BatchSize: -1}, "BatchSize"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.WithDefaults().Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate: %v", err)
			case tc.want != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.want)):
				t.Errorf("Validate: %v, want an error about %s", err, tc.want)
			}
		})
	}
	if _, err := retention.New(retention.Config{}, nil); err == nil {
		t.Error("New without a store accepted")
	}
}
