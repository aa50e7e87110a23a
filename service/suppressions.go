package service

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// maxSuppressionsPerCall bounds AddSuppressions and DeleteSuppressions: one
// statement each, whose size the caller should not choose freely.
const maxSuppressionsPerCall = 1000

// domainWidePrefix marks an entry that covers a whole domain: "*@example.net".
const domainWidePrefix = "*@"

// suppressionReasons are the reasons ListSuppressions can filter on.
var suppressionReasons = map[string]bool{
	string(db.SuppressionHardBounce): true, string(db.SuppressionComplaint): true, string(db.SuppressionManual): true,
}

// RecipientObserver is told about recipients that end without a delivery
// attempt, suppressed at intake or canceled: an Observer (Config.Observer) that implements it counts
// them with the outcomes delivery reports.
type RecipientObserver interface {
	RecipientsEnded(outcome string, n int)
}

// countSuppressed tells the observer, when it counts recipients, about the
// ones the intake stored suppressed.
func (s *Server) countSuppressed(suppressed []db.SuppressedRecipient) {
	s.countEnded(db.StatusSuppressed, len(suppressed))
}

// countEnded tells the observer, when it counts recipients, about n that
// the API ended as outcome (suppressed at intake, canceled) after the
// change committed, so a rolled-back change is never counted.
func (s *Server) countEnded(outcome string, n int) {
	if o, ok := s.cfg.Observer.(RecipientObserver); ok && n > 0 {
		o.RecipientsEnded(outcome, n)
	}
}

// applySuppressed marks in a send receipt the recipients the intake stored
// suppressed. The receipt was made before the insert, which is where the
// suppression list is looked up.
func applySuppressed(resp *posthastev1.SendMessageResponse, suppressed []db.SuppressedRecipient) {
	if len(suppressed) == 0 {
		return
	}
	reasons := make(map[string]db.SuppressionReason, len(suppressed))
	for _, s := range suppressed {
		reasons[s.RecipientID.String()] = s.Reason
	}
	for _, r := range resp.GetRecipients() {
		if reason, ok := reasons[r.GetId()]; ok {
			r.Status = db.StatusSuppressed
			r.SuppressionReason = string(reason)
		}
	}
}

// suppressionKey validates an entry's address as the API spells it, an
// address or "*@domain", and returns it as entries are stored: lower case,
// the domain as an A-label.
func (v *violations) suppressionKey(field, addr string) (db.SuppressionKey, bool) {
	if addr == "" {
		v.add(field, "is required")
		return db.SuppressionKey{}, false
	}
	if !v.line(field, addr, 0) {
		return db.SuppressionKey{}, false
	}
	if domain, ok := strings.CutPrefix(addr, domainWidePrefix); ok {
		// The domain is checked as the domain of an address would be, so it
		// is stored in the form recipients' domains are.
		_, norm, err := message.NormalizeMailbox("postmaster@" + domain)
		if err != nil || domain == "" {
			v.add(field, "%q is not a valid domain; use an address or *@domain", domain)
			return db.SuppressionKey{}, false
		}
		if _, literal := message.AddressLiteralIP(norm); literal {
			v.add(field, "address literals cannot be suppressed; use a domain name")
			return db.SuppressionKey{}, false
		}
		return db.SuppressionKey{Address: db.SuppressionAddress(norm), DomainWide: true}, true
	}
	envelope, _, ok := v.recipient(field, addr)
	if !ok {
		return db.SuppressionKey{}, false
	}
	return db.SuppressionKey{Address: db.SuppressionAddress(envelope)}, true
}

// suppressionKeyText is how the API spells an entry's key.
func suppressionKeyText(k db.SuppressionKey) string {
	if k.DomainWide {
		return domainWidePrefix + k.Address
	}
	return k.Address
}

func suppressionToProto(s db.Suppression) *posthastev1.Suppression {
	out := &posthastev1.Suppression{
		Address:   suppressionKeyText(s.Key()),
		Reason:    string(s.Reason),
		CreatedAt: timestamppb.New(s.CreatedAt),
		ExpiresAt: optionalTimestamp(s.ExpiresAt),
	}
	if s.MessageID != uuid.Nil {
		out.MessageId = s.MessageID.String()
	}
	if s.RecipientID != uuid.Nil {
		out.RecipientId = s.RecipientID.String()
	}
	if s.Code != 0 || s.EnhancedCode != "" || s.Text != "" {
		out.Reply = &posthastev1.SmtpReply{Code: int32(s.Code), EnhancedCode: s.EnhancedCode, Text: s.Text}
	}
	return out
}

// ListSuppressions returns a page of the project's suppression list,
// newest first.
func (s *Server) ListSuppressions(ctx context.Context, req *posthastev1.ListSuppressionsRequest) (*posthastev1.ListSuppressionsResponse, error) {
	resp, err := s.listSuppressions(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) listSuppressions(ctx context.Context, req *posthastev1.ListSuppressionsRequest) (*posthastev1.ListSuppressionsResponse, error) {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return nil, err
	}
	var v violations
	p := db.ListSuppressionsParams{ProjectID: caller.projectID, Limit: defaultPageSize}
	switch n := req.GetPageSize(); {
	case n < 0 || n > maxPageSize:
		v.add("page_size", "must be between 1 and %d", maxPageSize)
	case n > 0:
		p.Limit = int(n)
	}
	if r := req.GetReason(); r != "" {
		if !suppressionReasons[r] {
			v.add("reason", "must be one of hard_bounce, complaint, manual")
		}
		p.Reason = db.SuppressionReason(r)
	}
	if prefix := req.GetAddressPrefix(); prefix != "" && v.line("address_prefix", prefix, 0) {
		// Entries are stored in lower case, domains without the "*@" the
		// API shows them with: a prefix of "*@" picks the domain entries.
		prefix = db.SuppressionAddress(prefix)
		switch {
		case strings.HasPrefix(domainWidePrefix, prefix): // "*" or "*@"
			yes := true
			p.DomainWide = &yes
		case strings.HasPrefix(prefix, domainWidePrefix):
			yes := true
			p.DomainWide = &yes
			p.AddressPrefix = prefix[len(domainWidePrefix):]
		default:
			no := false
			p.DomainWide = &no
			p.AddressPrefix = prefix
		}
	}
	p.CreatedAfter = optionalTime(&v, "created_after", req.GetCreatedAfter())
	p.CreatedBefore = optionalTime(&v, "created_before", req.GetCreatedBefore())
	p.After = pageAfter(&v, req.GetPageToken())
	if err := v.err(); err != nil {
		return nil, err
	}
	want := p.Limit
	p.Limit++ // see cutPage
	list, err := s.store.ListSuppressions(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("list suppressions: %w", err)
	}
	resp := &posthastev1.ListSuppressionsResponse{}
	list, resp.NextPageToken = cutPage(list, want, func(e db.Suppression) db.Cursor { return db.Cursor{CreatedAt: e.CreatedAt, ID: e.ID} })
	for _, e := range list {
		resp.Suppressions = append(resp.Suppressions, suppressionToProto(e))
	}
	return resp, nil
}

// GetSuppression returns one entry of the project's suppression list.
func (s *Server) GetSuppression(ctx context.Context, req *posthastev1.GetSuppressionRequest) (*posthastev1.Suppression, error) {
	resp, err := s.getSuppression(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) getSuppression(ctx context.Context, req *posthastev1.GetSuppressionRequest) (*posthastev1.Suppression, error) {
	caller, err := requireScope(ctx, db.ScopeRead)
	if err != nil {
		return nil, err
	}
	var v violations
	key, _ := v.suppressionKey("address", req.GetAddress())
	if err := v.err(); err != nil {
		return nil, err
	}
	e, err := s.store.GetSuppressionEntry(ctx, caller.projectID, key)
	if err != nil {
		return nil, fmt.Errorf("get suppression: %w", err)
	}
	return suppressionToProto(e), nil
}

// AddSuppressions adds manual entries to the project's suppression list.
// It needs the send scope: an application that sends also handles its
// unsubscribes, and adding an entry only ever holds mail back.
func (s *Server) AddSuppressions(ctx context.Context, req *posthastev1.AddSuppressionsRequest) (*posthastev1.AddSuppressionsResponse, error) {
	resp, err := s.addSuppressions(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) addSuppressions(ctx context.Context, req *posthastev1.AddSuppressionsRequest) (*posthastev1.AddSuppressionsResponse, error) {
	caller, err := requireScope(ctx, db.ScopeSend)
	if err != nil {
		return nil, err
	}
	var v violations
	switch n := len(req.GetSuppressions()); {
	case n == 0:
		v.add("suppressions", "at least one entry is required")
	case n > maxSuppressionsPerCall:
		v.add("suppressions", "must have at most %d entries, got %d", maxSuppressionsPerCall, n)
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	now := time.Now()
	entries := make([]db.NewSuppression, 0, len(req.GetSuppressions()))
	for i, e := range req.GetSuppressions() {
		field := "suppressions[" + strconv.Itoa(i) + "]"
		key, ok := v.suppressionKey(field+".address", e.GetAddress())
		if r := e.GetReason(); r != "" && r != string(db.SuppressionManual) {
			v.add(field+".reason", "must be manual or empty: hard_bounce and complaint entries are added by bounces and complaints")
			ok = false
		}
		exp := optionalTime(&v, field+".expires_at", e.GetExpiresAt())
		if exp != nil && !exp.After(now) {
			v.add(field+".expires_at", "must be in the future")
			ok = false
		}
		if ok {
			entries = append(entries, db.NewSuppression{Key: key, ExpiresAt: exp})
		}
	}
	// Nothing is stored when any entry is bad.
	if err := v.err(); err != nil {
		return nil, err
	}
	stored, err := s.store.AddSuppressions(ctx, caller.projectID, entries)
	if err != nil {
		return nil, fmt.Errorf("add suppressions: %w", err)
	}
	byKey := make(map[db.SuppressionKey]db.Suppression, len(stored))
	for _, a := range stored {
		byKey[a.Key()] = a.Suppression
	}
	resp := &posthastev1.AddSuppressionsResponse{}
	seen := make(map[db.SuppressionKey]bool, len(entries))
	for _, e := range entries {
		got, ok := byKey[e.Key]
		if !ok || seen[e.Key] {
			// Given twice; or added by a concurrent call the statement's
			// snapshot could not see, and in force either way.
			continue
		}
		seen[e.Key] = true
		resp.Suppressions = append(resp.Suppressions, suppressionToProto(got))
	}
	return resp, nil
}

// DeleteSuppression deletes one entry. It needs the admin scope: removing
// an entry sends mail again to an address that bounced for good or whose
// owner complained, which is an operator's decision.
func (s *Server) DeleteSuppression(ctx context.Context, req *posthastev1.DeleteSuppressionRequest) (*posthastev1.DeleteSuppressionResponse, error) {
	resp, err := s.deleteSuppression(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) deleteSuppression(ctx context.Context, req *posthastev1.DeleteSuppressionRequest) (*posthastev1.DeleteSuppressionResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	var v violations
	key, _ := v.suppressionKey("address", req.GetAddress())
	if err := v.err(); err != nil {
		return nil, err
	}
	deleted, err := s.store.DeleteSuppressions(ctx, caller.projectID, []db.SuppressionKey{key})
	if err != nil {
		return nil, fmt.Errorf("delete suppression: %w", err)
	}
	if len(deleted) == 0 {
		return nil, fmt.Errorf("delete suppression %s: %w", suppressionKeyText(key), db.ErrNotFound)
	}
	return &posthastev1.DeleteSuppressionResponse{}, nil
}

// DeleteSuppressions deletes several entries; like DeleteSuppression it
// needs the admin scope.
func (s *Server) DeleteSuppressions(ctx context.Context, req *posthastev1.DeleteSuppressionsRequest) (*posthastev1.DeleteSuppressionsResponse, error) {
	resp, err := s.deleteSuppressions(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) deleteSuppressions(ctx context.Context, req *posthastev1.DeleteSuppressionsRequest) (*posthastev1.DeleteSuppressionsResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	var v violations
	switch n := len(req.GetAddresses()); {
	case n == 0:
		v.add("addresses", "at least one address is required")
	case n > maxSuppressionsPerCall:
		v.add("addresses", "must have at most %d entries, got %d", maxSuppressionsPerCall, n)
	}
	keys := make([]db.SuppressionKey, 0, len(req.GetAddresses()))
	for i, a := range req.GetAddresses() {
		if key, ok := v.suppressionKey("addresses["+strconv.Itoa(i)+"]", a); ok {
			keys = append(keys, key)
		}
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	deleted, err := s.store.DeleteSuppressions(ctx, caller.projectID, keys)
	if err != nil {
		return nil, fmt.Errorf("delete suppressions: %w", err)
	}
	resp := &posthastev1.DeleteSuppressionsResponse{}
	for _, k := range deleted {
		resp.Deleted = append(resp.Deleted, suppressionKeyText(k))
	}
	return resp, nil
}
