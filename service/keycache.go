package service

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
)

const (
	// keyCacheMaxEntries bounds the cache: only keys that exist are cached,
	// so this is about the number of keys in live use, not of guesses.
	keyCacheMaxEntries = 10000
	// keyTouchInterval is how often the use of keys is written to the
	// database; LastUsedAt is promised to the minute.
	keyTouchInterval = 30 * time.Second
)

// keyCache looks API keys up at most once per ttl per key, so that
// authentication costs no round trip on most calls, and records their use
// in the background. Concurrent misses of one key share one lookup. Only
// keys that were found are kept: an unknown or revoked key is looked up
// every time, and a revoked key is refused at most ttl after revocation.
type keyCache struct {
	store *db.DB
	ttl   time.Duration
	log   *slog.Logger
	now   func() time.Time

	mu      sync.Mutex
	entries map[[32]byte]*keyEntry
	used    map[uuid.UUID]struct{}

	stopOnce sync.Once
	stopCh   chan struct{}
	done     chan struct{}
	started  bool
}

// keyEntry is a cached key, or a lookup of it in flight (ready open).
type keyEntry struct {
	ready   chan struct{}
	key     db.APIKey
	err     error
	expires time.Time
}

func newKeyCache(store *db.DB, ttl time.Duration, logger *slog.Logger) *keyCache {
	return &keyCache{
		store:   store,
		ttl:     ttl,
		log:     logger,
		now:     time.Now,
		entries: map[[32]byte]*keyEntry{},
		used:    map[uuid.UUID]struct{}{},
		stopCh:  make(chan struct{}),
		done:    make(chan struct{}),
	}
}

// lookup returns the active key with the given SHA-256 hash, or an error
// wrapping db.ErrNotFound.
func (c *keyCache) lookup(ctx context.Context, hash []byte) (db.APIKey, error) {
	if c.ttl < 0 {
		k, err := c.store.LookupAPIKey(ctx, hash)
		if err == nil {
			c.markUsed(k.ID)
		}
		return k, err
	}
	var h [32]byte
	copy(h[:], hash)
	now := c.now()
	c.mu.Lock()
	e, ok := c.entries[h]
	if ok && e.ready == nil && now.Before(e.expires) {
		c.used[e.key.ID] = struct{}{}
		c.mu.Unlock()
		return e.key, nil
	}
	if ok && e.ready != nil {
		// Someone is looking this key up already; share the answer.
		ready := e.ready
		c.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			return db.APIKey{}, ctx.Err()
		}
		if e.err != nil {
			return db.APIKey{}, e.err
		}
		c.markUsed(e.key.ID)
		return e.key, nil
	}
	e = &keyEntry{ready: make(chan struct{})}
	c.entries[h] = e
	c.mu.Unlock()

	// The lookup belongs to every waiter, so it must not end with the first
	// caller's cancellation.
	k, err := c.store.LookupAPIKey(context.WithoutCancel(ctx), hash)
	c.mu.Lock()
	e.key, e.err, e.expires = k, err, c.now().Add(c.ttl)
	if err != nil || len(c.entries) > keyCacheMaxEntries && !c.sweep(now) {
		delete(c.entries, h)
	}
	if err == nil {
		c.used[k.ID] = struct{}{}
	}
	ready := e.ready
	e.ready = nil
	c.mu.Unlock()
	close(ready)
	return k, err
}

// sweep drops expired entries and reports whether there is room again.
// c.mu is held.
func (c *keyCache) sweep(now time.Time) bool {
	for h, e := range c.entries {
		if e.ready == nil && !now.Before(e.expires) {
			delete(c.entries, h)
		}
	}
	return len(c.entries) <= keyCacheMaxEntries
}

// forget drops the key with id, so that its next use is looked up.
func (c *keyCache) forget(id uuid.UUID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for h, e := range c.entries {
		if e.ready == nil && e.key.ID == id {
			delete(c.entries, h)
		}
	}
}

func (c *keyCache) markUsed(id uuid.UUID) {
	c.mu.Lock()
	c.used[id] = struct{}{}
	c.mu.Unlock()
}

// start begins writing key use every keyTouchInterval.
func (c *keyCache) start(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return
	}
	c.started = true
	ctx = context.WithoutCancel(ctx)
	go func() {
		defer close(c.done)
		t := time.NewTicker(keyTouchInterval)
		defer t.Stop()
		for {
			select {
			case <-c.stopCh:
				c.touch(ctx)
				return
			case <-t.C:
				c.touch(ctx)
			}
		}
	}()
}

// stop writes the last uses and waits. It is idempotent.
func (c *keyCache) stop() {
	c.stopOnce.Do(func() {
		close(c.stopCh)
		c.mu.Lock()
		started := c.started
		c.mu.Unlock()
		if started {
			<-c.done
		}
	})
}

// touch writes the uses gathered since the last time. A failed write is
// only logged: LastUsedAt is informational, and the next use records it.
func (c *keyCache) touch(ctx context.Context) {
	c.mu.Lock()
	if len(c.used) == 0 {
		c.mu.Unlock()
		return
	}
	ids := make([]uuid.UUID, 0, len(c.used))
	for id := range c.used {
		ids = append(ids, id)
	}
	clear(c.used)
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.store.TouchAPIKeys(ctx, ids); err != nil {
		c.log.WarnContext(ctx, "record api key use", "keys", len(ids), "error", err)
	}
}
