// Package statskeeper keeps the planner's statistics of the outbox tables
// current when autovacuum has not: on a fresh install before autovacuum's
// first visit, and on a server that runs with autovacuum off. See
// db.AnalyzeStale for why plans depend on it.
package statskeeper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Defaults for Config.
const (
	DefaultInterval   = 10 * time.Second
	DefaultMinChanged = 1000
	// DefaultFraction is twice the share at which autovacuum analyzes these
	// tables (migration 00016 sets 5%). It applies only where autovacuum
	// cannot be counted on (see db.AnalyzeStale): with autovacuum on, the
	// keeper analyzes a table once, before autovacuum's first visit, and
	// afterwards only if autovacuum falls three rounds behind.
	DefaultFraction = 0.1
)

// Store is the database side.
type Store interface {
	AnalyzeStale(ctx context.Context, minChanged int64, fraction float64) ([]string, error)
}

// Config configures a Keeper.
type Config struct {
	// Interval is how often the tables are checked; the check is one
	// small query. Negative turns the keeper off. Defaults to 10s.
	Interval time.Duration
	// MinChanged is how many rows must have changed since a table's last
	// ANALYZE, at least, before the keeper analyzes it. Defaults to 1000.
	MinChanged int64
	// Fraction is the share of a table's rows that must have changed
	// since its last ANALYZE. Defaults to 0.1.
	Fraction float64
	// Logger receives a line for each table analyzed. Defaults to
	// discarding.
	Logger *slog.Logger
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.MinChanged == 0 {
		c.MinChanged = DefaultMinChanged
	}
	if c.Fraction == 0 {
		c.Fraction = DefaultFraction
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports the first problem with c after defaults; the error
// starts with the field's name.
func (c Config) Validate() error {
	c = c.WithDefaults()
	switch {
	case c.MinChanged < 1:
		return fmt.Errorf("MinChanged: must be at least 1, got %d", c.MinChanged)
	case c.Fraction < 0:
		return fmt.Errorf("Fraction: must not be negative, got %g", c.Fraction)
	}
	return nil
}

// Keeper analyzes stale outbox tables in the background.
type Keeper struct {
	cfg   Config
	store Store

	cancel   context.CancelFunc
	done     chan struct{}
	stopOnce sync.Once
}

// New returns a Keeper; Start runs it.
func New(cfg Config, store Store) (*Keeper, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("statistics keeper config: %w", err)
	}
	return &Keeper{cfg: cfg.WithDefaults(), store: store}, nil
}

// Start checks the tables at once, then every Interval, until Stop or ctx
// ends. It does nothing when Interval is negative.
func (k *Keeper) Start(ctx context.Context) {
	if k.cfg.Interval < 0 {
		return
	}
	ctx, k.cancel = context.WithCancel(ctx)
	k.done = make(chan struct{})
	go func() {
		defer close(k.done)
		t := time.NewTimer(0)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			k.RunOnce(ctx)
			t.Reset(k.cfg.Interval)
		}
	}()
}

// RunOnce checks the tables and analyzes the stale ones.
func (k *Keeper) RunOnce(ctx context.Context) []string {
	analyzed, err := k.store.AnalyzeStale(ctx, k.cfg.MinChanged, k.cfg.Fraction)
	for _, table := range analyzed {
		k.cfg.Logger.Info("statistics: analyzed a table whose statistics were missing or stale", "table", table)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		k.cfg.Logger.Warn("statistics: checking the outbox tables failed; the next check retries", "err", err)
	}
	return analyzed
}

// Stop ends the keeper and waits for it; an ANALYZE in flight is canceled.
// It is idempotent, and safe before Start.
func (k *Keeper) Stop() {
	k.stopOnce.Do(func() {
		if k.cancel == nil {
			return
		}
		k.cancel()
		<-k.done
	})
}
