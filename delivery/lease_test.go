package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/pgserver"
	"github.com/posthaste/posthaste/internal/testenv"
)

// hangingDialer blocks every dial until its context ends, and keeps the
// cause: the attempt of a dispatcher talking to a receiver that never
// answers.
type hangingDialer struct {
	entered chan struct{} // receives once per dial
	mu      sync.Mutex
	causes  []error
}

func (h *hangingDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	select {
	case h.entered <- struct{}{}:
	default:
	}
	<-ctx.Done()
	h.mu.Lock()
	h.causes = append(h.causes, context.Cause(ctx))
	h.mu.Unlock()
	return nil, context.Cause(ctx)
}

func (h *hangingDialer) cause() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.causes) == 0 {
		return nil
	}
	return h.causes[0]
}

// TestDispatchCrashedDispatcherLosesItsWork plays a crash: dispatcher A
// claims a recipient and is in the middle of its attempt when it loses its
// database for good, so it can neither renew nor give back its lease. B
// delivers the recipient within about one lease, and A, no longer sure of
// its lease, stops its attempt.
func TestDispatchCrashedDispatcherLosesItsWork(t *testing.T) {
	t.Parallel()
	direct, proxied, proxy := testenv.ProxiedDatabase(t)
	e := newDispatchEnvAt(t, direct)
	srv := testenv.StartSMTP(t)
	e.mx("crash.test", srv)
	id := e.insert(t, time.Time{}, "a@crash.test")

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	storeA, err := db.Open(ctx, proxied)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(storeA.Close)
	hang := &hangingDialer{entered: make(chan struct{}, 1)}
	cfgA := e.config()
	cfgA.InstanceID = "a"
	cfgA.LeaseDuration = 2 * time.Second
	cfgA.Dialer = hang
	cfgA.SMTP.ConnectTimeout = time.Minute
	cfgA.ShutdownTimeout = 5 * time.Second
	a, err := NewDispatcher(cfgA, storeA)
	if err != nil {
		t.Fatal(err)
	}
	a.Start(context.Background())
	t.Cleanup(a.Stop)
	select {
	case <-hang.entered:
	case <-ctx.Done():
		t.Fatal("A never dialed")
	}
	claimed := time.Now()
	proxy.Stop() // A's database is gone: no renewal, no release, no outcome

	cfgB := e.config()
	cfgB.InstanceID = "b"
	cfgB.LeaseDuration = 2 * time.Second
	e.start(t, cfgB)
	m := e.waitMessage(t, id, "B's delivery after A's lease ran out", final)
	t.Logf("delivered %s after A's claim", time.Since(claimed).Round(time.Millisecond))
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 1 {
		t.Fatalf("recipient %+v, want delivered by B", r)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages at the server, want 1", n)
	}
	waitFor(t, 20*time.Second, "A's attempt to stop", func() bool { return hang.cause() != nil })
	if err := hang.cause(); !errors.Is(err, errLeaseExpiring) {
		t.Fatalf("A's attempt ended with %v, want the lease's expiry", err)
	}
}

// TestDispatchLongAttemptKeepsItsLease holds the reply to the end of DATA
// for several leases while a second dispatcher rescues every 100ms: the
// heartbeat keeps the lease, and the message is delivered once.
func TestDispatchLongAttemptKeepsItsLease(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	entered := make(chan struct{}, 1)
	gate := make(chan struct{})
	srv := testenv.StartSMTP(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-gate
		return nil
	}))
	released := false
	defer func() {
		if !released {
			close(gate)
		}
	}()
	e.mx("long.test", srv)
	id := e.insert(t, time.Time{}, "a@long.test")

	cfg := e.config()
	cfg.LeaseDuration = 2 * time.Second
	cfg.SMTP.DataTimeout = time.Minute
	cfg.Retry.InitialInterval, cfg.Retry.MaxInterval = time.Hour, time.Hour
	cfgA, cfgB := cfg, cfg
	cfgA.InstanceID, cfgB.InstanceID = "a", "b"
	e.start(t, cfgA)
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatal("no DATA")
	}
	began := time.Now()
	e.start(t, cfgB)

	conn, err := pgx.Connect(t.Context(), e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	// Renewed past two whole leases from the start of DATA: the attempt has
	// outlived its first lease by more than one lease.
	waitFor(t, 30*time.Second, "the lease to be renewed past two leases", func() bool {
		var until time.Time
		err := conn.QueryRow(t.Context(), `SELECT lease_until FROM recipients r JOIN messages m ON m.id = r.message_id
			WHERE m.id = $1 AND r.status = 'sending'`, id).Scan(&until)
		if errors.Is(err, pgx.ErrNoRows) {
			t.Fatalf("recipient no longer sending: %+v", e.get(t, id).Recipients[0])
		}
		if err != nil {
			t.Fatal(err)
		}
		return until.After(began.Add(2 * cfg.LeaseDuration))
	})
	close(gate)
	released = true

	m := e.waitMessage(t, id, "delivery", final)
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 1 {
		t.Fatalf("recipient %+v", r)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.StatusDelivered {
		t.Fatalf("attempts %+v, want one delivery", m.Attempts)
	}
	if n, mails := len(srv.Messages()), srv.Commands("MAIL"); n != 1 || mails != 1 {
		t.Fatalf("%d messages and %d MAIL commands at the server, want 1 and 1", n, mails)
	}
}

// panickyDialer panics on its first dial and then dials normally.
type panickyDialer struct {
	next Dialer
	once sync.Once
}

func (p *panickyDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	p.once.Do(func() { panic("dialer exploded") })
	return p.next.DialContext(ctx, network, addr)
}

func TestDispatchPanicDefersJob(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t)
	e.mx("panic.test", srv)
	id := e.insert(t, time.Time{}, "a@panic.test")
	var logs logBuffer
	cfg := e.config()
	cfg.Dialer = &panickyDialer{next: e.dialer}
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	d := e.start(t, cfg)

	m := e.waitMessage(t, id, "delivery on the retry", final)
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 2 {
		t.Fatalf("recipient %+v, want delivered at the second attempt", r)
	}
	if len(m.Attempts) != 2 {
		t.Fatalf("attempts %+v, want the internal error and the delivery", m.Attempts)
	}
	if a := m.Attempts[0]; a.Outcome != db.StatusDeferred || a.Code != 451 || a.EnhancedCode != "4.3.0" ||
		a.Text != textInternal || a.Source != db.AttemptSourceLocal {
		t.Fatalf("first attempt %+v, want a local 451 4.3.0 internal error", a)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages at the server", n)
	}
	waitFor(t, 10*time.Second, "the job's lease to be let go", func() bool { return d.leases.count() == 0 })
	out := logs.String()
	if !strings.Contains(out, `level=ERROR msg="delivery: panic while delivering, recipients deferred"`) ||
		!strings.Contains(out, "dialer exploded") || !strings.Contains(out, "goroutine ") {
		t.Fatalf("panic not logged with its stack:\n%s", out)
	}
}

// TestDispatchLogsOutcomesAtInfo checks that final outcomes leave a trace
// at the default log level.
func TestDispatchLogsOutcomesAtInfo(t *testing.T) {
	t.Parallel()
	e := newDispatchEnv(t)
	srv := testenv.StartSMTP(t, testenv.WithRcptReply(func(to string) *smtp.SMTPError {
		if strings.HasPrefix(to, "unknown@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}
		return nil
	}))
	e.mx("log.test", srv)
	id := e.insert(t, time.Time{}, "a@log.test", "unknown@log.test")
	var logs logBuffer
	cfg := e.config()
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	e.start(t, cfg)
	m := e.waitMessage(t, id, "both outcomes", final)

	for _, r := range m.Recipients {
		want := []string{`level=INFO msg="delivery: ` + r.Status + `"`, "message_id=" + id.String(),
			"recipient_id=" + r.ID.String(), "mx_host=mx.log.test"}
		if r.Status == db.StatusBounced {
			want = append(want, "code=550", "enhanced_code=5.1.1")
		} else {
			want = append(want, "code=250")
		}
		// The line is written once the commit has returned, which can be
		// just after the outcome is visible in the database.
		waitFor(t, 10*time.Second, fmt.Sprintf("a log line with %q", want), func() bool {
			return logLineHas(logs.String(), want...)
		})
	}
}

// logLineHas reports whether one line of out contains every part.
func logLineHas(out string, parts ...string) bool {
	for line := range strings.SplitSeq(out, "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return true
		}
	}
	return false
}

// TestDispatchOutcomeSurvivesDatabaseRestart stops a real PostgreSQL between
// the receiver's 250 and the write of the outcome, keeps it stopped past the
// lease, and starts it again: the dispatcher keeps the outcome and writes it
// when the database is back, so the message is received once, the
// recipient ends delivered, and its attempt is recorded.
func TestDispatchOutcomeSurvivesDatabaseRestart(t *testing.T) {
	t.Parallel()
	pgCfg := pgserver.Config{DataDir: reachableDir(t), Port: freePort(t), Database: "posthaste"}
	var pgMu sync.Mutex
	var pg *pgserver.Server
	startPG := func() {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		s, err := pgserver.Start(ctx, pgCfg)
		if errors.Is(err, pgserver.ErrNoBinaries) {
			t.Skip("no PostgreSQL server binaries on this machine")
		}
		if err != nil {
			t.Fatalf("start PostgreSQL: %v", err)
		}
		pgMu.Lock()
		pg = s
		pgMu.Unlock()
	}
	stopPG := func() {
		t.Helper()
		pgMu.Lock()
		s := pg
		pg = nil
		pgMu.Unlock()
		if s == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			t.Errorf("stop PostgreSQL: %v", err)
		}
	}
	startPG()
	t.Cleanup(stopPG) // runs after the dispatcher and the pool are closed
	url := pg.URL()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := db.Migrate(ctx, url); err != nil {
		t.Fatal(err)
	}

	e := newDispatchEnvAt(t, url)
	entered := make(chan struct{}, 1)
	gate := make(chan struct{})
	srv := testenv.StartSMTP(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-gate
		return nil
	}))
	released := false
	defer func() {
		if !released {
			close(gate)
		}
	}()
	e.mx("restart.test", srv)
	id := e.insert(t, time.Time{}, "a@restart.test")
	cfg := e.config()
	cfg.LeaseDuration = 2 * time.Second
	cfg.SMTP.DataTimeout = time.Minute
	d := e.start(t, cfg)
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("no DATA")
	}

	stopPG()
	close(gate) // 250 while the database is down
	released = true
	waitFor(t, 30*time.Second, "the outcome to be kept for the database", func() bool { return d.pendingOutcomes() == 1 })
	startPG()

	m := e.waitMessage(t, id, "the kept outcome to be written", final)
	if r := m.Recipients[0]; r.Status != db.StatusDelivered || r.Attempts != 1 || r.LastCode != 250 {
		t.Fatalf("recipient %+v, want delivered at the first attempt", r)
	}
	if len(m.Attempts) != 1 || m.Attempts[0].Outcome != db.StatusDelivered || m.Attempts[0].MXHost != "mx.restart.test" {
		t.Fatalf("attempts %+v, want the delivery", m.Attempts)
	}
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages at the server, want 1", n)
	}
	if d.pendingOutcomes() != 0 {
		t.Fatal("outcome still kept after it was written")
	}
}

// reachableDir returns a path for a PostgreSQL cluster in a fresh temporary
// directory. When the tests run as root the server runs as another user,
// which must be able to reach the path: testing.T.TempDir makes its parent
// 0700.
func reachableDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if os.Geteuid() == 0 {
		top := filepath.Clean(os.TempDir())
		for p := dir; p != top && p != filepath.Dir(p); p = filepath.Dir(p) {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm()&0o001 == 0 {
				if err := os.Chmod(p, fi.Mode().Perm()|0o011); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	return filepath.Join(dir, "pg")
}

// freePort returns a loopback TCP port that was free a moment ago, so that
// a restarted server comes back at the same address.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestLeaseWatch checks a job's view of its lease without a database:
// renewals keep it, a missing renewal ends it before the lease may run
// out, and a renewal that no longer finds the owner ends it at once.
func TestLeaseWatch(t *testing.T) {
	t.Parallel()
	const length = 600 * time.Millisecond
	l := newLeaseSet(length)
	l.add("kept", time.Now().Add(length), 1)
	l.add("expiring", time.Now().Add(length), 1)
	l.add("lost", time.Now().Add(length), 2)
	l.add("none", time.Now(), 0)
	kept, expiring, lost := l.watch("kept"), l.watch("expiring"), l.watch("lost")
	defer kept.stop()
	defer expiring.stop()
	defer lost.stop()
	if l.count() != 3 {
		t.Fatalf("%d owners held, want 3 (a claim without jobs holds nothing)", l.count())
	}

	// Renew kept only, until expiring has run out; lost is found gone.
	l.renewed([]string{"kept", "lost"}, map[string]int{"kept": 1}, time.Now())
	if !lost.lost() || lost.ctx.Err() == nil {
		t.Fatal("lost owner's watch still running")
	}
	waitFor(t, 5*time.Second, "the unrenewed lease to end", func() bool {
		l.renewed([]string{"kept"}, map[string]int{"kept": 1}, time.Now())
		return expiring.ctx.Err() != nil
	})
	if err := context.Cause(expiring.ctx); !errors.Is(err, errLeaseExpiring) {
		t.Fatalf("cause %v, want errLeaseExpiring", err)
	}
	if kept.ctx.Err() != nil {
		t.Fatalf("renewed lease ended: %v", context.Cause(kept.ctx))
	}
	if got := l.toRenew(time.Now()); len(got) != 2 {
		t.Fatalf("to renew %v, want kept and expiring (not the lost one)", got)
	}

	// A renewal that finds no rows while a job of the owner is writing its
	// outcome raced with that commit: the lease is not taken for lost.
	l.add("recording", time.Now().Add(length), 1)
	recording := l.watch("recording")
	defer recording.stop()
	l.recordingStarted("recording")
	l.renewed([]string{"recording"}, map[string]int{}, time.Now())
	if recording.lost() {
		t.Fatal("owner writing its outcome taken for lost")
	}
	l.recordingEnded("recording")
	l.renewed([]string{"recording"}, map[string]int{}, time.Now())
	if !recording.lost() {
		t.Fatal("owner with no rows and no outcome in flight not taken for lost")
	}

	// An attempt stuck past its cap stops the renewal of its owner.
	j := &job{owner: "kept"}
	l.attempting(j, time.Now().Add(-time.Millisecond))
	for _, o := range l.toRenew(time.Now()) {
		if o == "kept" {
			t.Fatal("owner of a stuck attempt still renewed")
		}
	}
	l.attempted(j)
	l.release("kept")
	l.release("expiring")
	l.release("lost")
	l.release("lost")
	l.release("recording")
	if l.count() != 0 {
		t.Fatalf("%d owners held after every release", l.count())
	}
}

// A job's recipients go out in the order the caller gave them, whatever
// order the claim returned them in.
func TestGroupJobsKeepsRecipientOrder(t *testing.T) {
	t.Parallel()
	msg := uuid.New()
	var claimed []db.ClaimedRecipient
	for _, pos := range []int{3, 1, 2, 0} {
		claimed = append(claimed, db.ClaimedRecipient{ID: uuid.New(), MessageID: msg, Domain: "example.test",
			Position: pos, Address: fmt.Sprintf("r%d@example.test", pos)})
	}
	jobs, missing := groupJobs(claimed, map[uuid.UUID]db.MessageContent{msg: {ID: msg}}, "owner", 3)
	if len(missing) != 0 || len(jobs) != 2 {
		t.Fatalf("jobs %d, missing %d; want 2 jobs", len(jobs), len(missing))
	}
	var got []int
	for _, j := range jobs {
		for _, r := range j.rcpts {
			got = append(got, r.Position)
		}
	}
	if !slices.Equal(got, []int{0, 1, 2, 3}) {
		t.Errorf("positions in send order = %v, want 0 1 2 3", got)
	}
}
