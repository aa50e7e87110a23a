package db_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
)

// TestAnalyzeStaleReplacesPlansMadeWhenSmall shows the hazard AnalyzeStale
// exists for and that it removes it: a connection that ran a hot statement
// while recipients was small keeps scanning the whole table as it grows,
// until the table's statistics change.
func TestAnalyzeStaleReplacesPlansMadeWhenSmall(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	keepAutovacuumAway(t, b)
	if analyzed, err := b.db.AnalyzeStale(ctx, 1000, 0.1); err != nil || len(analyzed) != 0 {
		t.Fatalf("AnalyzeStale on empty tables = %v, %v; want nothing analyzed", analyzed, err)
	}

	var small []db.NewMessage
	for range 20 {
		small = append(small, newMessage(t, 1))
	}
	if _, err := b.db.InsertMessages(ctx, small); err != nil {
		t.Fatal(err)
	}
	conn, err := b.raw.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	var ids []string
	for _, m := range small[:5] {
		ids = append(ids, m.Recipients[0].ID.String())
	}
	lock := db.HotStatements([]any{ids}, nil)["lock recipients"].SQL
	// Past five runs PostgreSQL settles on the plan made without the
	// parameters' values, and keeps it.
	for range 8 {
		if _, err := conn.Exec(ctx, lock, ids); err != nil {
			t.Fatal(err)
		}
	}
	var name string
	if err := conn.QueryRow(ctx, "SELECT name FROM pg_prepared_statements WHERE statement = $1", lock).Scan(&name); err != nil {
		t.Fatalf("find the prepared statement: %v", err)
	}
	cachedPlan := func() string {
		t.Helper()
		var plan string
		rows, err := conn.Query(ctx, "EXPLAIN EXECUTE "+name+"('{"+strings.Join(ids, ",")+"}')")
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var line string
			if err := rows.Scan(&line); err != nil {
				t.Fatal(err)
			}
			plan += line + "\n"
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return plan
	}
	if plan := cachedPlan(); !strings.Contains(plan, "Seq Scan on recipients") {
		t.Skipf("the planner did not settle on a full scan of the small table, so there is nothing to replace:\n%s", plan)
	}

	var many []db.NewMessage
	for range 3000 {
		many = append(many, newMessage(t, 1))
	}
	for start := 0; start < len(many); start += 500 {
		if _, err := b.db.InsertMessages(ctx, many[start:start+500]); err != nil {
			t.Fatal(err)
		}
	}
	if plan := cachedPlan(); !strings.Contains(plan, "Seq Scan on recipients") {
		t.Fatalf("the plan changed without new statistics, so this test shows nothing:\n%s", plan)
	}

	// Backends report their changes to the statistics a moment after
	// they commit.
	var analyzed []string
	deadline := time.Now().Add(15 * time.Second)
	for len(analyzed) < 3 && time.Now().Before(deadline) {
		more, err := b.db.AnalyzeStale(ctx, 1000, 0.1)
		if err != nil {
			t.Fatal(err)
		}
		analyzed = append(analyzed, more...)
		time.Sleep(100 * time.Millisecond)
	}
	for _, want := range []string{"events", "messages", "recipients"} {
		if !slices.Contains(analyzed, want) {
			t.Errorf("AnalyzeStale analyzed %v, want %s among them", analyzed, want)
		}
	}
	if slices.Contains(analyzed, "attempts") {
		t.Errorf("AnalyzeStale analyzed attempts, which nothing changed")
	}
	if plan := cachedPlan(); strings.Contains(plan, "Seq Scan on recipients") {
		t.Errorf("after ANALYZE the statement still scans recipients whole:\n%s", plan)
	}
	if again, err := b.db.AnalyzeStale(ctx, 1000, 0.1); err != nil || len(again) != 0 {
		t.Errorf("second AnalyzeStale = %v, %v; want nothing left to analyze", again, err)
	}
}

// keepAutovacuumAway turns autovacuum off for the outbox tables of the
// test's database, so that its ANALYZE cannot change the statistics, and
// with them the plans, in the middle of a test about them.
func keepAutovacuumAway(t *testing.T, b bundle) {
	t.Helper()
	for _, table := range []string{"messages", "recipients", "attempts", "events"} {
		if _, err := b.raw.Exec(context.Background(), "ALTER TABLE "+table+" SET (autovacuum_enabled = false)"); err != nil {
			t.Fatal(err)
		}
	}
}
