package db_test

import (
	"context"
	"slices"
	"testing"

	"github.com/google/uuid"
)

// TestUUIDParameters sends ids as the statements do, single and in arrays,
// and reads them back as PostgreSQL stored them.
func TestUUIDParameters(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	a, c := newID(t), newID(t)
	if direct, err := b.db.EncodesUUIDsDirectly(ctx); err != nil || !direct {
		t.Errorf("uuids are not encoded by the direct plans (%v)", err)
	}

	var text string
	if err := b.db.QueryRow(ctx, "SELECT $1::uuid::text", a).Scan(&text); err != nil || text != a.String() {
		t.Errorf("one id: %q, %v; want %s", text, err, a)
	}
	var texts []string
	if err := b.db.QueryRow(ctx, "SELECT $1::uuid[]::text[]", []uuid.UUID{a, c}).Scan(&texts); err != nil ||
		!slices.Equal(texts, []string{a.String(), c.String()}) {
		t.Errorf("array: %v, %v; want [%s %s]", texts, err, a, c)
	}
	var isNull bool
	if err := b.db.QueryRow(ctx, "SELECT $1::uuid[] IS NULL", []uuid.UUID(nil)).Scan(&isNull); err != nil || !isNull {
		t.Errorf("nil slice: NULL %v, %v; want NULL", isNull, err)
	}
	var n int
	if err := b.db.QueryRow(ctx, "SELECT cardinality($1::uuid[])", []uuid.UUID{}).Scan(&n); err != nil || n != 0 {
		t.Errorf("empty slice: %d elements, %v; want an empty array", n, err)
	}
	var back uuid.UUID
	if err := b.db.QueryRow(ctx, "SELECT $1::uuid", &a).Scan(&back); err != nil || back != a {
		t.Errorf("pointer to an id: %s, %v; want %s", back, err, a)
	}
}
