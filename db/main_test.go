package db_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.Main(m)
}

// bundle is what most tests need: the DB under test on a fresh database and
// a plain pool on the same database to look at rows directly.
type bundle struct {
	db  *db.DB
	raw *pgxpool.Pool
	url string
}

func setup(t testing.TB) bundle {
	t.Helper()
	u := testenv.Database(t)
	ctx := context.Background()
	d, err := db.Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	raw, err := pgxpool.New(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	return bundle{db: d, raw: raw, url: u}
}

func newID(t testing.TB) uuid.UUID {
	t.Helper()
	id, err := uuid.NewV7()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// newMessage returns a valid message with n recipients at distinct domains
// of .test.
func newMessage(t testing.TB, n int) db.NewMessage {
	t.Helper()
	id := newID(t)
	raw := []byte("From: sender@example.test\r\nTo: a@example.test\r\nSubject: hi\r\n\r\nhello\r\n")
	m := db.NewMessage{
		ID:              id,
		MessageIDHeader: "<" + id.String() + "@example.test>",
		EnvelopeFrom:    "bounces@example.test",
		FromHeader:      "Sender <sender@example.test>",
		Subject:         "hi",
		Raw:             raw,
	}
	for i := range n {
		domain := fmt.Sprintf("d%d.example.test", i)
		m.Recipients = append(m.Recipients, db.NewRecipient{
			ID:      newID(t),
			Address: fmt.Sprintf("user%d@%s", i, domain),
			Domain:  domain,
			Kind:    db.KindTo,
		})
	}
	return m
}

// newMessageTo returns a valid message with one recipient at each of the
// given domains, which may repeat.
func newMessageTo(t testing.TB, domains ...string) db.NewMessage {
	t.Helper()
	m := newMessage(t, 0)
	for i, domain := range domains {
		m.Recipients = append(m.Recipients, db.NewRecipient{
			ID:      newID(t),
			Address: fmt.Sprintf("user%d@%s", i, domain),
			Domain:  domain,
			Kind:    db.KindTo,
		})
	}
	return m
}

func insert(t testing.TB, d *db.DB, m db.NewMessage) {
	t.Helper()
	res, err := d.InsertMessage(context.Background(), m)
	if err != nil {
		t.Fatalf("InsertMessage: %v", err)
	}
	if res.Replayed {
		t.Fatalf("InsertMessage: unexpected replay")
	}
}

func get(t testing.TB, d *db.DB, id uuid.UUID) db.Message {
	t.Helper()
	m, err := d.GetMessage(context.Background(), db.DefaultProjectID(), id)
	if err != nil {
		t.Fatalf("GetMessage(%s): %v", id, err)
	}
	return m
}

// eventTypes lists the types of a message's events in the order they were
// written.
func eventTypes(t testing.TB, raw *pgxpool.Pool, messageID uuid.UUID) []string {
	t.Helper()
	rows, err := raw.Query(context.Background(),
		`SELECT type FROM events WHERE message_id = $1 ORDER BY id`, messageID)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func count(t testing.TB, raw *pgxpool.Pool, query string, args ...any) int {
	t.Helper()
	var n int
	if err := raw.QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// claimAll claims every due recipient at now (zero: database clock).
func claimAll(t testing.TB, d *db.DB, now time.Time) []db.ClaimedRecipient {
	t.Helper()
	c, err := d.ClaimRecipients(context.Background(), db.ClaimParams{
		Owner: "owner-" + newID(t).String(), Limit: 1000, LeaseFor: time.Minute, Now: now,
	})
	if err != nil {
		t.Fatalf("ClaimRecipients: %v", err)
	}
	return c
}

func recipientStatuses(m db.Message) []string {
	out := make([]string, len(m.Recipients))
	for i, r := range m.Recipients {
		out[i] = r.Status
	}
	return out
}

func sortIDs(ids []uuid.UUID) {
	slices.SortFunc(ids, func(a, b uuid.UUID) int { return bytes.Compare(a[:], b[:]) })
}

// sameApplied reports whether got holds the same recipients and statuses as
// want, in any order.
func sameApplied(got, want []db.Applied) bool {
	order := func(a, b db.Applied) int { return bytes.Compare(a.RecipientID[:], b.RecipientID[:]) }
	got, want = slices.Clone(got), slices.Clone(want)
	slices.SortFunc(got, order)
	slices.SortFunc(want, order)
	return slices.Equal(got, want)
}

func usec(t time.Time) time.Time { return t.Truncate(time.Microsecond) }
