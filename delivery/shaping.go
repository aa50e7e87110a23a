package delivery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"
)

// ShapingConfig configures traffic shaping per destination provider: the
// limits apply to every MX host of a provider together, whatever recipient
// domain led to it (see Provider and docs/deliverability.md).
type ShapingConfig struct {
	// Providers replace or extend the built-in table (see BuildProviders).
	// Defaults to none: DefaultProviders only.
	Providers []Provider
	// NoDefaultProviders starts from an empty table instead of
	// DefaultProviders. Defaults to false.
	NoDefaultProviders bool
	// Instances divides each provider's Connections and PerMinute (rounded
	// up, at least 1): the limits are a provider's total over every
	// instance sharing the database, and each instance enforces its share
	// on its own. Defaults to 1.
	Instances int
	// MaxWait is the longest a transaction waits, inside its lease, for a
	// provider's connection or rate limit. A transaction that would wait
	// longer is held back: its recipients go back to the queue, due after
	// the wait, without counting an attempt. Defaults to 5s.
	MaxWait time.Duration
	// HoldDelay is how long a recipient held back for want of a
	// connection waits before it is due again (the rate limit computes its
	// own). Defaults to 10s.
	HoldDelay time.Duration
	// BackoffInterval is the least time between two slowdowns of one
	// provider: the replies of the sessions that were already open when the
	// first rate-limit reply came are one signal, not many. Defaults to 10s.
	BackoffInterval time.Duration
	// RecoverInterval is how often a slowed-down provider gets a tenth of
	// its limits back while it sends no rate-limit reply. Defaults to 30s.
	RecoverInterval time.Duration
}

// WithDefaults returns c with zero fields set to their defaults.
func (c ShapingConfig) WithDefaults() ShapingConfig {
	if c.Instances == 0 {
		c.Instances = 1
	}
	if c.MaxWait == 0 {
		c.MaxWait = 5 * time.Second
	}
	if c.HoldDelay == 0 {
		c.HoldDelay = 10 * time.Second
	}
	if c.BackoffInterval == 0 {
		c.BackoffInterval = 10 * time.Second
	}
	if c.RecoverInterval == 0 {
		c.RecoverInterval = 30 * time.Second
	}
	return c
}

func (c ShapingConfig) validate() error {
	switch {
	case c.Instances < 1:
		return errors.New("Instances: must be at least 1")
	case c.MaxWait < 0:
		return errors.New("MaxWait: must not be negative")
	case c.HoldDelay <= 0:
		return errors.New("HoldDelay: must be positive")
	case c.BackoffInterval <= 0:
		return errors.New("BackoffInterval: must be positive")
	case c.RecoverInterval <= 0:
		return errors.New("RecoverInterval: must be positive")
	}
	_, err := c.providers()
	return err
}

// providers is the table the configuration describes.
func (c ShapingConfig) providers() ([]Provider, error) {
	var base []Provider
	if !c.NoDefaultProviders {
		base = DefaultProviders()
	}
	ps, err := BuildProviders(base, c.Providers)
	if err != nil {
		return nil, fmt.Errorf("Providers: %w", err)
	}
	if _, err := newProviderTable(ps); err != nil {
		return nil, fmt.Errorf("Providers: %w", err)
	}
	return ps, nil
}

// shaper decides, after routing, whether a transaction may go to its
// destination now. It sits after the MX lookup because only the MX hosts
// say which provider a domain belongs to.
type shaper interface {
	// admit returns the lane of targets' provider, nil when no limits
	// apply, once the provider's rate allows one more transaction. It
	// returns a *heldError when that takes longer than the configured wait.
	admit(ctx context.Context, targets []target) (*lane, error)
	// connect takes one of l's connection slots and returns the function
	// that gives it back. When all are taken it closes an idle pooled
	// connection of the provider and waits for a change, then returns
	// errLaneChanged so that the caller looks at the pool again; it
	// returns a *heldError once MaxWait has passed since since.
	connect(ctx context.Context, l *lane, since time.Time) (release func(), err error)
	// observe tells the shaper how a session with l's provider went: a
	// rate-limit reply slows the provider down.
	observe(l *lane, e *SMTPError)
}

// heldError says a transaction was not started because of a provider's
// limits. It is no attempt: the recipients go back to the queue, due
// after After, with their attempt count unchanged.
type heldError struct {
	Provider string
	After    time.Duration
	Why      string
}

func (e *heldError) Error() string {
	return fmt.Sprintf("held back by the limits of provider %s (%s) for %s", e.Provider, e.Why, e.After)
}

// lane is the shaping state of one provider in this process.
type lane struct {
	name  string
	limit ProviderLimits

	mu sync.Mutex
	// open counts connections open to the provider, idle ones included.
	open int
	// freed is closed and replaced whenever a connection slot is given
	// back or the limits rise, waking every waiter to look again.
	freed chan struct{}
	// tat is the theoretical arrival time of the rate limit (GCRA): the
	// time by which every transaction admitted so far would have been
	// sent at the allowed rate.
	tat time.Time
	// factor scales the limits, 1 when the provider is not slowed down
	// (see slowDown and recover).
	factor float64
	// changed is when factor last went down, or up.
	changed time.Time
	cut     time.Time
}

// providerShaper is the shaper of a Dispatcher: one lane per provider of
// an immutable table.
type providerShaper struct {
	cfg   ShapingConfig
	table providerTable
	lanes []*lane
	now   func() time.Time
	// evict closes one idle pooled connection whose host is in the given
	// provider's lane and reports whether there was one.
	evict func(match func(host string) bool) bool
}

func newProviderShaper(cfg ShapingConfig, evict func(match func(host string) bool) bool) (*providerShaper, error) {
	cfg = cfg.WithDefaults()
	ps, err := cfg.providers()
	if err != nil {
		return nil, err
	}
	table, err := newProviderTable(ps)
	if err != nil {
		return nil, err
	}
	s := &providerShaper{cfg: cfg, table: table, now: time.Now, evict: evict}
	for _, p := range ps {
		lim := p.Limits
		lim.Connections = share(lim.Connections, cfg.Instances)
		lim.PerMinute = share(lim.PerMinute, cfg.Instances)
		s.lanes = append(s.lanes, &lane{name: p.Name, limit: lim, freed: make(chan struct{}), factor: 1})
	}
	return s, nil
}

// providerName names host's provider, "other" when the table has none.
func (s *providerShaper) providerName(host string) string {
	if i := s.table.lookup(host); i >= 0 {
		return s.lanes[i].name
	}
	return "other"
}

// share is one instance's part of a limit, rounded up so that no instance
// is left without any; 0 (no limit) stays 0.
func share(limit, instances int) int {
	if limit == 0 {
		return 0
	}
	return max(1, (limit+instances-1)/instances)
}

// laneOf returns the lane of the provider of targets' first host: an
// attempt goes to the hosts of one domain, which belong to one provider
// (a domain whose MX hosts span providers counts against the first).
func (s *providerShaper) laneOf(targets []target) *lane {
	if len(targets) == 0 {
		return nil
	}
	i := s.table.lookup(targets[0].Host)
	if i < 0 {
		return nil
	}
	return s.lanes[i]
}

func (s *providerShaper) admit(ctx context.Context, targets []target) (*lane, error) {
	l := s.laneOf(targets)
	if l == nil {
		return nil, nil
	}
	wait, ok := l.reserve(s.now(), s.cfg)
	if !ok {
		return nil, &heldError{Provider: l.name, After: wait, Why: "messages per minute"}
	}
	if wait > 0 {
		timer := time.NewTimer(wait)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	return l, nil
}

// reserve takes a place in l's rate and says how long to wait for it; ok
// is false, and nothing is taken, when the wait would exceed MaxWait.
func (l *lane) reserve(now time.Time, cfg ShapingConfig) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recover(now, cfg)
	if l.limit.PerMinute == 0 {
		return 0, true
	}
	rate := float64(l.limit.PerMinute) / 60 * l.factor // per second
	interval := time.Duration(float64(time.Second) / rate)
	// A burst of up to a tenth of a minute's allowance may start at once.
	burst := max(1, int(float64(l.limit.PerMinute)*l.factor/10))
	tolerance := time.Duration(burst-1) * interval
	tat := l.tat
	if tat.Before(now) {
		tat = now
	}
	wait := tat.Sub(now) - tolerance
	if wait > cfg.MaxWait {
		return wait, false
	}
	l.tat = tat.Add(interval)
	return max(0, wait), true
}

// connCap is l's connection limit as slowed down, 0 for none. l.mu is held.
func (l *lane) connCap() int {
	if l.limit.Connections == 0 {
		return 0
	}
	return max(1, int(math.Ceil(float64(l.limit.Connections)*l.factor)))
}

func (s *providerShaper) connect(ctx context.Context, l *lane, since time.Time) (func(), error) {
	l.mu.Lock()
	l.recover(s.now(), s.cfg)
	if c := l.connCap(); c == 0 || l.open < c {
		l.open++
		l.mu.Unlock()
		var once sync.Once
		return func() { once.Do(l.release) }, nil
	}
	freed := l.freed
	l.mu.Unlock()
	left := s.cfg.MaxWait - time.Since(since)
	if left <= 0 {
		return nil, &heldError{Provider: l.name, After: s.cfg.HoldDelay, Why: "connections"}
	}
	// Every slot is taken. An idle connection to one of the provider's
	// hosts is worth less than this transaction: close one, and its slot
	// comes back when it is closed.
	if s.evict != nil {
		s.evict(s.matcher(l))
	}
	timer := time.NewTimer(left)
	defer timer.Stop()
	select {
	case <-freed:
		return nil, errLaneChanged
	case <-timer.C:
		return nil, &heldError{Provider: l.name, After: s.cfg.HoldDelay, Why: "connections"}
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// errLaneChanged says a lane's connections changed while connect waited:
// one was closed, or came back idle to the pool, where the caller may find
// one for its own host. The caller looks again.
var errLaneChanged = errors.New("provider connections changed")

// returned wakes the transactions waiting for l's connections: one just
// went back to the pool.
func (l *lane) returned() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.wakeLocked()
}

// overCap reports whether more connections are open than l allows now,
// as after a slowdown: a connection coming back from a transaction is then
// closed rather than kept idle.
func (l *lane) overCap() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.connCap()
	return c > 0 && l.open > c
}

func (l *lane) release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	l.wakeLocked()
}

func (l *lane) wakeLocked() {
	close(l.freed)
	l.freed = make(chan struct{})
}

// minFactor is the furthest a provider is slowed down: a sixteenth of its
// limits (and never below one connection and one message per minute).
const minFactor = 1.0 / 16

// recoverStep is what a provider gets back of its limits per
// RecoverInterval without a rate-limit reply: additive increase.
const recoverStep = 0.1

func (s *providerShaper) observe(l *lane, e *SMTPError) {
	if l == nil || e == nil || !isRateLimitReply(e) {
		return
	}
	l.mu.Lock()
	l.slowDown(s.now(), s.cfg)
	excess := 0
	if c := l.connCap(); c > 0 {
		excess = l.open - c
	}
	l.mu.Unlock()
	// Idle connections over the lowered cap are closed now rather than
	// kept until they time out: the provider counts them.
	for ; excess > 0 && s.evict != nil; excess-- {
		if !s.evict(s.matcher(l)) {
			break
		}
	}
}

// matcher reports whether a host belongs to l's provider.
func (s *providerShaper) matcher(l *lane) func(host string) bool {
	return func(host string) bool {
		i := s.table.lookup(host)
		return i >= 0 && s.lanes[i] == l
	}
}

// isRateLimitReply reports whether e is the receiver asking us to slow
// down: 421 (service not available, closing; what receivers say when a
// sender opens too many connections) or any reply the bounce table
// classifies as a rate limit (4.7.x throttling texts, Yahoo's TSS codes,
// 4.4.5).
func isRateLimitReply(e *SMTPError) bool {
	if !e.Remote {
		return false
	}
	return e.Code == 421 || ClassifySMTPError(e).Class == BounceRateLimit
}

// slowDown halves l's limits (multiplicative decrease), at most once per
// BackoffInterval. l.mu is held.
func (l *lane) slowDown(now time.Time, cfg ShapingConfig) {
	l.recover(now, cfg)
	if !l.cut.IsZero() && now.Sub(l.cut) < cfg.BackoffInterval {
		return
	}
	l.factor = max(minFactor, l.factor/2)
	l.cut, l.changed = now, now
	// The rate restarts from now at the lower pace rather than owing the
	// burst the old pace allowed.
	if l.tat.Before(now) {
		l.tat = now
	}
}

// recover gives l back recoverStep of its limits for every RecoverInterval
// since they last changed (additive increase). l.mu is held.
func (l *lane) recover(now time.Time, cfg ShapingConfig) {
	if l.factor >= 1 {
		return
	}
	steps := int(now.Sub(l.changed) / cfg.RecoverInterval)
	if steps <= 0 {
		return
	}
	l.factor = min(1, l.factor+float64(steps)*recoverStep)
	l.changed = l.changed.Add(time.Duration(steps) * cfg.RecoverInterval)
	l.wakeLocked()
}

// laneStats is a lane's state, for tests and logs.
type laneStats struct {
	Open    int
	ConnCap int
	Factor  float64
}

func (l *lane) stats(now time.Time, cfg ShapingConfig) laneStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recover(now, cfg)
	return laneStats{Open: l.open, ConnCap: l.connCap(), Factor: l.factor}
}

// slotToken is one provider connection slot, taken before a connection is
// dialed and given back once nothing holds it: neither the dial in
// progress nor a connection dialed with it. Counting references rather
// than tying the slot to one connection keeps it held across the second
// dial of a STARTTLS fallback.
type slotToken struct {
	mu      sync.Mutex
	refs    int
	release func()
}

func newSlotToken(release func()) *slotToken { return &slotToken{refs: 1, release: release} }

func (t *slotToken) add() {
	t.mu.Lock()
	t.refs++
	t.mu.Unlock()
}

func (t *slotToken) drop() {
	t.mu.Lock()
	t.refs--
	last := t.refs == 0
	t.mu.Unlock()
	if last {
		t.release()
	}
}

// slotKey carries a dial's slot token to the dialer.
type slotKey struct{}

func withSlot(ctx context.Context, t *slotToken) context.Context {
	return context.WithValue(ctx, slotKey{}, t)
}

// slotDialer ties each connection dialed under a slot token to it, so the
// slot is held exactly as long as the provider sees a connection from us:
// in a transaction, idle in the pool, or waiting for the reply to QUIT.
type slotDialer struct {
	inner Dialer
}

func (d slotDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := d.inner.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	t, _ := ctx.Value(slotKey{}).(*slotToken)
	if t == nil {
		return c, nil
	}
	t.add()
	return &slotConn{Conn: c, token: t}, nil
}

// slotConn drops its slot token when closed, once however often Close is
// called.
type slotConn struct {
	net.Conn
	token *slotToken
	once  sync.Once
	err   error
}

// slotLinger bounds how long Close waits for the server to close its side.
const slotLinger = time.Second

// Close closes the connection and gives its slot back once the server has
// closed its side too, or after slotLinger. A receiver counts our
// connection until it sees it end: giving the slot back as soon as our
// side is closed would let the next dial reach it while it still counts
// the last one, one over the limit. So the write side is shut first (a
// FIN, which a server reading the next command takes as the end), and the
// read side is drained until the server's FIN.
func (c *slotConn) Close() error {
	c.once.Do(func() {
		defer c.token.drop()
		if hc, ok := c.Conn.(interface{ CloseWrite() error }); ok && hc.CloseWrite() == nil {
			c.Conn.SetReadDeadline(time.Now().Add(slotLinger))
			io.Copy(io.Discard, io.LimitReader(c.Conn, 64<<10))
		}
		c.err = c.Conn.Close()
	})
	return c.err
}
