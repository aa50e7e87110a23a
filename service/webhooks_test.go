package service_test

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/netguard"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// zoneResolver answers from a fixed table; other names do not exist.
type zoneResolver map[string][]netip.Addr

func (z zoneResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := z[host]; ok {
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

var testZone = zoneResolver{
	"hooks.example.test":    {netip.MustParseAddr("93.184.215.14")},
	"internal.example.test": {netip.MustParseAddr("93.184.215.14"), netip.MustParseAddr("10.1.2.3")},
}

// webhookEnv is a service with an admin key of the default project.
func webhookEnv(t *testing.T, cfg service.Config) (*env, context.Context) {
	t.Helper()
	cfg.WebhookResolver = testZone
	e := setup(t, cfg)
	admin, _ := createScopedKey(t, e.store, db.DefaultProjectID(), "admin", db.ScopeAdmin)
	return e, withKey(t.Context(), admin)
}

func (e *env) webhookCount(t *testing.T) int {
	t.Helper()
	var n int
	if err := e.raw.QueryRow(t.Context(), `SELECT count(*) FROM webhook_endpoints`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// fanOut runs the fan-out until n deliveries exist. Events show in the feed
// only once every older transaction on the server has ended, so it may take
// more than one pass.
func (e *env) fanOut(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := e.store.FanOutWebhooks(t.Context(), 100); err != nil {
			t.Fatal(err)
		}
		var got int
		if err := e.raw.QueryRow(t.Context(), `SELECT count(*) FROM webhook_deliveries`).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d deliveries after fan-out, want %d", got, n)
		}
		select {
		case <-t.Context().Done():
			t.Fatal(t.Context().Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func TestWebhookLifecycle(t *testing.T) {
	t.Parallel()
	e, ctx := webhookEnv(t, service.Config{})
	created, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{
		Url: "https://hooks.example.test/posthaste", EventTypes: []string{"delivered", "bounced", "bounced"}, Description: "shop",
	})
	if err != nil {
		t.Fatal(err)
	}
	w := created.GetWebhook()
	if !strings.HasPrefix(created.GetSecret(), "whsec_") || !w.GetEnabled() || !slices.Equal(w.GetEventTypes(), []string{"delivered", "bounced"}) {
		t.Errorf("created %v", created)
	}

	got, err := e.client.GetWebhook(ctx, &posthastev1.GetWebhookRequest{Id: w.GetId()})
	if err != nil || !proto.Equal(got, w) {
		t.Errorf("GetWebhook = %v, %v; want %v", got, err, w)
	}
	list, err := e.client.ListWebhooks(ctx, &posthastev1.ListWebhooksRequest{})
	if err != nil || len(list.GetWebhooks()) != 1 {
		t.Errorf("ListWebhooks = %v, %v", list, err)
	}

	// Only the masked fields change; an empty event_types list means all.
	updated, err := e.client.UpdateWebhook(ctx, &posthastev1.UpdateWebhookRequest{
		Id:         w.GetId(),
		Webhook:    &posthastev1.Webhook{Enabled: false, EventTypes: nil, Url: "ignored"},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"enabled", "event_types"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if updated.GetEnabled() || len(updated.GetEventTypes()) != 0 || updated.GetUrl() != w.GetUrl() || updated.GetDescription() != "shop" {
		t.Errorf("updated %v", updated)
	}

	rotated, err := e.client.RotateWebhookSecret(ctx, &posthastev1.RotateWebhookSecretRequest{Id: w.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if rotated.GetSecret() == created.GetSecret() || !strings.HasPrefix(rotated.GetSecret(), "whsec_") ||
		rotated.GetWebhook().GetPreviousSecretExpiresAt() == nil {
		t.Errorf("rotated %v", rotated)
	}

	deliveries, err := e.client.ListWebhookDeliveries(ctx, &posthastev1.ListWebhookDeliveriesRequest{Id: w.GetId()})
	if err != nil || len(deliveries.GetDeliveries()) != 0 {
		t.Errorf("ListWebhookDeliveries = %v, %v", deliveries, err)
	}

	if _, err := e.client.DeleteWebhook(ctx, &posthastev1.DeleteWebhookRequest{Id: w.GetId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.GetWebhook(ctx, &posthastev1.GetWebhookRequest{Id: w.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("GetWebhook after delete: %v", err)
	}
}

func TestWebhookNeedsAdmin(t *testing.T) {
	t.Parallel()
	e, _ := webhookEnv(t, service.Config{})
	_, err := e.client.CreateWebhook(e.ctx(t), &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/"})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("send and read key: %v, want PermissionDenied", err)
	}
	if n := e.webhookCount(t); n != 0 {
		t.Errorf("%d endpoints stored", n)
	}
}

func TestWebhookValidation(t *testing.T) {
	t.Parallel()
	e, ctx := webhookEnv(t, service.Config{})
	for _, tt := range []struct {
		name  string
		req   *posthastev1.CreateWebhookRequest
		field string
	}{
		{"no url", &posthastev1.CreateWebhookRequest{}, "url"},
		{"ftp", &posthastev1.CreateWebhookRequest{Url: "ftp://hooks.example.test/"}, "url"},
		{"relative", &posthastev1.CreateWebhookRequest{Url: "/hooks"}, "url"},
		{"userinfo", &posthastev1.CreateWebhookRequest{Url: "https://user:pw@hooks.example.test/"}, "url"},
		{"no host", &posthastev1.CreateWebhookRequest{Url: "https:///path"}, "url"},
		{"loopback", &posthastev1.CreateWebhookRequest{Url: "http://127.0.0.1:8080/"}, "url"},
		{"mapped loopback", &posthastev1.CreateWebhookRequest{Url: "http://[::ffff:127.0.0.1]/"}, "url"},
		{"private", &posthastev1.CreateWebhookRequest{Url: "https://10.0.0.8/"}, "url"},
		{"metadata", &posthastev1.CreateWebhookRequest{Url: "http://169.254.169.254/latest/meta-data"}, "url"},
		{"resolves private", &posthastev1.CreateWebhookRequest{Url: "https://internal.example.test/"}, "url"},
		{"unknown event type", &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/", EventTypes: []string{"delivered", "opened"}}, "event_types[1]"},
		{"description", &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/", Description: "a\nb"}, "description"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.client.CreateWebhook(ctx, tt.req)
			if status.Code(err) != codes.InvalidArgument || !slices.Contains(violations(err), tt.field) {
				t.Errorf("CreateWebhook: %v (fields %v), want InvalidArgument naming %s", err, violations(err), tt.field)
			}
		})
	}
	if n := e.webhookCount(t); n != 0 {
		t.Errorf("%d endpoints stored after refusals", n)
	}

	created, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.client.UpdateWebhook(ctx, &posthastev1.UpdateWebhookRequest{
		Id:         created.GetWebhook().GetId(),
		Webhook:    &posthastev1.Webhook{Url: "http://localhost/"},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"url"}},
	})
	if status.Code(err) != codes.InvalidArgument || !slices.Contains(violations(err), "webhook.url") {
		t.Errorf("update to a loopback URL: %v", err)
	}
	_, err = e.client.UpdateWebhook(ctx, &posthastev1.UpdateWebhookRequest{
		Id:         created.GetWebhook().GetId(),
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"secret"}},
	})
	if status.Code(err) != codes.InvalidArgument || !slices.Contains(violations(err), "update_mask") {
		t.Errorf("update of the secret: %v", err)
	}
	_, err = e.client.ListWebhookDeliveries(ctx, &posthastev1.ListWebhookDeliveriesRequest{Id: created.GetWebhook().GetId(), State: "lost"})
	if status.Code(err) != codes.InvalidArgument || !slices.Contains(violations(err), "state") {
		t.Errorf("list with a bad state: %v", err)
	}
	got, err := e.client.GetWebhook(ctx, &posthastev1.GetWebhookRequest{Id: created.GetWebhook().GetId()})
	if err != nil || got.GetUrl() != "https://hooks.example.test/" {
		t.Errorf("after refused updates: %v, %v", got, err)
	}
}

// With private addresses allowed, as in development, loopback URLs are
// accepted; the metadata service is still not.
func TestWebhookAllowPrivate(t *testing.T) {
	t.Parallel()
	e, ctx := webhookEnv(t, service.Config{WebhookGuard: netguard.AllowAll()})
	for _, u := range []string{"http://127.0.0.1:8080/hooks", "http://localhost:3000/", "https://10.0.0.8/"} {
		if _, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{Url: u}); err != nil {
			t.Errorf("CreateWebhook(%s): %v", u, err)
		}
	}
	_, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{Url: "http://169.254.169.254/"})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("metadata address with private allowed: %v", err)
	}
}

func TestWebhookOtherProjectInvisible(t *testing.T) {
	t.Parallel()
	e, ctx := webhookEnv(t, service.Config{})
	created, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/"})
	if err != nil {
		t.Fatal(err)
	}
	id := created.GetWebhook().GetId()
	other, err := e.store.CreateProject(t.Context(), "other")
	if err != nil {
		t.Fatal(err)
	}
	otherKey, _ := createScopedKey(t, e.store, other.ID, "other-admin", db.ScopeAdmin)
	octx := withKey(t.Context(), otherKey)

	list, err := e.client.ListWebhooks(octx, &posthastev1.ListWebhooksRequest{})
	if err != nil || len(list.GetWebhooks()) != 0 {
		t.Errorf("other project's list: %v, %v", list, err)
	}
	calls := map[string]func() error{
		"get": func() error {
			_, err := e.client.GetWebhook(octx, &posthastev1.GetWebhookRequest{Id: id})
			return err
		},
		"update": func() error {
			_, err := e.client.UpdateWebhook(octx, &posthastev1.UpdateWebhookRequest{Id: id, Webhook: &posthastev1.Webhook{}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"enabled"}}})
			return err
		},
		"rotate": func() error {
			_, err := e.client.RotateWebhookSecret(octx, &posthastev1.RotateWebhookSecretRequest{Id: id})
			return err
		},
		"deliveries": func() error {
			_, err := e.client.ListWebhookDeliveries(octx, &posthastev1.ListWebhookDeliveriesRequest{Id: id})
			return err
		},
		"retry": func() error {
			_, err := e.client.RetryWebhookDelivery(octx, &posthastev1.RetryWebhookDeliveryRequest{Id: id, DeliveryId: id})
			return err
		},
		"delete": func() error {
			_, err := e.client.DeleteWebhook(octx, &posthastev1.DeleteWebhookRequest{Id: id})
			return err
		},
	}
	for name, call := range calls {
		if err := call(); status.Code(err) != codes.NotFound || status.Convert(err).Message() != "webhook not found" {
			t.Errorf("%s from another project: %v, want NotFound", name, err)
		}
	}
	got, err := e.client.GetWebhook(ctx, &posthastev1.GetWebhookRequest{Id: id})
	if err != nil || !got.GetEnabled() {
		t.Errorf("the endpoint after the other project's calls: %v, %v", got, err)
	}
}

// A failed delivery is retried by API: pending again, attempts from zero.
func TestRetryWebhookDelivery(t *testing.T) {
	t.Parallel()
	e, ctx := webhookEnv(t, service.Config{})
	created, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/"})
	if err != nil {
		t.Fatal(err)
	}
	wid := created.GetWebhook().GetId()
	if _, err := e.client.SendMessage(e.ctx(t), validRequest()); err != nil {
		t.Fatal(err)
	}
	e.fanOut(t, 1)
	// The accepted event's delivery, as it stands after its last attempt.
	var did string
	err = e.raw.QueryRow(t.Context(), `
UPDATE webhook_deliveries SET state = 'failed', attempts = 8, last_status_code = 500, last_error = 'HTTP 500',
    last_attempt_at = now(), last_latency_ms = 12
RETURNING id::text`).Scan(&did)
	if err != nil {
		t.Fatal(err)
	}
	list, err := e.client.ListWebhookDeliveries(ctx, &posthastev1.ListWebhookDeliveriesRequest{Id: wid, State: "failed"})
	if err != nil || len(list.GetDeliveries()) != 1 {
		t.Fatalf("failed deliveries: %v, %v", list, err)
	}
	d := list.GetDeliveries()[0]
	if d.GetEventType() != "accepted" || d.GetLastStatusCode() != 500 || d.GetAttempts() != 8 || d.GetLastLatency().AsDuration().Milliseconds() != 12 {
		t.Errorf("delivery %v", d)
	}
	retried, err := e.client.RetryWebhookDelivery(ctx, &posthastev1.RetryWebhookDeliveryRequest{Id: wid, DeliveryId: did})
	if err != nil {
		t.Fatal(err)
	}
	if retried.GetState() != "pending" || retried.GetAttempts() != 0 || retried.GetLastError() != "HTTP 500" {
		t.Errorf("retried %v", retried)
	}
	_, err = e.client.RetryWebhookDelivery(ctx, &posthastev1.RetryWebhookDeliveryRequest{Id: wid, DeliveryId: wid})
	if status.Code(err) != codes.NotFound {
		t.Errorf("retry of an unknown delivery: %v", err)
	}
	_, err = e.client.RetryWebhookDelivery(ctx, &posthastev1.RetryWebhookDeliveryRequest{Id: wid, DeliveryId: "nope"})
	if status.Code(err) != codes.InvalidArgument || !slices.Contains(violations(err), "delivery_id") {
		t.Errorf("retry with a malformed id: %v", err)
	}
}

func TestListWebhookDeliveriesPaging(t *testing.T) {
	t.Parallel()
	e, ctx := webhookEnv(t, service.Config{})
	created, err := e.client.CreateWebhook(ctx, &posthastev1.CreateWebhookRequest{Url: "https://hooks.example.test/"})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := e.client.SendMessage(e.ctx(t), validRequest()); err != nil {
			t.Fatal(err)
		}
	}
	e.fanOut(t, 5)
	seen := map[string]bool{}
	token := ""
	for pages := 0; ; pages++ {
		resp, err := e.client.ListWebhookDeliveries(ctx, &posthastev1.ListWebhookDeliveriesRequest{
			Id: created.GetWebhook().GetId(), PageSize: 2, PageToken: token,
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range resp.GetDeliveries() {
			if seen[d.GetId()] {
				t.Errorf("delivery %s on two pages", d.GetId())
			}
			seen[d.GetId()] = true
		}
		token = resp.GetNextPageToken()
		if token == "" || pages > 5 {
			break
		}
	}
	if len(seen) != 5 {
		t.Errorf("paged through %d deliveries, want 5", len(seen))
	}
}
