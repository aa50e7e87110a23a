// Package service implements MailService, the gRPC API through which mail
// enters Posthaste: it authenticates callers by API key, validates requests
// (refusing bad input before anything is stored), builds the MIME message
// once, honours idempotency keys and maps the stored state back to the API.
// It never talks SMTP; delivery picks committed messages up from the
// database.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/keyenc"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// Server implements posthastev1.MailServiceServer on top of the database.
// Serve it with NewGRPCServer, which supplies the authentication the
// methods rely on.
type Server struct {
	posthastev1.UnimplementedMailServiceServer

	cfg       Config
	log       *slog.Logger
	store     *db.DB
	committer *db.Committer
	keys      *keyCache
	domains   *Domains
	signer    *signer
	requests  *requestLimiter
	onCommit  func()
	// events wakes the event streams; nil when the server serves none.
	events *EventHub
	// health is set by NewGRPCServer; Drain marks it NOT_SERVING.
	health atomic.Pointer[dbHealth]
}

// Drain reports every health service NOT_SERVING from now on, so health
// checking clients and load balancers move away before the listeners close.
// Calls in flight and new calls are still served.
func (s *Server) Drain() {
	if h := s.health.Load(); h != nil {
		h.Shutdown()
	}
}

// Option adds an optional part to a Server.
type Option func(*Server)

// WithEventHub makes the server serve StreamEvents and WatchMessage, woken
// by hub; without it they answer Unimplemented. The caller starts and stops
// hub, and must stop it before a graceful stop of the gRPC server, which
// would otherwise wait for the open streams.
func WithEventHub(hub *EventHub) Option {
	return func(s *Server) { s.events = hub }
}

// New returns a Server storing into store. onCommit, if not nil, is called
// after each newly committed message (not for idempotent replays) so
// delivery can start without waiting for its poll; it must not block.
func New(cfg Config, store *db.DB, onCommit func(), opts ...Option) (*Server, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("service config: %w", err)
	}
	if store == nil {
		return nil, errors.New("service: store is required")
	}
	if onCommit == nil {
		onCommit = func() {}
	}
	committer, err := db.NewCommitter(store, cfg.Intake)
	if err != nil {
		return nil, fmt.Errorf("service config: Intake.%w", err)
	}
	var kek *keyenc.KEK
	if cfg.KeyEncryptionKey != nil {
		// validate has checked the key.
		if kek, err = keyenc.New(cfg.KeyEncryptionKey); err != nil {
			return nil, fmt.Errorf("service config: KeyEncryptionKey: %w", err)
		}
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		store:     store,
		committer: committer,
		keys:      newKeyCache(store, cfg.APIKeyCacheTTL, cfg.Logger),
		domains: NewDomains(store, DomainsConfig{
			KEK: kek, Resolver: cfg.DomainResolver, BounceDomain: cfg.BounceDomain,
			Hostname: cfg.Hostname, KeyGrace: cfg.DKIMKeyGrace,
		}),
		signer:   newSigner(store, kek, cfg.DomainCacheTTL, cfg.AllowUnverifiedDomains),
		requests: newRequestLimiter(cfg.RequestsPerSecond),
		onCommit: onCommit,
	}
	for _, opt := range opts {
		opt(s)
	}
	return s, nil
}

// Start starts what the server runs in the background, the intake's group
// commit and the recording of key use, and returns at once. Sends fail as
// Unavailable until it is called.
func (s *Server) Start(ctx context.Context) {
	s.committer.Start(ctx)
	s.keys.start(ctx)
}

// Stop stores the messages already accepted for the group commit, refuses
// new ones (Unavailable), and records the last key uses. Stop the gRPC
// server first so that no call is cut off. It is idempotent and waits.
func (s *Server) Stop() {
	s.committer.Stop()
	s.keys.stop()
}

// IntakeStats counts the group commit's transactions and messages.
func (s *Server) IntakeStats() db.CommitterStats {
	return s.committer.Stats()
}
