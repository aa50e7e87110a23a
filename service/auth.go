package service

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/db"
)

// authMetadataKey carries the API key. The REST gateway forwards the HTTP
// Authorization header under the same name.
const authMetadataKey = "authorization"

// principalKey is the context key under which an authenticated call
// carries its caller.
type principalKey struct{}

// principal is who is calling: an API key, its project and its scopes.
type principal struct {
	keyID     uuid.UUID
	projectID uuid.UUID
	key       db.APIKey
}

// withPrincipal returns ctx carrying the caller's key.
func withPrincipal(ctx context.Context, k db.APIKey) context.Context {
	return context.WithValue(ctx, principalKey{}, principal{keyID: k.ID, projectID: k.ProjectID, key: k})
}

// principalFrom returns the caller put in ctx by authentication.
func principalFrom(ctx context.Context) (principal, bool) {
	p, ok := ctx.Value(principalKey{}).(principal)
	return p, ok
}

// requireScope returns the caller when its key has scope, failing closed
// when a handler is reached without authentication (a wiring mistake, not
// a caller's). Every handler starts with it: the project it returns is the
// only one the handler may touch.
func requireScope(ctx context.Context, scope string) (principal, error) {
	p, ok := principalFrom(ctx)
	if !ok || p.projectID == uuid.Nil {
		return principal{}, &unauthenticatedError{reason: "missing API key"}
	}
	if !p.key.HasScope(scope) {
		return principal{}, &permissionDeniedError{scope: scope}
	}
	return p, nil
}

// authenticator checks the bearer key in incoming metadata against the
// database, through a cache.
type authenticator struct {
	keys *keyCache
	// requests limits each key's calls per second; nil limits none.
	requests *requestLimiter
}

// authenticate returns ctx carrying the caller's key, project and scopes.
func (a authenticator) authenticate(ctx context.Context) (context.Context, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get(authMetadataKey)
	if len(values) == 0 {
		return nil, &unauthenticatedError{reason: "missing API key (authorization: Bearer <key>)"}
	}
	if len(values) > 1 {
		return nil, &unauthenticatedError{reason: "more than one authorization value"}
	}
	k, err := a.lookup(ctx, values[0])
	if err != nil {
		return nil, err
	}
	if a.requests != nil {
		// Every authenticated call counts, REST and gRPC alike: both come
		// through here once.
		if err := a.requests.allow(k); err != nil {
			return nil, err
		}
	}
	return withPrincipal(ctx, k), nil
}

// lookup returns the live key named by an authorization value
// ("Bearer <key>").
func (a authenticator) lookup(ctx context.Context, authorization string) (db.APIKey, error) {
	key, ok := bearerToken(authorization)
	if !ok {
		return db.APIKey{}, &unauthenticatedError{reason: "authorization must use the Bearer scheme"}
	}
	if !plausibleAPIKey(key) {
		return db.APIKey{}, &unauthenticatedError{reason: "invalid API key"}
	}
	k, err := a.keys.lookup(ctx, HashAPIKey(key))
	if errors.Is(err, db.ErrNotFound) {
		// Unknown and revoked keys get the same answer so a caller cannot
		// tell which keys once existed.
		return db.APIKey{}, &unauthenticatedError{reason: "invalid API key"}
	}
	if err != nil {
		return db.APIKey{}, fmt.Errorf("look up api key: %w", err)
	}
	return k, nil
}

// CheckAuthorization checks an HTTP Authorization header value the way
// every call is checked, against the same keys. The REST gateway calls it
// before it reads a request body, so that a caller without a valid key
// cannot make the process hold a connection open while its body trickles
// in. An empty value is a missing key. The error is a gRPC status:
// Unauthenticated for a missing or invalid key, Unavailable when the
// database cannot be asked. Scopes are left to the call itself.
func (s *Server) CheckAuthorization(ctx context.Context, authorization string) error {
	if strings.TrimSpace(authorization) == "" {
		return toStatus(ctx, s.log, &unauthenticatedError{reason: "missing API key (Authorization: Bearer <key>)"})
	}
	if _, err := (authenticator{keys: s.keys}).lookup(ctx, authorization); err != nil {
		return toStatus(ctx, s.log, err)
	}
	return nil
}

// bearerToken extracts the token of an RFC 6750 section 2.1 credential.
// The scheme name is case-insensitive (RFC 9110 section 11.1).
func bearerToken(v string) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(v), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}
