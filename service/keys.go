package service

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// CreateApiKey makes a key in the caller's project and returns its secret,
// once. It needs the admin scope.
func (s *Server) CreateApiKey(ctx context.Context, req *posthastev1.CreateApiKeyRequest) (*posthastev1.CreateApiKeyResponse, error) {
	resp, err := s.createAPIKey(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) createAPIKey(ctx context.Context, req *posthastev1.CreateApiKeyRequest) (*posthastev1.CreateApiKeyResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	var v violations
	if err := db.ValidateKeyName(req.GetName()); err != nil {
		v.add("name", "%v", err)
	}
	requested := req.GetScopes()
	if len(requested) == 0 {
		// The same default as `posthaste keys create`: a key for an
		// application, which sends and reads but does not manage keys.
		requested = []string{db.ScopeSend, db.ScopeRead}
	}
	scopes, err := db.NormalizeScopes(requested)
	if err != nil {
		v.add("scopes", "%v", err)
	}
	domains, err := db.NormalizeSenderDomains(req.GetSenderDomains())
	if err != nil {
		v.add("sender_domains", "%v", err)
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	project, err := s.store.GetProject(ctx, caller.projectID)
	if err != nil {
		return nil, fmt.Errorf("project of caller: %w", err)
	}
	secret, prefix, hash, err := NewAPIKey()
	if err != nil {
		return nil, err
	}
	k, err := s.store.CreateAPIKey(ctx, db.NewAPIKeyParams{
		ProjectID:     caller.projectID,
		Name:          req.GetName(),
		Prefix:        prefix,
		Hash:          hash,
		Scopes:        scopes,
		SenderDomains: domains,
	})
	if err != nil {
		return nil, fmt.Errorf("create api key: %w", err)
	}
	return &posthastev1.CreateApiKeyResponse{ApiKey: apiKeyToProto(k, project.Name), Key: secret}, nil
}

// ListApiKeys returns every key of the caller's project. It needs the admin
// scope.
func (s *Server) ListApiKeys(ctx context.Context, _ *posthastev1.ListApiKeysRequest) (*posthastev1.ListApiKeysResponse, error) {
	resp, err := s.listAPIKeys(ctx)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) listAPIKeys(ctx context.Context) (*posthastev1.ListApiKeysResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	project, err := s.store.GetProject(ctx, caller.projectID)
	if err != nil {
		return nil, fmt.Errorf("project of caller: %w", err)
	}
	keys, err := s.store.ListAPIKeys(ctx, caller.projectID)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", err)
	}
	resp := &posthastev1.ListApiKeysResponse{}
	for _, k := range keys {
		resp.ApiKeys = append(resp.ApiKeys, apiKeyToProto(k, project.Name))
	}
	return resp, nil
}

// RevokeApiKey revokes a key of the caller's project. It needs the admin
// scope. A key may revoke itself; the CLI can always make a new one.
func (s *Server) RevokeApiKey(ctx context.Context, req *posthastev1.RevokeApiKeyRequest) (*posthastev1.ApiKey, error) {
	resp, err := s.revokeAPIKey(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) revokeAPIKey(ctx context.Context, req *posthastev1.RevokeApiKeyRequest) (*posthastev1.ApiKey, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	id, err := parseID(req.GetId())
	if err != nil {
		return nil, err
	}
	project, err := s.store.GetProject(ctx, caller.projectID)
	if err != nil {
		return nil, fmt.Errorf("project of caller: %w", err)
	}
	k, err := s.store.RevokeAPIKey(ctx, caller.projectID, id)
	if errors.Is(err, db.ErrNotFound) {
		return nil, &notFoundError{what: "API key", err: err}
	}
	if err != nil {
		return nil, fmt.Errorf("revoke api key: %w", err)
	}
	// This instance refuses the key from now on; others within their
	// cache's TTL.
	s.keys.forget(k.ID)
	return apiKeyToProto(k, project.Name), nil
}

func apiKeyToProto(k db.APIKey, project string) *posthastev1.ApiKey {
	return &posthastev1.ApiKey{
		Id:         k.ID.String(),
		Name:       k.Name,
		Prefix:     k.Prefix,
		Scopes:     k.Scopes,
		Project:    project,
		CreatedAt:  timestamppb.New(k.CreatedAt),
		LastUsedAt: optionalTimestamp(k.LastUsedAt),
		RevokedAt:  optionalTimestamp(k.RevokedAt),

		SenderDomains: k.SenderDomains,
	}
}
