package service

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// Domain statuses, as the API reports them.
const (
	DomainPending  = "pending"
	DomainVerified = "verified"
)

// CreateDomain adds a sending domain with a new DKIM key to the caller's
// project. It needs the admin scope.
func (s *Server) CreateDomain(ctx context.Context, req *posthastev1.CreateDomainRequest) (*posthastev1.Domain, error) {
	resp, err := s.createDomain(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) createDomain(ctx context.Context, req *posthastev1.CreateDomainRequest) (*posthastev1.Domain, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	d, err := s.domains.Add(ctx, caller.projectID, AddDomainParams{
		Domain: req.GetDomain(), KeyType: req.GetKeyType(), Selector: req.GetSelector(),
	})
	if errors.Is(err, db.ErrAlreadyExists) {
		return nil, &conflictError{msg: "the project already has this domain", err: err}
	}
	if err != nil {
		return nil, err
	}
	return s.domainToProto(d), nil
}

// ListDomains returns the caller's project's domains. It needs the admin
// scope.
func (s *Server) ListDomains(ctx context.Context, _ *posthastev1.ListDomainsRequest) (*posthastev1.ListDomainsResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	ds, err := s.store.ListDomains(ctx, caller.projectID)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	resp := &posthastev1.ListDomainsResponse{Domains: make([]*posthastev1.Domain, len(ds))}
	for i, d := range ds {
		resp.Domains[i] = s.domainToProto(d)
	}
	return resp, nil
}

// GetDomain returns one domain of the caller's project. It needs the admin
// scope.
func (s *Server) GetDomain(ctx context.Context, req *posthastev1.GetDomainRequest) (*posthastev1.Domain, error) {
	d, err := s.domainCall(ctx, req.GetId(), func(c principal, id uuid.UUID) (db.Domain, error) {
		return s.store.GetDomain(ctx, c.projectID, id)
	})
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return d, nil
}

// VerifyDomain looks the domain's records up and records what it found. It
// needs the admin scope.
func (s *Server) VerifyDomain(ctx context.Context, req *posthastev1.VerifyDomainRequest) (*posthastev1.Domain, error) {
	d, err := s.domainCall(ctx, req.GetId(), func(c principal, id uuid.UUID) (db.Domain, error) {
		d, err := s.domains.Verify(ctx, c.projectID, id)
		// This instance signs with the outcome at once; others within
		// their cache's TTL.
		s.signer.forget(c.projectID)
		return d, err
	})
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return d, nil
}

// RotateDomainKey adds a new DKIM key to a domain of the caller's project.
// It needs the admin scope.
func (s *Server) RotateDomainKey(ctx context.Context, req *posthastev1.RotateDomainKeyRequest) (*posthastev1.Domain, error) {
	d, err := s.domainCall(ctx, req.GetId(), func(c principal, id uuid.UUID) (db.Domain, error) {
		d, err := s.domains.Rotate(ctx, c.projectID, id, req.GetKeyType(), req.GetSelector())
		switch {
		case errors.Is(err, db.ErrKeyPending):
			return d, &preconditionError{msg: db.ErrKeyPending.Error() + "; publish it and verify the domain first", err: err}
		case errors.Is(err, db.ErrAlreadyExists):
			return d, &conflictError{msg: "the domain already has a key with this selector", err: err}
		}
		return d, err
	})
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return d, nil
}

// DeleteDomain deletes a domain of the caller's project and its keys. It
// needs the admin scope.
func (s *Server) DeleteDomain(ctx context.Context, req *posthastev1.DeleteDomainRequest) (*posthastev1.DeleteDomainResponse, error) {
	_, err := s.domainCall(ctx, req.GetId(), func(c principal, id uuid.UUID) (db.Domain, error) {
		err := s.store.DeleteDomain(ctx, c.projectID, id)
		s.signer.forget(c.projectID)
		return db.Domain{}, err
	})
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return &posthastev1.DeleteDomainResponse{}, nil
}

// domainCall checks the admin scope and the id, runs fn and maps a missing
// domain (another project's too) to NotFound.
func (s *Server) domainCall(ctx context.Context, rawID string, fn func(principal, uuid.UUID) (db.Domain, error)) (*posthastev1.Domain, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	id, err := parseID(rawID)
	if err != nil {
		return nil, err
	}
	d, err := fn(caller, id)
	if errors.Is(err, db.ErrNotFound) {
		return nil, &notFoundError{what: "domain", err: err}
	}
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", id, err)
	}
	return s.domainToProto(d), nil
}

func (s *Server) domainToProto(d db.Domain) *posthastev1.Domain {
	out := &posthastev1.Domain{
		Id:            d.ID.String(),
		Name:          d.Name,
		Status:        DomainPending,
		CreatedAt:     timestamppb.New(d.CreatedAt),
		VerifiedAt:    optionalTimestamp(d.VerifiedAt),
		LastCheckedAt: optionalTimestamp(d.LastCheckedAt),
	}
	if d.VerifiedAt != nil {
		out.Status = DomainVerified
	}
	for _, r := range s.domains.Records(d) {
		out.Records = append(out.Records, &posthastev1.DnsRecord{
			Purpose: r.Purpose, Type: r.Type, Name: r.Name, Value: r.Value,
			Required: r.Required, Status: r.Status, Found: r.Found, Note: r.Note,
		})
	}
	for _, k := range d.Keys {
		out.DkimKeys = append(out.DkimKeys, &posthastev1.DkimKey{
			Selector: k.Selector, KeyType: k.Algorithm, State: k.State,
			CreatedAt:   timestamppb.New(k.CreatedAt),
			VerifiedAt:  optionalTimestamp(k.VerifiedAt),
			ActivatedAt: optionalTimestamp(k.ActivatedAt),
			RetireAfter: optionalTimestamp(k.RetireAfter),
		})
	}
	return out
}
