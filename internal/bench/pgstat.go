package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgStats reads the counters of the PostgreSQL server behind a database
// URL: the CPU of its process tree, its WAL activity, and the flushes of
// the disk that holds its data directory.
type pgStats struct {
	conn *pgx.Conn
	// postmaster is the server's root process, 0 when it is not visible
	// from here (another machine or container).
	postmaster int
	// device is the block device of the data directory, when known.
	devMajor, devMinor uint32
	devKnown           bool
	// notes say what could not be measured and why.
	notes []string
}

// pgSnapshot is one reading of the counters; a nil field was not measured.
type pgSnapshot struct {
	cpu      *time.Duration
	walSync  *int64
	walWrite *int64
	walBytes *int64
	disk     string
	flushes  *int64
}

// openPGStats connects to the server. The postmaster is found as the parent
// of this connection's backend process (pg_backend_pid()), which needs no
// privilege and works for any server on this machine, embedded or not.
func openPGStats(ctx context.Context, url string) (*pgStats, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("connect to postgresql for statistics: %w", err)
	}
	p := &pgStats{conn: conn}
	var backend int
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&backend); err != nil {
		_ = conn.Close(ctx)
		return nil, fmt.Errorf("query backend pid: %w", err)
	}
	if t, err := readProcTimes(backend); err != nil {
		p.notes = append(p.notes, fmt.Sprintf("postgresql cpu: backend pid %d is not visible in /proc (server on another machine or in another pid namespace)", backend))
	} else if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", t.ppid)); !strings.HasPrefix(string(comm), "post") {
		p.notes = append(p.notes, fmt.Sprintf("postgresql cpu: the parent of backend %d is %q, not the postmaster", backend, strings.TrimSpace(string(comm))))
	} else {
		p.postmaster = t.ppid
	}
	var dataDir string
	if err := conn.QueryRow(ctx, "SELECT current_setting('data_directory')").Scan(&dataDir); err != nil {
		p.notes = append(p.notes, fmt.Sprintf("disk flushes: data_directory is not readable for this role (needs pg_read_all_settings): %v", err))
	} else if major, minor, err := deviceOf(dataDir); err != nil {
		p.notes = append(p.notes, fmt.Sprintf("disk flushes: %v", err))
	} else {
		p.devMajor, p.devMinor, p.devKnown = major, minor, true
	}
	return p, nil
}

// readProcesses fills the counters that belong to the machine: the CPU of
// the server's processes and the disk's flushes. They are current at once,
// unlike the WAL counters.
func (p *pgStats) readProcesses(s *pgSnapshot) {
	if p.postmaster != 0 {
		if cpu, err := TreeCPU(p.postmaster); err == nil {
			s.cpu = &cpu
		} else {
			p.note("postgresql cpu: %v", err)
		}
	}
	if p.devKnown {
		name, n, err := DiskFlushes(p.devMajor, p.devMinor)
		if err == nil {
			s.disk, s.flushes = name, &n
		} else {
			p.note("disk flushes: %v", err)
		}
	}
}

// readWAL fills the WAL counters. pg_stat_wal (PostgreSQL 14+) is
// cluster-wide; the LSN gives the exact WAL volume, while the sync and
// write counts are what backends and the WAL writer reported so far (see
// Config.StatsSettle).
func (p *pgStats) readWAL(ctx context.Context, s *pgSnapshot) {
	var sync, write, bytes int64
	err := p.conn.QueryRow(ctx, benchTag+`SELECT wal_sync, wal_write,
		pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint FROM pg_stat_wal`).Scan(&sync, &write, &bytes)
	if err != nil {
		p.note("wal: %v", err)
		return
	}
	s.walSync, s.walWrite, s.walBytes = &sync, &write, &bytes
}

// note records a problem once.
func (p *pgStats) note(format string, args ...any) {
	n := fmt.Sprintf(format, args...)
	for _, have := range p.notes {
		if have == n {
			return
		}
	}
	p.notes = append(p.notes, n)
}

func (p *pgStats) close(ctx context.Context) error {
	if err := p.conn.Close(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("close statistics connection: %w", err)
	}
	return nil
}
