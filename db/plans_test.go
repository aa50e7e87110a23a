package db_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/db"
)

// TestHotPlansWithoutStatistics checks the plans of the statements every
// message passes through on tables that hold rows but were never analyzed,
// as on a fresh install before autovacuum's first visit: none may scan
// messages or recipients whole. Such a plan costs little on a small table
// and grows with it; before the statements were written to rule it out,
// one of them took 40% of the database's time under load.
func TestHotPlansWithoutStatistics(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	keepAutovacuumAway(t, b)
	const messages = 3000
	var msgs []db.NewMessage
	for range messages {
		msgs = append(msgs, newMessage(t, 2))
	}
	for start := 0; start < len(msgs); start += 500 {
		if _, err := b.db.InsertMessages(ctx, msgs[start:start+500]); err != nil {
			t.Fatalf("InsertMessages: %v", err)
		}
	}
	var analyzed int
	if err := b.raw.QueryRow(ctx, `SELECT count(*) FROM pg_stat_user_tables
		WHERE relname IN ('messages', 'recipients') AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL)`).Scan(&analyzed); err != nil {
		t.Fatal(err)
	}
	if analyzed > 0 {
		t.Fatal("the tables were analyzed; the plans below must be those without statistics")
	}

	var recipientIDs, messageIDs []string
	for i := range 5 {
		recipientIDs = append(recipientIDs, msgs[i*7].Recipients[i%2].ID.String())
		messageIDs = append(messageIDs, msgs[i*7].ID.String())
	}
	uuids := func(ids []string) []any { return []any{"'{" + strings.Join(ids, ",") + "}'::uuid[]"} }
	for name, st := range db.HotStatements(uuids(recipientIDs), uuids(messageIDs)) {
		t.Run(name, func(t *testing.T) {
			plan := genericPlan(t, b.raw, st.SQL, st.Args)
			for _, table := range []string{"messages", "recipients"} {
				if seqScans(t, plan, table) {
					t.Errorf("generic plan scans %s whole:\n%s", table, plan)
				}
			}
		})
	}
}

// genericPlan is the plan PostgreSQL caches for the statement once it has
// run a few times, which is what a busy connection executes: the plan made
// without the parameters' values. It runs in a transaction that is rolled
// back, so statements that write change nothing. args are SQL literals.
func genericPlan(t *testing.T, pool *pgxpool.Pool, sql string, args []any) string {
	t.Helper()
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SET LOCAL plan_cache_mode = force_generic_plan"); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "PREPARE hot AS "+sql); err != nil {
		t.Fatalf("prepare: %v", err)
	}
	params := make([]string, len(args))
	for i, a := range args {
		params[i] = fmt.Sprint(a)
	}
	var raw []byte
	err = tx.QueryRow(ctx, "EXPLAIN (FORMAT JSON) EXECUTE hot("+strings.Join(params, ", ")+")").Scan(&raw)
	if err != nil {
		t.Fatalf("explain: %v", err)
	}
	// A prepared statement outlives the transaction.
	if _, err := tx.Exec(ctx, "DEALLOCATE hot"); err != nil {
		t.Fatal(err)
	}
	var pretty any
	if err := json.Unmarshal(raw, &pretty); err != nil {
		t.Fatal(err)
	}
	out, _ := json.MarshalIndent(pretty, "", " ")
	return string(out)
}

// seqScans reports whether a JSON plan has a sequential scan of table.
func seqScans(t *testing.T, plan, table string) bool {
	t.Helper()
	var nodes []map[string]any
	if err := json.Unmarshal([]byte(plan), &nodes); err != nil || len(nodes) == 0 {
		t.Fatalf("read the plan: %v\n%s", err, plan)
	}
	var walk func(n map[string]any) bool
	walk = func(n map[string]any) bool {
		if n["Node Type"] == "Seq Scan" && n["Relation Name"] == table {
			return true
		}
		kids, _ := n["Plans"].([]any)
		for _, k := range kids {
			if m, ok := k.(map[string]any); ok && walk(m) {
				return true
			}
		}
		return false
	}
	for _, n := range nodes {
		if p, ok := n["Plan"].(map[string]any); ok && walk(p) {
			return true
		}
	}
	return false
}
