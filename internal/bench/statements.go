package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// StatementsReport is the statement profile of the run: what
// pg_stat_statements counted in the bench's database between the start of
// the measured run, when it was reset, and the end.
type StatementsReport struct {
	// Database is the database whose statements are counted (its dbid);
	// other databases of the server are left out.
	Database string `json:"database"`
	// Distinct counts the statements recorded; TotalExecMs is their
	// execution time in all.
	Distinct    int     `json:"distinct"`
	TotalExecMs float64 `json:"total_exec_ms"`
	// Top are the statements with the most execution time, most first.
	Top []Statement `json:"top"`
}

// Statement is one normalized statement's counters over the run. "Per
// message" divides by the accepted messages.
type Statement struct {
	Calls           int64    `json:"calls"`
	CallsPerMessage *float64 `json:"calls_per_message"`
	MeanMs          float64  `json:"mean_ms"`
	TotalMs         float64  `json:"total_ms"`
	// SharePercent is TotalMs relative to StatementsReport.TotalExecMs.
	SharePercent float64 `json:"share_percent"`
	RowsPerCall  float64 `json:"rows_per_call"`
	// WALBytesPerMessage is the WAL the statement generated.
	WALBytesPerMessage *float64 `json:"wal_bytes_per_message"`
	// BlocksDirtiedPerMessage and BlocksWrittenPerMessage count shared
	// buffers the statement dirtied, and wrote out itself (a backend that
	// writes is one the background writer did not keep up with).
	BlocksDirtiedPerMessage *float64 `json:"shared_blocks_dirtied_per_message"`
	BlocksWrittenPerMessage *float64 `json:"shared_blocks_written_per_message"`
	// Query is the normalized text on one line, shortened.
	Query string `json:"query"`
}

// DefaultStatements is how many statements the profile lists by default.
const DefaultStatements = 10

// statementsHint says how to get a profile when pg_stat_statements is not
// loaded.
const statementsHint = "load it with shared_preload_libraries = 'pg_stat_statements' and restart PostgreSQL; " +
	"the embedded database does with --pg-stat-statements"

// resetStatements prepares the profile: it makes sure the extension exists
// in the database and empties its counters. It reports whether a profile
// can be read at the end; when not, a note says why.
func (p *pgStats) resetStatements(ctx context.Context) bool {
	var version int
	if err := p.conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&version); err != nil {
		p.note("statements: %v", err)
		return false
	}
	if version < 130000 {
		p.note("statements: pg_stat_statements reports execution time and WAL per statement from PostgreSQL 13 on; this server is %d", version)
		return false
	}
	// Only superusers and pg_read_all_settings may read the setting; for
	// the others, the reset below finds out.
	var preload string
	if p.conn.QueryRow(ctx, "SELECT current_setting('shared_preload_libraries')").Scan(&preload) == nil &&
		!listHas(preload, "pg_stat_statements") {
		p.note("statements: pg_stat_statements is not loaded: %s", statementsHint)
		return false
	}
	if _, err := p.conn.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"); err != nil {
		if pgCode(err) == "58P01" { // undefined_file: no such extension on the server
			p.note("statements: this PostgreSQL has no pg_stat_statements (it comes with the server's contrib package)")
		} else {
			p.note("statements: CREATE EXTENSION pg_stat_statements was refused (%v); a superuser can create it in this database", err)
		}
		return false
	}
	if _, err := p.conn.Exec(ctx, benchTag+"SELECT pg_stat_statements_reset()"); err != nil {
		switch pgCode(err) {
		case "55000": // object_not_in_prerequisite_state: not preloaded
			p.note("statements: pg_stat_statements is not loaded: %s", statementsHint)
		case "42501": // insufficient_privilege
			p.note("statements: pg_stat_statements_reset() was refused (%v); a superuser can GRANT EXECUTE on it to this role", err)
		default:
			p.note("statements: reset pg_stat_statements: %v", err)
		}
		return false
	}
	return true
}

// topStatements reads the n statements of the database with the most
// execution time. accepted is the per-message divisor.
func (p *pgStats) topStatements(ctx context.Context, n, accepted int) (*StatementsReport, error) {
	// The window sums run before the LIMIT: they cover every statement.
	rows, err := p.conn.Query(ctx, benchTag+`
		SELECT current_database(), count(*) OVER (), sum(total_exec_time) OVER (),
			calls, total_exec_time, rows, wal_bytes::float8, shared_blks_dirtied, shared_blks_written, query
		FROM pg_stat_statements
		WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
			AND query NOT LIKE $2
		ORDER BY total_exec_time DESC
		LIMIT $1`, n, benchTag+"%")
	if err != nil {
		return nil, fmt.Errorf("read pg_stat_statements: %w", err)
	}
	defer rows.Close()
	rep := &StatementsReport{Top: []Statement{}}
	perMessage := per(accepted)
	for rows.Next() {
		var (
			s                          Statement
			rowCount, dirtied, written int64
			walBytes                   float64
			query                      string
		)
		if err := rows.Scan(&rep.Database, &rep.Distinct, &rep.TotalExecMs,
			&s.Calls, &s.TotalMs, &rowCount, &walBytes, &dirtied, &written, &query); err != nil {
			return nil, fmt.Errorf("read pg_stat_statements: %w", err)
		}
		if s.Calls > 0 {
			s.MeanMs = s.TotalMs / float64(s.Calls)
			s.RowsPerCall = float64(rowCount) / float64(s.Calls)
		}
		if rep.TotalExecMs > 0 {
			s.SharePercent = 100 * s.TotalMs / rep.TotalExecMs
		}
		s.CallsPerMessage = perMessage(float64(s.Calls))
		s.WALBytesPerMessage = perMessage(walBytes)
		s.BlocksDirtiedPerMessage = perMessage(float64(dirtied))
		s.BlocksWrittenPerMessage = perMessage(float64(written))
		s.Query = oneLine(query, maxQueryText)
		rep.Top = append(rep.Top, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read pg_stat_statements: %w", err)
	}
	return rep, nil
}

// benchTag starts the queries the run itself sends while it measures, so
// that the profile leaves them out: pg_stat_statements keeps a
// statement's leading comment in its text.
const benchTag = "/* posthaste bench */ "

// maxQueryText is how much of a statement's text the report keeps: enough
// to recognize it, short enough for one line.
const maxQueryText = 120

// oneLine collapses a statement's whitespace and cuts it to max runes.
func oneLine(q string, max int) string {
	q = strings.Join(strings.Fields(q), " ")
	if r := []rune(q); len(r) > max {
		return string(r[:max-3]) + "..."
	}
	return q
}

// listHas reports whether a comma-separated setting such as
// shared_preload_libraries names v.
func listHas(list, v string) bool {
	for item := range strings.SplitSeq(list, ",") {
		if strings.Trim(strings.TrimSpace(item), `"`) == v {
			return true
		}
	}
	return false
}

func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}
