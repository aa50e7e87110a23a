// Package retention owns the janitor: the background job that empties the
// raw bodies of messages some time after they became final, deletes their
// rows some time later, and removes expired idempotency keys and finished
// webhook deliveries, in small batches, on one instance at a time.
package retention

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/posthaste/posthaste/db"
)

// Defaults for Config.
const (
	DefaultBodyRetention    = 30 * 24 * time.Hour
	DefaultMessageRetention = 90 * 24 * time.Hour
	DefaultInterval         = time.Hour
	DefaultBatchSize        = 500
	DefaultBatchPause       = 50 * time.Millisecond
	DefaultVacuumMinRows    = 10000
)

// Config configures a Janitor.
type Config struct {
	// BodyRetention is how long a message's raw body is kept after the
	// message became final (every recipient delivered, bounced, failed or
	// canceled); then it is emptied and the message marked purged. Negative
	// keeps bodies as long as their messages. Defaults to 30 days.
	BodyRetention time.Duration
	// MessageRetention is how long a final message is kept, with its
	// recipients, attempts, events and idempotency keys; finished webhook
	// deliveries are kept as long after they were created. Negative keeps
	// them for ever. Defaults to 90 days.
	MessageRetention time.Duration
	// Interval is the time between the starts of two runs. Defaults to 1h.
	Interval time.Duration
	// BatchSize is the most rows one transaction purges or deletes.
	// Defaults to 500.
	BatchSize int
	// BatchPause is the pause between two batches of a run, which leaves
	// the database to the hot path for a moment. Negative means none.
	// Defaults to 50ms.
	BatchPause time.Duration
	// VacuumMinRows is how many rows a run must delete or purge before it
	// vacuums the tables it thinned, so their space is reused at once
	// rather than when autovacuum next comes round. Negative never
	// vacuums. Defaults to 10000.
	VacuumMinRows int
	// Logger receives one line per run. Defaults to a discarding logger.
	Logger *slog.Logger
}

// WithDefaults returns cfg with zero fields set to their defaults.
func (cfg Config) WithDefaults() Config {
	if cfg.BodyRetention == 0 {
		cfg.BodyRetention = DefaultBodyRetention
	}
	if cfg.MessageRetention == 0 {
		cfg.MessageRetention = DefaultMessageRetention
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = DefaultBatchSize
	}
	if cfg.BatchPause == 0 {
		cfg.BatchPause = DefaultBatchPause
	}
	if cfg.VacuumMinRows == 0 {
		cfg.VacuumMinRows = DefaultVacuumMinRows
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

// Validate checks a Config after WithDefaults; its errors start with the
// field's name.
func (cfg Config) Validate() error {
	switch {
	case cfg.Interval < 0:
		return fmt.Errorf("Interval must not be negative, got %s", cfg.Interval)
	case cfg.BatchSize < 0:
		return fmt.Errorf("BatchSize must not be negative, got %d", cfg.BatchSize)
	}
	return nil
}

// Counts are the rows one run, or every run so far, purged or deleted.
type Counts struct {
	// BodiesPurged counts messages whose raw body was emptied.
	BodiesPurged int64
	// The rows deleted, per table.
	Messages          int64
	Recipients        int64
	Attempts          int64
	Events            int64
	IdempotencyKeys   int64
	WebhookDeliveries int64
	// Batches counts the transactions that did the work.
	Batches int64
}

// rows is how many rows c touched, for the vacuum threshold.
func (c Counts) rows() int64 {
	return c.BodiesPurged + c.Messages + c.Recipients + c.Attempts + c.Events + c.IdempotencyKeys + c.WebhookDeliveries
}

func (c *Counts) add(o Counts) {
	c.BodiesPurged += o.BodiesPurged
	c.Messages += o.Messages
	c.Recipients += o.Recipients
	c.Attempts += o.Attempts
	c.Events += o.Events
	c.IdempotencyKeys += o.IdempotencyKeys
	c.WebhookDeliveries += o.WebhookDeliveries
	c.Batches += o.Batches
}

// RunStats is what one run did.
type RunStats struct {
	Counts
	// Started is when the run began.
	Started time.Time
	// Duration is how long it took.
	Duration time.Duration
	// Skipped reports that another instance held the retention lock, so
	// this one did nothing.
	Skipped bool
	// Vacuumed reports that the run vacuumed the tables it thinned.
	Vacuumed bool
}

// Stats is what the janitor did since it was made; a metrics exporter reads
// it with Janitor.Stats.
type Stats struct {
	// Runs counts the runs that held the lock; Skipped those that found
	// another instance holding it; Failed the runs that ended on an error
	// other than being stopped (their work up to the error counts in
	// Total).
	Runs    int64
	Skipped int64
	Failed  int64
	// Total adds up the counts of every run.
	Total Counts
	// Last is the latest run, skipped or not.
	Last RunStats
}

// Janitor runs retention every Config.Interval. Instances take turns: each
// run holds a PostgreSQL advisory lock (db.RetentionLockID) for its whole
// length, and a run that finds it taken is skipped.
type Janitor struct {
	cfg   Config
	store *db.DB
	log   *slog.Logger

	mu    sync.Mutex
	stats Stats

	cancel   context.CancelFunc
	done     chan struct{}
	stopOnce sync.Once
}

// New returns a Janitor working on store, not started yet.
func New(cfg Config, store *db.DB) (*Janitor, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("retention config: %w", err)
	}
	if store == nil {
		return nil, errors.New("retention: store is required")
	}
	return &Janitor{cfg: cfg, store: store, log: cfg.Logger}, nil
}

// Start runs the janitor until ctx ends or Stop is called: a first run at
// once, then one every Config.Interval. It returns at once; call it once.
func (j *Janitor) Start(ctx context.Context) {
	ctx, j.cancel = context.WithCancel(ctx)
	j.done = make(chan struct{})
	go func() {
		defer close(j.done)
		j.loop(ctx)
	}()
}

// Stop ends the janitor and waits for it. A batch in flight is rolled back
// and done again by a later run. It is idempotent, and safe before Start.
func (j *Janitor) Stop() {
	j.stopOnce.Do(func() {
		if j.cancel == nil {
			return
		}
		j.cancel()
		<-j.done
	})
}

// Stats returns what the janitor did so far.
func (j *Janitor) Stats() Stats {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.stats
}

func (j *Janitor) loop(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		started := time.Now()
		if _, err := j.RunOnce(ctx); err != nil && ctx.Err() == nil {
			j.log.Warn("retention run failed", "err", err)
		}
		// Runs start Interval apart; a run longer than that is followed
		// at once by the next.
		t.Reset(max(0, j.cfg.Interval-time.Since(started)))
	}
}

// RunOnce runs retention now, if no other instance is: it purges the bodies
// due, deletes the messages due, then finished webhook deliveries and
// expired idempotency keys, each in batches of Config.BatchSize until a
// batch comes back short, and vacuums if it did enough. It returns what it
// did, also on error, and logs one line.
func (j *Janitor) RunOnce(ctx context.Context) (RunStats, error) {
	run := RunStats{Started: time.Now()}
	err := j.run(ctx, &run)
	run.Duration = time.Since(run.Started)

	j.mu.Lock()
	switch {
	case run.Skipped:
		j.stats.Skipped++
	case err != nil && ctx.Err() == nil:
		j.stats.Runs++
		j.stats.Failed++
	default:
		j.stats.Runs++
	}
	j.stats.Total.add(run.Counts)
	j.stats.Last = run
	j.mu.Unlock()

	if run.Skipped {
		j.log.Debug("retention skipped: another instance is running it")
		return run, nil
	}
	if err == nil {
		j.log.Info("retention run",
			"bodies_purged", run.BodiesPurged, "messages", run.Messages, "recipients", run.Recipients,
			"attempts", run.Attempts, "events", run.Events, "idempotency_keys", run.IdempotencyKeys,
			"webhook_deliveries", run.WebhookDeliveries, "batches", run.Batches,
			"vacuumed", run.Vacuumed, "duration", run.Duration.Round(time.Millisecond))
	}
	return run, err
}

func (j *Janitor) run(ctx context.Context, run *RunStats) (err error) {
	lock, ok, err := j.store.TryRetentionLock(ctx)
	if err != nil {
		return err
	}
	if !ok {
		run.Skipped = true
		return nil
	}
	defer func() {
		// Released even when ctx ended, so that another instance can take
		// over at once.
		relCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if relErr := lock.Release(relCtx); relErr != nil && err == nil {
			err = relErr
		}
	}()

	size := j.cfg.BatchSize
	if j.cfg.BodyRetention > 0 {
		p := db.RetentionParams{Age: j.cfg.BodyRetention, Limit: size}
		if err := j.batches(ctx, run, func() (int64, error) {
			n, err := j.store.PurgeMessageBodies(ctx, p)
			run.BodiesPurged += n
			return n, err
		}); err != nil {
			return err
		}
	}
	if j.cfg.MessageRetention > 0 {
		p := db.RetentionParams{Age: j.cfg.MessageRetention, Limit: size}
		if err := j.batches(ctx, run, func() (int64, error) {
			d, err := j.store.DeleteExpiredMessages(ctx, p)
			run.Messages += d.Messages
			run.Recipients += d.Recipients
			run.Attempts += d.Attempts
			run.Events += d.Events
			run.IdempotencyKeys += d.IdempotencyKeys
			return d.Messages, err
		}); err != nil {
			return err
		}
		if err := j.batches(ctx, run, func() (int64, error) {
			n, err := j.store.DeleteFinishedWebhookDeliveries(ctx, p)
			run.WebhookDeliveries += n
			return n, err
		}); err != nil {
			return err
		}
	}
	// Expired keys are already ignored by the intake; deleting them only
	// gives the space back, whatever the retention settings.
	if err := j.batches(ctx, run, func() (int64, error) {
		n, err := j.store.DeleteExpiredIdempotencyKeyBatch(ctx, size)
		run.IdempotencyKeys += n
		return n, err
	}); err != nil {
		return err
	}
	if j.cfg.VacuumMinRows >= 0 && run.rows() > 0 && run.rows() >= int64(j.cfg.VacuumMinRows) {
		if err := j.store.VacuumRetainedTables(ctx); err != nil {
			return err
		}
		run.Vacuumed = true
	}
	return nil
}

// batches calls batch until it handles fewer than a full batch, pausing
// Config.BatchPause between calls.
func (j *Janitor) batches(ctx context.Context, run *RunStats, batch func() (int64, error)) error {
	for {
		n, err := batch()
		if err != nil {
			return err
		}
		if n > 0 {
			run.Batches++
		}
		if n < int64(j.cfg.BatchSize) {
			return nil
		}
		if err := j.pause(ctx); err != nil {
			return err
		}
	}
}

// pause waits Config.BatchPause, or until ctx ends.
func (j *Janitor) pause(ctx context.Context) error {
	if j.cfg.BatchPause <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(j.cfg.BatchPause)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
