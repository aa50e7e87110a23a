package service_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// otherProject makes a project and a key of it with scopes.
func otherProject(t *testing.T, e *env, name string, scopes ...string) (key string, project db.Project) {
	t.Helper()
	p, err := e.store.CreateProject(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	key, _ = createScopedKey(t, e.store, p.ID, name+"-key", scopes...)
	return key, p
}

// A key of project B never reaches project A's message: Get and Cancel
// answer exactly as for an unknown id, List leaves it out, and the message
// is not canceled.
func TestProjectIsolation(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	sent, err := e.client.SendMessage(e.ctx(t), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	keyB, _ := otherProject(t, e, "b", db.ScopeSend, db.ScopeRead)
	ctxB := withKey(t.Context(), keyB)
	ownB, err := e.client.SendMessage(ctxB, validRequest())
	if err != nil {
		t.Fatal(err)
	}
	unknown := uuid.NewString()

	for _, tc := range []struct {
		name string
		call func(id string) error
	}{
		{"GetMessage", func(id string) error {
			_, err := e.client.GetMessage(ctxB, &posthastev1.GetMessageRequest{Id: id})
			return err
		}},
		{"CancelMessage", func(id string) error {
			_, err := e.client.CancelMessage(ctxB, &posthastev1.CancelMessageRequest{Id: id})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			foreign := status.Convert(tc.call(sent.GetId()))
			missing := status.Convert(tc.call(unknown))
			if foreign.Code() != codes.NotFound || foreign.Code() != missing.Code() || foreign.Message() != missing.Message() {
				t.Errorf("another project's message: %v; unknown id: %v; want the same NotFound", foreign, missing)
			}
		})
	}

	list, err := e.client.ListMessages(ctxB, &posthastev1.ListMessagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetMessages()) != 1 || list.GetMessages()[0].GetId() != ownB.GetId() {
		t.Errorf("B lists %v, want only its own message %s", list.GetMessages(), ownB.GetId())
	}
	list, err = e.client.ListMessages(e.ctx(t), &posthastev1.ListMessagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetMessages()) != 1 || list.GetMessages()[0].GetId() != sent.GetId() {
		t.Errorf("A lists %v, want only its own message %s", list.GetMessages(), sent.GetId())
	}

	m, err := e.client.GetMessage(e.ctx(t), &posthastev1.GetMessageRequest{Id: sent.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if m.GetStatus() != db.StatusQueued {
		t.Errorf("A's message is %s after B's cancel, want queued", m.GetStatus())
	}
	var canceled int
	if err := e.raw.QueryRow(t.Context(),
		`SELECT count(*) FROM events WHERE message_id = $1 AND type = 'canceled'`, sent.GetId()).Scan(&canceled); err != nil {
		t.Fatal(err)
	}
	if canceled != 0 {
		t.Errorf("B's cancel wrote %d events on A's message", canceled)
	}
}

// Each call needs its scope; without it the answer is PermissionDenied
// naming the scope, and nothing is stored. admin allows everything.
func TestScopes(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	sent, err := e.client.SendMessage(e.ctx(t), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	raw := &posthastev1.SendRawMessageRequest{
		Raw:          b64("From: a@example.test\r\nSubject: x\r\n\r\nhi\r\n"),
		EnvelopeFrom: "a@example.test",
		Recipients:   []string{"b@example.test"},
	}
	calls := []struct {
		name  string
		scope string
		call  func(ctx context.Context) error
	}{
		{"SendMessage", db.ScopeSend, func(ctx context.Context) error {
			_, err := e.client.SendMessage(ctx, validRequest())
			return err
		}},
		{"SendRawMessage", db.ScopeSend, func(ctx context.Context) error {
			_, err := e.client.SendRawMessage(ctx, raw)
			return err
		}},
		{"CancelMessage", db.ScopeSend, func(ctx context.Context) error {
			_, err := e.client.CancelMessage(ctx, &posthastev1.CancelMessageRequest{Id: sent.GetId()})
			return err
		}},
		{"GetMessage", db.ScopeRead, func(ctx context.Context) error {
			_, err := e.client.GetMessage(ctx, &posthastev1.GetMessageRequest{Id: sent.GetId()})
			return err
		}},
		{"ListMessages", db.ScopeRead, func(ctx context.Context) error {
			_, err := e.client.ListMessages(ctx, &posthastev1.ListMessagesRequest{})
			return err
		}},
		{"ListApiKeys", db.ScopeAdmin, func(ctx context.Context) error {
			_, err := e.client.ListApiKeys(ctx, &posthastev1.ListApiKeysRequest{})
			return err
		}},
		{"CreateApiKey", db.ScopeAdmin, func(ctx context.Context) error {
			_, err := e.client.CreateApiKey(ctx, &posthastev1.CreateApiKeyRequest{Name: "x", Scopes: []string{"read"}})
			return err
		}},
		{"RevokeApiKey", db.ScopeAdmin, func(ctx context.Context) error {
			_, err := e.client.RevokeApiKey(ctx, &posthastev1.RevokeApiKeyRequest{Id: uuid.NewString()})
			return err
		}},
	}
	keys := map[string]string{}
	for _, scope := range db.Scopes() {
		keys[scope], _ = createScopedKey(t, e.store, uuid.Nil, scope+"-only", scope)
	}
	messagesBefore, _ := e.counts(t)
	keysBefore := len(mustListKeys(t, e.store))
	for _, c := range calls {
		for _, scope := range db.Scopes() {
			t.Run(c.name+"/"+scope, func(t *testing.T) {
				err := c.call(withKey(t.Context(), keys[scope]))
				allowed := scope == c.scope || scope == db.ScopeAdmin
				st := status.Convert(err)
				switch {
				case allowed && st.Code() == codes.PermissionDenied:
					t.Errorf("a %s key was refused: %v", scope, err)
				case !allowed && (st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), c.scope+" scope")):
					t.Errorf("a %s key: %v, want PermissionDenied naming the %s scope", scope, err, c.scope)
				}
			})
		}
	}
	// The allowed calls above stored 4 messages (send and admin keys, two
	// send calls each) and one key (the admin key's CreateApiKey); refused
	// ones stored nothing.
	if n, _ := e.counts(t); n != messagesBefore+4 {
		t.Errorf("%d messages stored, want %d", n, messagesBefore+4)
	}
	if n := len(mustListKeys(t, e.store)); n != keysBefore+1 {
		t.Errorf("%d keys, want %d", n, keysBefore+1)
	}
}

func mustListKeys(t *testing.T, store *db.DB) []db.APIKey {
	t.Helper()
	keys, err := store.ListAPIKeys(t.Context(), db.DefaultProjectID())
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// An admin key creates, lists and revokes keys of its own project only.
func TestAPIKeyManagement(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	adminKey, adminID := createScopedKey(t, e.store, uuid.Nil, "admin", db.ScopeAdmin)
	admin := withKey(t.Context(), adminKey)

	created, err := e.client.CreateApiKey(admin, &posthastev1.CreateApiKeyRequest{
		Name: "billing", Scopes: []string{"read", "send", "read"},
	})
	if err != nil {
		t.Fatal(err)
	}
	k := created.GetApiKey()
	if !strings.HasPrefix(created.GetKey(), "ph_") || k.GetName() != "billing" || k.GetProject() != db.DefaultProjectName ||
		!slices.Equal(k.GetScopes(), []string{"send", "read"}) || !strings.HasPrefix(created.GetKey(), k.GetPrefix()) ||
		k.GetRevokedAt() != nil {
		t.Errorf("CreateApiKey = %v", created)
	}
	if _, err := e.client.SendMessage(withKey(t.Context(), created.GetKey()), validRequest()); err != nil {
		t.Errorf("the new key cannot send: %v", err)
	}
	// Without scopes a key gets the CLI's default: send and read.
	plain, err := e.client.CreateApiKey(admin, &posthastev1.CreateApiKeyRequest{Name: "app"})
	if err != nil {
		t.Fatal(err)
	}
	if got := plain.GetApiKey().GetScopes(); !slices.Equal(got, []string{"send", "read"}) {
		t.Errorf("default scopes = %v, want send, read", got)
	}

	list, err := e.client.ListApiKeys(admin, &posthastev1.ListApiKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, l := range list.GetApiKeys() {
		ids = append(ids, l.GetId())
	}
	if want := []string{e.keyID.String(), adminID.String(), k.GetId(), plain.GetApiKey().GetId()}; !slices.Equal(ids, want) {
		t.Errorf("ListApiKeys ids %v, want %v", ids, want)
	}

	// Another project's admin neither sees nor revokes these keys.
	otherAdmin, _ := otherProject(t, e, "other", db.ScopeAdmin)
	other := withKey(t.Context(), otherAdmin)
	list, err = e.client.ListApiKeys(other, &posthastev1.ListApiKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetApiKeys()) != 1 || list.GetApiKeys()[0].GetProject() != "other" {
		t.Errorf("other project lists %v, want only its own key", list.GetApiKeys())
	}
	_, foreign := e.client.RevokeApiKey(other, &posthastev1.RevokeApiKeyRequest{Id: k.GetId()})
	_, missing := e.client.RevokeApiKey(other, &posthastev1.RevokeApiKeyRequest{Id: uuid.NewString()})
	if status.Code(foreign) != codes.NotFound || status.Convert(foreign).Message() != status.Convert(missing).Message() {
		t.Errorf("revoking another project's key: %v; an unknown one: %v", foreign, missing)
	}

	revoked, err := e.client.RevokeApiKey(admin, &posthastev1.RevokeApiKeyRequest{Id: k.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if revoked.GetRevokedAt() == nil {
		t.Errorf("RevokeApiKey = %v, want revoked_at set", revoked)
	}
	if _, err := e.client.SendMessage(withKey(t.Context(), created.GetKey()), validRequest()); status.Code(err) != codes.Unauthenticated {
		t.Errorf("revoked key: %v, want Unauthenticated", err)
	}

	before := len(mustListKeys(t, e.store))
	for _, tc := range []struct {
		name  string
		req   *posthastev1.CreateApiKeyRequest
		field string
	}{
		{"no name", &posthastev1.CreateApiKeyRequest{Scopes: []string{"send"}}, "name"},
		{"long name", &posthastev1.CreateApiKeyRequest{Name: strings.Repeat("n", 101), Scopes: []string{"send"}}, "name"},
		{"control character", &posthastev1.CreateApiKeyRequest{Name: "a\nb", Scopes: []string{"send"}}, "name"},
		{"empty scope", &posthastev1.CreateApiKeyRequest{Name: "x", Scopes: []string{""}}, "scopes"},
		{"unknown scope", &posthastev1.CreateApiKeyRequest{Name: "x", Scopes: []string{"send", "write"}}, "scopes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.client.CreateApiKey(admin, tc.req)
			if status.Code(err) != codes.InvalidArgument || !slices.Equal(violations(err), []string{tc.field}) {
				t.Errorf("%v, want InvalidArgument naming %s", err, tc.field)
			}
		})
	}
	if _, err := e.client.RevokeApiKey(admin, &posthastev1.RevokeApiKeyRequest{Id: "nope"}); status.Code(err) != codes.InvalidArgument ||
		!slices.Equal(violations(err), []string{"id"}) {
		t.Errorf("revoke with a malformed id: %v", err)
	}
	if n := len(mustListKeys(t, e.store)); n != before {
		t.Errorf("refused requests stored keys: %d, want %d", n, before)
	}
}
