package gateway_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/service"
)

// restKey makes a key of project (created when not default) with scopes.
func restKey(t *testing.T, e *env, project string, scopes ...string) string {
	t.Helper()
	projectID := db.DefaultProjectID()
	if project != db.DefaultProjectName {
		p, err := e.store.CreateProject(t.Context(), project)
		if err != nil {
			t.Fatal(err)
		}
		projectID = p.ID
	}
	key, prefix, hash, err := service.NewAPIKey()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.CreateAPIKey(t.Context(), db.NewAPIKeyParams{
		ProjectID: projectID, Name: project + "-key", Prefix: prefix, Hash: hash, Scopes: scopes,
	}); err != nil {
		t.Fatal(err)
	}
	return key
}

// Over REST, another project's message is 404 exactly like an unknown id,
// on GET and on cancel, and is never listed.
func TestProjectIsolationOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	sent := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())))
	if sent.code != http.StatusAccepted {
		t.Fatalf("send: %d %s", sent.code, sent.body)
	}
	var receipt struct{ ID string }
	if err := json.Unmarshal(sent.body, &receipt); err != nil {
		t.Fatal(err)
	}
	auth := "Bearer " + restKey(t, e, "b", db.ScopeSend, db.ScopeRead)
	unknown := uuid.NewString()
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/v1/messages/%s"},
		{http.MethodPost, "/v1/messages/%s:cancel"},
		{http.MethodGet, "/v1/messages/%s/raw"},
	} {
		// The same request id for both, so that the bodies can be the same.
		foreign := e.do(t, tc.method, strings.Replace(tc.path, "%s", receipt.ID, 1), strings.NewReader("{}"), "Authorization", auth, "X-Request-Id", "isolation")
		missing := e.do(t, tc.method, strings.Replace(tc.path, "%s", unknown, 1), strings.NewReader("{}"), "Authorization", auth, "X-Request-Id", "isolation")
		if foreign.code != http.StatusNotFound || string(foreign.body) != string(missing.body) {
			t.Errorf("%s %s: another project's message %d %s; unknown id %d %s", tc.method, tc.path,
				foreign.code, foreign.body, missing.code, missing.body)
		}
		decodeError(t, foreign)
	}
	list := e.do(t, http.MethodGet, "/v1/messages", nil, "Authorization", auth)
	if list.code != http.StatusOK || strings.Contains(string(list.body), receipt.ID) {
		t.Errorf("B's listing: %d %s, must not hold %s", list.code, list.body, receipt.ID)
	}
	own := e.do(t, http.MethodGet, "/v1/messages/"+receipt.ID, nil)
	if own.code != http.StatusOK || !strings.Contains(string(own.body), `"status":"queued"`) {
		t.Errorf("A's message after B's cancel: %d %s", own.code, own.body)
	}
}

// A key without the scope a route needs gets 403 naming the scope.
func TestScopesOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	readOnly := "Bearer " + restKey(t, e, db.DefaultProjectName, db.ScopeRead)
	sendOnly := "Bearer " + restKey(t, e, "sender", db.ScopeSend)
	for _, tc := range []struct {
		name, method, path, body, auth, scope string
	}{
		{"send with read", http.MethodPost, "/v1/messages", toJSON(t, validRequest()), readOnly, "send"},
		{"cancel with read", http.MethodPost, "/v1/messages/" + uuid.NewString() + ":cancel", "{}", readOnly, "send"},
		{"get with send", http.MethodGet, "/v1/messages/" + uuid.NewString(), "", sendOnly, "read"},
		{"list with send", http.MethodGet, "/v1/messages", "", sendOnly, "read"},
		{"keys with read", http.MethodGet, "/v1/keys", "", readOnly, "admin"},
		{"create key with send", http.MethodPost, "/v1/keys", `{"name":"x","scopes":["send"]}`, sendOnly, "admin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, tc.method, tc.path, strings.NewReader(tc.body), "Authorization", tc.auth)
			if r.code != http.StatusForbidden {
				t.Fatalf("%d %s, want 403", r.code, r.body)
			}
			if msg := decodeError(t, r).Error.Message; !strings.Contains(msg, tc.scope+" scope") {
				t.Errorf("message %q does not name the %s scope", msg, tc.scope)
			}
		})
	}
	if m, _ := e.counts(t); m != 0 {
		t.Errorf("%d messages stored by refused calls", m)
	}
}

// The key routes: create returns the secret once, list shows the key
// without it, revoke makes it unusable.
func TestAPIKeysOverREST(t *testing.T) {
	t.Parallel()
	e := setup(t, service.Config{})
	admin := "Bearer " + restKey(t, e, db.DefaultProjectName, db.ScopeAdmin)
	r := e.do(t, http.MethodPost, "/v1/keys", strings.NewReader(`{"name":"ci","scopes":["send"]}`), "Authorization", admin)
	if r.code != http.StatusOK {
		t.Fatalf("create: %d %s", r.code, r.body)
	}
	var created struct {
		APIKey struct {
			ID     string   `json:"id"`
			Scopes []string `json:"scopes"`
		} `json:"api_key"`
		Key string `json:"key"`
	}
	if err := json.Unmarshal(r.body, &created); err != nil {
		t.Fatal(err)
	}
	if created.Key == "" || created.APIKey.ID == "" || len(created.APIKey.Scopes) != 1 {
		t.Fatalf("create answered %s", r.body)
	}
	list := e.do(t, http.MethodGet, "/v1/keys", nil, "Authorization", admin)
	if list.code != http.StatusOK || !strings.Contains(string(list.body), created.APIKey.ID) ||
		strings.Contains(string(list.body), created.Key) {
		t.Errorf("list: %d %s; want the key's id, never its secret", list.code, list.body)
	}
	bad := e.do(t, http.MethodPost, "/v1/keys", strings.NewReader(`{"name":"x","scopes":["root"]}`), "Authorization", admin)
	if bad.code != http.StatusBadRequest || strings.Join(decodeError(t, bad).fields(), ",") != "scopes" {
		t.Errorf("unknown scope: %d %s", bad.code, bad.body)
	}
	rev := e.do(t, http.MethodPost, "/v1/keys/"+created.APIKey.ID+":revoke", strings.NewReader("{}"), "Authorization", admin)
	if rev.code != http.StatusOK || !strings.Contains(string(rev.body), "revoked_at") {
		t.Errorf("revoke: %d %s", rev.code, rev.body)
	}
	send := e.do(t, http.MethodPost, "/v1/messages", strings.NewReader(toJSON(t, validRequest())), "Authorization", "Bearer "+created.Key)
	if send.code != http.StatusUnauthorized {
		t.Errorf("send with the revoked key: %d %s", send.code, send.body)
	}
	missing := e.do(t, http.MethodPost, "/v1/keys/"+uuid.NewString()+":revoke", strings.NewReader("{}"), "Authorization", admin)
	if missing.code != http.StatusNotFound {
		t.Errorf("revoke an unknown key: %d %s", missing.code, missing.body)
	}
}
