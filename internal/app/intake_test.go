package app_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
)

// REST reaches the gRPC server over the in-memory connection: calls are
// authenticated and logged by the gRPC interceptors like gRPC calls, and
// the batch endpoint answers per message.
func TestRESTThroughInMemoryConnection(t *testing.T) {
	t.Parallel()
	cfg := baseConfig(t)
	logs := &logBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a := start(t, cfg)

	post := func(path, key, body string) (int, http.Header, []byte) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, "http://"+a.HTTPAddr()+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, resp.Header, b
	}

	if code, _, body := post("/v1/messages", testKey, sendBody); code != http.StatusAccepted {
		t.Fatalf("send: HTTP %d %s", code, body)
	}
	if code, _, body := post("/v1/messages", "", sendBody); code != http.StatusUnauthorized {
		t.Errorf("send without a key: HTTP %d %s, want 401", code, body)
	}
	if code, _, body := post("/v1/messages", "ph_not_a_key_0123456789", sendBody); code != http.StatusUnauthorized {
		t.Errorf("send with an unknown key: HTTP %d %s, want 401", code, body)
	}
	log := logs.String()
	// One line per REST request, as a REST call; the in-process gRPC hop
	// is below info.
	if !strings.Contains(log, `msg="rest call" component=api protocol=rest method=POST route=/v1/messages path=/v1/messages code=202`) {
		t.Errorf("the REST send was not logged as a REST call:\n%s", log)
	}
	if strings.Contains(log, "method=/posthaste.v1.MailService/SendMessage") {
		t.Errorf("the REST send's gRPC hop was logged at info:\n%s", log)
	}

	bad := strings.Replace(sendBody, "@example.test", "@", 1)
	code, _, body := post("/v1/messages:batchSend", testKey, `{"messages":[`+sendBody+`,`+bad+`]}`)
	if code != http.StatusOK {
		t.Fatalf("batch: HTTP %d %s", code, body)
	}
	var batch struct {
		Results []struct {
			Accepted *struct{ ID string } `json:"accepted"`
			Error    *struct {
				Code            int
				FieldViolations []struct{ Field string } `json:"field_violations"`
			} `json:"error"`
		} `json:"results"`
	}
	if err := json.Unmarshal(body, &batch); err != nil {
		t.Fatal(err)
	}
	if len(batch.Results) != 2 || batch.Results[0].Accepted == nil || batch.Results[1].Error == nil ||
		batch.Results[1].Error.Code != 400 || len(batch.Results[1].Error.FieldViolations) == 0 ||
		!strings.HasPrefix(batch.Results[1].Error.FieldViolations[0].Field, "messages[1].") {
		t.Errorf("batch answered %s", body)
	}

	many := `{"messages":[` + strings.Repeat(sendBody+",", 500) + sendBody + `]}`
	code, _, body = post("/v1/messages:batchSend", testKey, many)
	if code != http.StatusBadRequest || !strings.Contains(string(body), `"field":"messages"`) {
		t.Errorf("batch of 501: HTTP %d %s, want 400 naming messages", code, body)
	}
	if n := countMessages(t, a.DatabaseURL()); n != 2 {
		t.Errorf("stored %d messages, want 2", n)
	}
}
