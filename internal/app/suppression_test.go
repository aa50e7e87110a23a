package app_test

import (
	"context"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/posthaste/posthaste/delivery"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
)

// receiptStatuses returns "status/suppression_reason" of each recipient of
// a send answer.
func receiptStatuses(resp map[string]any) []string {
	var out []string
	for _, r := range resp["recipients"].([]any) {
		rec := r.(map[string]any)
		reason, _ := rec["suppression_reason"].(string)
		out = append(out, rec["status"].(string)+"/"+reason)
	}
	return out
}

// received returns every envelope recipient of the messages the server took.
func received(s *testenv.SMTPServer) []string {
	var out []string
	for _, m := range s.Messages() {
		out = append(out, m.To...)
	}
	return out
}

// TestComplaintSuppressesNextSend: after a complaint, the next message to
// the address does not reach it; the message's other recipient is
// delivered.
func TestComplaintSuppressesNextSend(t *testing.T) {
	t.Parallel()
	b := setupBounces(t)
	first := b.send(t, "dave@example.test")
	b.waitStatus(t, first, "delivered")
	from := b.smtp.Messages()[0].From
	if err := sendReport(b.app.BounceAddr(), from, feedbackReport(from, "dave@example.test")); err != nil {
		t.Fatal(err)
	}
	b.waitEvent(t, first, "suppressed")

	code, resp := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from":    map[string]any{"address": "shop@posthaste.test"},
		"to":      []any{map[string]any{"address": "Dave@example.test"}, map[string]any{"address": "erin@example.test"}},
		"subject": "again", "text": "hello",
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, resp)
	}
	if got := receiptStatuses(resp); !slices.Equal(got, []string{"suppressed/complaint", "queued/"}) {
		t.Errorf("receipt %v", got)
	}
	id := resp["id"].(string)
	msg := b.waitStatus(t, id, "partially_delivered")
	if r := msg["recipients"].([]any)[0].(map[string]any); r["status"] != "suppressed" || r["suppression_reason"] != "complaint" {
		t.Errorf("GET recipient %v", r)
	}
	if ev := b.waitEvent(t, id, "suppressed")[0]; ev["reason"] != "complaint" || ev["recipient_id"] == nil {
		t.Errorf("suppressed event %v", ev)
	}
	if got := received(b.smtp); !slices.Equal(got, []string{"dave@example.test", "erin@example.test"}) {
		t.Errorf("the MX received mail for %v, want dave once (before the complaint) and erin", got)
	}
}

// TestSuppressionListOverREST: entries added over REST keep mail from the
// servers (the MX of a suppressed domain is never contacted), an expired
// entry suppresses nothing, and deleting an entry lets mail through again.
func TestSuppressionListOverREST(t *testing.T) {
	t.Parallel()
	blocked := testenv.StartSMTP(t) // MX of example.test, whose every address gets suppressed
	open := testenv.StartSMTP(t)    // MX of other.test
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Delivery: delivery.Config{
			PollInterval: 100 * time.Millisecond,
			Routes:       map[string]string{"example.test": blocked.Addr, "other.test": open.Addr},
		},
	}
	// Tests send from a domain nobody verified.
	cfg.Service.AllowUnverifiedDomains = true
	a := startApp(t, cfg)
	b := &bundle{app: a, base: "http://" + a.HTTPAddr()}

	code, resp := b.do(t, http.MethodPost, "/v1/suppressions", map[string]any{"suppressions": []any{
		map[string]any{"address": "*@Example.test"},
		map[string]any{"address": "late@other.test", "expires_at": time.Now().Add(time.Hour).Format(time.RFC3339)},
	}})
	if code != http.StatusOK || len(resp["suppressions"].([]any)) != 2 {
		t.Fatalf("add: %d %v", code, resp)
	}
	// Bad entries are named, and nothing of the call is stored.
	code, resp = b.do(t, http.MethodPost, "/v1/suppressions", map[string]any{"suppressions": []any{
		map[string]any{"address": "fine@other.test"},
		map[string]any{"address": "no-at-sign"},
	}})
	if fv := fieldViolations(resp); code != http.StatusBadRequest || !slices.Equal(fv, []string{"suppressions[1].address"}) {
		t.Errorf("bad add: %d %v", code, resp)
	}
	if code, _ := b.do(t, http.MethodGet, "/v1/suppressions/fine@other.test", nil); code != http.StatusNotFound {
		t.Errorf("an entry of a refused call was stored: %d", code)
	}
	// late@'s entry ends: expire it now rather than wait for it.
	pool, err := pgxpool.New(context.Background(), a.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(context.Background(),
		`UPDATE suppressions SET expires_at = now() - interval '1 second' WHERE address = 'late@other.test'`); err != nil {
		t.Fatal(err)
	}

	// Every recipient suppressed: failed at once.
	code, resp = b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "shop@posthaste.test"}, "to": []any{map[string]any{"address": "ann@example.test"}},
		"subject": "hi", "text": "hello",
	})
	if code != http.StatusAccepted || !slices.Equal(receiptStatuses(resp), []string{"suppressed/manual"}) {
		t.Fatalf("send to a suppressed domain: %d %v", code, resp)
	}
	onlySuppressed := resp["id"].(string)
	if _, msg := b.do(t, http.MethodGet, "/v1/messages/"+onlySuppressed, nil); msg["status"] != "failed" {
		t.Errorf("all suppressed: status %v", msg["status"])
	}

	// Mixed: the others go on, the expired entry does not hold late@ back.
	code, resp = b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "shop@posthaste.test"},
		"to": []any{map[string]any{"address": "bob@example.test"}, map[string]any{"address": "alice@other.test"},
			map[string]any{"address": "late@other.test"}},
		"subject": "hi", "text": "hello",
	})
	if code != http.StatusAccepted || !slices.Equal(receiptStatuses(resp), []string{"suppressed/manual", "queued/", "queued/"}) {
		t.Fatalf("mixed send: %d %v", code, resp)
	}
	b.waitStatus(t, resp["id"].(string), "partially_delivered")
	if got := received(open); !slices.Equal(got, []string{"alice@other.test", "late@other.test"}) {
		t.Errorf("other.test's MX received %v", got)
	}
	// Both messages were accepted before the mixed one was delivered; the
	// suppressed recipients were never due, so example.test's MX was never
	// contacted.
	if n := blocked.Connections(); n != 0 {
		t.Errorf("the MX of the suppressed domain got %d connections", n)
	}

	// The listing shows the entries; deleting the domain's lets mail through.
	code, resp = b.do(t, http.MethodGet, "/v1/suppressions?address_prefix=*@&page_size=1", nil)
	if list, _ := resp["suppressions"].([]any); code != http.StatusOK || len(list) != 1 || list[0].(map[string]any)["address"] != "*@example.test" {
		t.Errorf("list: %d %v", code, resp)
	}
	if code, resp := b.do(t, http.MethodDelete, "/v1/suppressions/*@example.test", nil); code != http.StatusOK {
		t.Fatalf("delete: %d %v", code, resp)
	}
	code, resp = b.do(t, http.MethodPost, "/v1/suppressions:delete", map[string]any{"addresses": []any{"late@other.test", "none@other.test"}})
	if deleted, _ := resp["deleted"].([]any); code != http.StatusOK || len(deleted) != 1 {
		t.Errorf("bulk delete: %d %v", code, resp)
	}
	id := b.send(t, "bob@example.test")
	b.waitStatus(t, id, "delivered")
	if got := received(blocked); !slices.Equal(got, []string{"bob@example.test"}) {
		t.Errorf("after the delete example.test's MX received %v", got)
	}
}

// fieldViolations lists the fields a REST error names.
func fieldViolations(resp map[string]any) []string {
	var out []string
	e, _ := resp["error"].(map[string]any)
	fvs, _ := e["field_violations"].([]any)
	for _, fv := range fvs {
		out = append(out, fv.(map[string]any)["field"].(string))
	}
	return out
}
