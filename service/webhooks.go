package service

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/webhook"
	"github.com/posthaste/posthaste/internal/netguard"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// Limits on webhook fields.
const (
	maxWebhookURLLen         = 2048
	maxWebhookDescriptionLen = 500
	defaultDeliveryPageSize  = 50
	maxDeliveryPageSize      = 100
)

// CreateWebhook adds an endpoint to the caller's project and returns its
// secret, once. It needs the admin scope.
func (s *Server) CreateWebhook(ctx context.Context, req *posthastev1.CreateWebhookRequest) (*posthastev1.CreateWebhookResponse, error) {
	resp, err := s.createWebhook(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) createWebhook(ctx context.Context, req *posthastev1.CreateWebhookRequest) (*posthastev1.CreateWebhookResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	var v violations
	s.webhookURL(ctx, &v, "url", req.GetUrl())
	types := webhookEventTypes(&v, "event_types", req.GetEventTypes())
	v.line("description", req.GetDescription(), maxWebhookDescriptionLen)
	if err := v.err(); err != nil {
		return nil, err
	}
	secret, err := webhook.NewSecret()
	if err != nil {
		return nil, err
	}
	enabled := true
	if req.Enabled != nil {
		enabled = req.GetEnabled()
	}
	w, err := s.store.CreateWebhookEndpoint(ctx, db.NewWebhookEndpointParams{
		ProjectID:   caller.projectID,
		URL:         req.GetUrl(),
		Description: req.GetDescription(),
		EventTypes:  types,
		Enabled:     enabled,
		Secret:      secret,
	})
	if err != nil {
		return nil, fmt.Errorf("create webhook: %w", err)
	}
	return &posthastev1.CreateWebhookResponse{Webhook: webhookToProto(w), Secret: secret}, nil
}

// ListWebhooks returns every endpoint of the caller's project. It needs the
// admin scope.
func (s *Server) ListWebhooks(ctx context.Context, _ *posthastev1.ListWebhooksRequest) (*posthastev1.ListWebhooksResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	ws, err := s.store.ListWebhookEndpoints(ctx, caller.projectID)
	if err != nil {
		return nil, toStatus(ctx, s.log, fmt.Errorf("list webhooks: %w", err))
	}
	resp := &posthastev1.ListWebhooksResponse{}
	for _, w := range ws {
		resp.Webhooks = append(resp.Webhooks, webhookToProto(w))
	}
	return resp, nil
}

// GetWebhook returns one endpoint of the caller's project. It needs the
// admin scope.
func (s *Server) GetWebhook(ctx context.Context, req *posthastev1.GetWebhookRequest) (*posthastev1.Webhook, error) {
	w, err := s.getWebhook(ctx, req.GetId())
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return webhookToProto(w), nil
}

// getWebhook checks the admin scope and returns the caller's endpoint.
func (s *Server) getWebhook(ctx context.Context, rawID string) (db.WebhookEndpoint, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return db.WebhookEndpoint{}, err
	}
	id, err := parseID(rawID)
	if err != nil {
		return db.WebhookEndpoint{}, err
	}
	w, err := s.store.GetWebhookEndpoint(ctx, caller.projectID, id)
	if err != nil {
		return db.WebhookEndpoint{}, webhookError(err)
	}
	return w, nil
}

// webhookError names a webhook in a NotFound.
func webhookError(err error) error {
	if errors.Is(err, db.ErrNotFound) {
		return &notFoundError{what: "webhook", err: err}
	}
	return err
}

// UpdateWebhook changes the fields named in update_mask. It needs the admin
// scope.
func (s *Server) UpdateWebhook(ctx context.Context, req *posthastev1.UpdateWebhookRequest) (*posthastev1.Webhook, error) {
	w, err := s.updateWebhook(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return webhookToProto(w), nil
}

func (s *Server) updateWebhook(ctx context.Context, req *posthastev1.UpdateWebhookRequest) (db.WebhookEndpoint, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return db.WebhookEndpoint{}, err
	}
	id, err := parseID(req.GetId())
	if err != nil {
		return db.WebhookEndpoint{}, err
	}
	paths := req.GetUpdateMask().GetPaths()
	if len(paths) == 0 {
		paths = []string{"url", "event_types", "enabled", "description"}
	}
	var (
		v   violations
		p   = db.UpdateWebhookEndpointParams{ProjectID: caller.projectID, ID: id}
		in  = req.GetWebhook()
		set = map[string]bool{}
	)
	for _, path := range paths {
		if set[path] {
			continue
		}
		set[path] = true
		switch path {
		case "url":
			u := in.GetUrl()
			s.webhookURL(ctx, &v, "webhook.url", u)
			p.URL = &u
		case "event_types":
			types := webhookEventTypes(&v, "webhook.event_types", in.GetEventTypes())
			p.EventTypes = &types
		case "enabled":
			e := in.GetEnabled()
			p.Enabled = &e
		case "description":
			d := in.GetDescription()
			v.line("webhook.description", d, maxWebhookDescriptionLen)
			p.Description = &d
		default:
			v.add("update_mask", "%q cannot be changed; use url, event_types, enabled or description", path)
		}
	}
	if err := v.err(); err != nil {
		return db.WebhookEndpoint{}, err
	}
	w, err := s.store.UpdateWebhookEndpoint(ctx, p)
	if err != nil {
		return db.WebhookEndpoint{}, webhookError(err)
	}
	return w, nil
}

// DeleteWebhook deletes an endpoint of the caller's project. It needs the
// admin scope.
func (s *Server) DeleteWebhook(ctx context.Context, req *posthastev1.DeleteWebhookRequest) (*posthastev1.DeleteWebhookResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	id, err := parseID(req.GetId())
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	if err := s.store.DeleteWebhookEndpoint(ctx, caller.projectID, id); err != nil {
		return nil, toStatus(ctx, s.log, webhookError(err))
	}
	return &posthastev1.DeleteWebhookResponse{}, nil
}

// RotateWebhookSecret gives an endpoint a new secret, returned once; the
// old one keeps signing for Config.WebhookSecretGrace. It needs the admin
// scope.
func (s *Server) RotateWebhookSecret(ctx context.Context, req *posthastev1.RotateWebhookSecretRequest) (*posthastev1.RotateWebhookSecretResponse, error) {
	resp, err := s.rotateWebhookSecret(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) rotateWebhookSecret(ctx context.Context, req *posthastev1.RotateWebhookSecretRequest) (*posthastev1.RotateWebhookSecretResponse, error) {
	caller, err := requireScope(ctx, db.ScopeAdmin)
	if err != nil {
		return nil, err
	}
	id, err := parseID(req.GetId())
	if err != nil {
		return nil, err
	}
	secret, err := webhook.NewSecret()
	if err != nil {
		return nil, err
	}
	w, err := s.store.RotateWebhookSecret(ctx, caller.projectID, id, secret, s.cfg.WebhookSecretGrace)
	if err != nil {
		return nil, webhookError(err)
	}
	return &posthastev1.RotateWebhookSecretResponse{Webhook: webhookToProto(w), Secret: secret}, nil
}

// ListWebhookDeliveries returns a page of an endpoint's deliveries, newest
// first. It needs the admin scope.
func (s *Server) ListWebhookDeliveries(ctx context.Context, req *posthastev1.ListWebhookDeliveriesRequest) (*posthastev1.ListWebhookDeliveriesResponse, error) {
	resp, err := s.listWebhookDeliveries(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) listWebhookDeliveries(ctx context.Context, req *posthastev1.ListWebhookDeliveriesRequest) (*posthastev1.ListWebhookDeliveriesResponse, error) {
	var v violations
	size := int(req.GetPageSize())
	switch {
	case size == 0:
		size = defaultDeliveryPageSize
	case size < 0 || size > maxDeliveryPageSize:
		v.add("page_size", "must be between 1 and %d", maxDeliveryPageSize)
	}
	if st := req.GetState(); st != "" && !slices.Contains([]string{db.WebhookPending, db.WebhookSending, db.WebhookDelivered, db.WebhookFailed}, st) {
		v.add("state", "must be pending, sending, delivered or failed")
	}
	var before *db.WebhookDeliveryCursor
	if c := pageAfter(&v, req.GetPageToken()); c != nil {
		before = &db.WebhookDeliveryCursor{CreatedAt: c.CreatedAt, ID: c.ID}
	}
	// The scope and the endpoint come first: a caller without the scope, or
	// asking about another project's endpoint, learns nothing more.
	w, err := s.getWebhook(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	ds, err := s.store.ListWebhookDeliveries(ctx, db.ListWebhookDeliveriesParams{
		ProjectID: w.ProjectID, EndpointID: w.ID, State: req.GetState(), Before: before, Limit: size + 1,
	})
	if err != nil {
		return nil, fmt.Errorf("list webhook deliveries: %w", err)
	}
	resp := &posthastev1.ListWebhookDeliveriesResponse{}
	ds, resp.NextPageToken = cutPage(ds, size, func(d db.WebhookDelivery) db.Cursor { return db.Cursor{CreatedAt: d.CreatedAt, ID: d.ID} })
	for _, d := range ds {
		resp.Deliveries = append(resp.Deliveries, webhookDeliveryToProto(d))
	}
	return resp, nil
}

// RetryWebhookDelivery makes a finished delivery pending again. It needs
// the admin scope.
func (s *Server) RetryWebhookDelivery(ctx context.Context, req *posthastev1.RetryWebhookDeliveryRequest) (*posthastev1.WebhookDelivery, error) {
	resp, err := s.retryWebhookDelivery(ctx, req)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	return resp, nil
}

func (s *Server) retryWebhookDelivery(ctx context.Context, req *posthastev1.RetryWebhookDeliveryRequest) (*posthastev1.WebhookDelivery, error) {
	w, err := s.getWebhook(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	deliveryID, err := uuid.Parse(req.GetDeliveryId())
	if err != nil {
		return nil, invalidField("delivery_id", "must be a UUID")
	}
	d, err := s.store.RetryWebhookDelivery(ctx, w.ProjectID, w.ID, deliveryID)
	if errors.Is(err, db.ErrNotFound) {
		return nil, &notFoundError{what: "webhook delivery", err: err}
	}
	if err != nil {
		return nil, fmt.Errorf("retry webhook delivery: %w", err)
	}
	return webhookDeliveryToProto(d), nil
}

// webhookURL checks an endpoint URL: absolute http or https, a host, no
// user info (credentials would end up in logs and listings), and a host
// that is not, and does not resolve to, an address the guard refuses.
func (s *Server) webhookURL(ctx context.Context, v *violations, field, raw string) {
	if raw == "" {
		v.add(field, "is required")
		return
	}
	if !v.line(field, raw, maxWebhookURLLen) {
		return
	}
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		v.add(field, "is not a valid URL")
		return
	case u.Scheme != "https" && u.Scheme != "http":
		v.add(field, "must be an http or https URL")
		return
	case u.User != nil:
		v.add(field, "must not contain user info")
		return
	case u.Hostname() == "":
		v.add(field, "must name a host")
		return
	}
	if port := u.Port(); port != "" && (strings.TrimLeft(port, "0") == "" || len(port) > 5) {
		v.add(field, "has an invalid port")
		return
	}
	err = s.cfg.WebhookGuard.CheckHost(ctx, s.cfg.WebhookResolver, strings.TrimSuffix(u.Hostname(), "."))
	var refused *netguard.RefusedError
	if errors.As(err, &refused) {
		v.add(field, "must not point at a %s address (%s)", refused.Reason, refused.Error())
	}
}

// webhookEventTypes checks the event types an endpoint takes and returns
// them without duplicates, in the canonical order.
func webhookEventTypes(v *violations, field string, in []string) []string {
	known := db.WebhookEventTypes()
	out := []string{}
	for i, t := range in {
		if !slices.Contains(known, db.EventType(t)) {
			names := make([]string, len(known))
			for j, k := range known {
				names[j] = string(k)
			}
			v.add(fmt.Sprintf("%s[%d]", field, i), "unknown event type %q; want one of %s", t, strings.Join(names, ", "))
		}
	}
	for _, k := range known {
		if slices.Contains(in, string(k)) {
			out = append(out, string(k))
		}
	}
	return out
}

func webhookToProto(w db.WebhookEndpoint) *posthastev1.Webhook {
	out := &posthastev1.Webhook{
		Id:                  w.ID.String(),
		Url:                 w.URL,
		EventTypes:          w.EventTypes,
		Enabled:             w.Enabled,
		Description:         w.Description,
		CreatedAt:           timestamppb.New(w.CreatedAt),
		UpdatedAt:           timestamppb.New(w.UpdatedAt),
		DisabledAt:          optionalTimestamp(w.DisabledAt),
		DisabledReason:      w.DisabledReason,
		ConsecutiveFailures: int32(w.ConsecutiveFailures),
	}
	if w.PreviousSecret != "" {
		out.PreviousSecretExpiresAt = optionalTimestamp(w.PreviousSecretExpiresAt)
	}
	return out
}

func webhookDeliveryToProto(d db.WebhookDelivery) *posthastev1.WebhookDelivery {
	out := &posthastev1.WebhookDelivery{
		Id:             d.ID.String(),
		WebhookId:      d.EndpointID.String(),
		EventId:        d.EventID,
		EventType:      d.EventType,
		State:          d.State,
		Attempts:       int32(d.Attempts),
		NextAttemptAt:  timestamppb.New(d.NextAttemptAt),
		LastAttemptAt:  optionalTimestamp(d.LastAttemptAt),
		LastStatusCode: int32(d.LastStatusCode),
		LastError:      d.LastError,
		CreatedAt:      timestamppb.New(d.CreatedAt),
	}
	if d.MessageID != uuid.Nil {
		out.MessageId = d.MessageID.String()
	}
	if d.LastAttemptAt != nil {
		out.LastLatency = durationpb.New(d.LastLatency)
	}
	return out
}
