package deploy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/dynamicpb"

	// The API's descriptors, for the grpcurl examples.
	_ "github.com/posthaste/posthaste/proto/posthaste/v1"
)

// runnableDocs are the documents whose shell examples are run against the
// sandbox server. Every ```sh block in them runs, in order, unless the line
// before it is a comment that says why not:
//
//	<!-- not run: needs a real MX -->
//
// The examples are run as written, with localhost:8080 and localhost:9090
// replaced by the server's addresses, the README's webhook endpoint by one
// of the test's, and the variables they use (see exampleEnv) set;
// "posthaste" is the binary under test.
var runnableDocs = []string{"../docs/api.md", "../docs/troubleshooting.md", "../docs/operations.md", "../README.md"}

// readmeHook is the webhook endpoint the README registers.
const readmeHook = "https://example.com/hooks/posthaste"

// example is one ```sh block of a document.
type example struct {
	path string
	line int    // of the opening fence
	body string // without the fences and the indentation of a list item
	skip string // why it is not run; empty when it is
}

var (
	fenceOpen = regexp.MustCompile("^(\\s*)```(sh|bash)\\s*$")
	notRun    = regexp.MustCompile(`^\s*<!--\s*not run:(.*?)-->\s*$`)
)

// examples returns the shell blocks of a Markdown document. A "not run"
// comment without a reason, or not directly before a block, is an error:
// a skipped example must say why, and a stray comment skips nothing.
func examples(path, markdown string) ([]example, error) {
	var (
		out     []example
		pending string // the reason of a "not run" comment just seen
		pendAt  int
	)
	lines := strings.Split(markdown, "\n")
	for i := 0; i < len(lines); i++ {
		line := lines[i]
		if m := notRun.FindStringSubmatch(line); m != nil {
			if strings.TrimSpace(m[1]) == "" {
				return nil, fmt.Errorf("%s:%d: a not-run comment must give the reason", path, i+1)
			}
			pending, pendAt = strings.TrimSpace(m[1]), i+1
			continue
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		m := fenceOpen.FindStringSubmatch(line)
		if m == nil {
			if pending != "" {
				return nil, fmt.Errorf("%s:%d: a not-run comment must come right before a ```sh block", path, pendAt)
			}
			if strings.HasPrefix(strings.TrimSpace(line), "```") {
				// Skip over a block of another language, whose lines could
				// look like anything.
				for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
				}
			}
			continue
		}
		ex := example{path: path, line: i + 1, skip: pending}
		pending = ""
		var body strings.Builder
		for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			body.WriteString(strings.TrimPrefix(lines[i], m[1]))
			body.WriteString("\n")
		}
		if i == len(lines) {
			return nil, fmt.Errorf("%s:%d: the block is not closed", path, ex.line)
		}
		ex.body = body.String()
		out = append(out, ex)
	}
	if pending != "" {
		return nil, fmt.Errorf("%s:%d: a not-run comment must come right before a ```sh block", path, pendAt)
	}
	return out, nil
}

func TestExamplesConvention(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		doc  string
		want []string // the skip reason of each block
		err  string
	}{
		{"```sh\necho a\n```\n\n<!-- not run: needs a real MX -->\n```sh\necho b\n```\n", []string{"", "needs a real MX"}, ""},
		{"1. Look:\n\n   ```sh\n   echo a\n   ```\n", []string{""}, ""},
		{"```json\n<!-- not run: x -->\n```\n```sh\necho\n```\n", []string{""}, ""},
		{"<!-- not run: -->\n```sh\necho\n```\n", nil, "must give the reason"},
		{"<!-- not run: why -->\ntext\n```sh\necho\n```\n", nil, "right before"},
		{"```sh\necho\n", nil, "not closed"},
	} {
		got, err := examples("doc.md", tc.doc)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want one saying %q", tc.doc, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.doc, err)
			continue
		}
		var skips []string
		for _, ex := range got {
			skips = append(skips, ex.skip)
		}
		if strings.Join(skips, "|") != strings.Join(tc.want, "|") || len(got) != len(tc.want) {
			t.Errorf("%q: skips %q, want %q", tc.doc, skips, tc.want)
		}
	}
}

// examplePrelude comes before each example: the first command that fails
// fails the example, and says on which of its lines.
const examplePrelude = `set -euo pipefail
trap 'echo "example failed at its line $((LINENO - 2))" >&2' ERR
`

var failedLine = regexp.MustCompile(`example failed at its line (\d+)`)

// runDocExamples runs the examples of runnableDocs against the sandbox,
// with bin as the posthaste command.
func runDocExamples(t *testing.T, s sandbox, bin string) {
	setup := exampleEnv(t, s, bin)
	dir := t.TempDir()
	for _, path := range runnableDocs {
		exs, err := examples(path, readFile(t, path))
		if err != nil {
			t.Fatal(err)
		}
		ran := 0
		for _, ex := range exs {
			if ex.skip != "" {
				continue
			}
			ran++
			script := strings.NewReplacer("localhost:8080", s.http, "localhost:9090", s.grpc,
				readmeHook, setup.hook).Replace(ex.body)
			c := exec.Command("bash", "-c", examplePrelude+script)
			c.Dir = dir
			c.Env = setup.env
			if path == "../README.md" {
				// exec keeps the last of two values of a variable.
				c.Env = append(slices.Clip(setup.env), "ID="+setup.readmeID)
			}
			out, err := c.CombinedOutput()
			if err != nil {
				where := ex.line
				if m := failedLine.FindSubmatch(out); m != nil {
					n, _ := strconv.Atoi(string(m[1]))
					where += n
				}
				t.Errorf("%s:%d: example failed: %v\n%s\n%s",
					strings.TrimPrefix(ex.path, "../"), where, err, ex.body, out)
			}
		}
		if ran == 0 {
			t.Errorf("%s: no example was run", path)
		}
	}
}

// exampleSetup is what the examples run with.
type exampleSetup struct {
	env  []string
	hook string // a webhook endpoint of the test's
	// readmeID is the README's ID: a scheduled message of its own, since
	// its Try it section cancels the message, as docs/api.md does its ID.
	readmeID string
}

// exampleEnv prepares what the examples refer to and returns their
// environment:
//
//	KEY, POSTHASTE_API_KEY  an API key with every scope
//	ADMIN_KEY               the same key, which has the admin scope
//	KEY_ID                  another key of the project, for the README to
//	                        revoke: the key in use must stay
//	POSTHASTE_SERVER        the gRPC address, for the client commands
//	POSTHASTE_DATABASE_URL  the database, for the commands that use it
//	                        directly (keys, projects)
//	ID                      a message scheduled for later, so that there is
//	                        something to cancel, with a bounced one before it
//	WH, DELIVERY            a webhook endpoint and one of its deliveries
//	PATH                    starts with the directory of bin, after that
//	                        of a curl that fails on an HTTP error status
func exampleEnv(t *testing.T, s sandbox, bin string) exampleSetup {
	t.Helper()
	hooks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	t.Cleanup(hooks.Close)
	api := func(method, path string, body any) map[string]any {
		t.Helper()
		buf, _ := json.Marshal(body)
		req, err := http.NewRequest(method, "http://"+s.http+path, bytes.NewReader(buf))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+s.key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var out map[string]any
		if resp.StatusCode/100 != 2 || json.Unmarshal(raw, &out) != nil {
			t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, raw)
		}
		return out
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("waited 30s for %s", what)
			}
		}
	}

	wh := api(http.MethodPost, "/v1/webhooks", map[string]any{
		"url": hooks.URL + "/hooks/posthaste", "event_types": []string{"bounced"},
	})["webhook"].(map[string]any)["id"].(string)
	bounced := api(http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "shop@example.com"},
		"to":   []any{map[string]any{"address": "bounce@example.com"}}, "subject": "s", "text": "t",
	})["id"].(string)
	waitFor("the bounce", func() bool {
		return api(http.MethodGet, "/v1/messages/"+bounced, nil)["status"] == "bounced"
	})
	var delivery string
	waitFor("the webhook delivery", func() bool {
		ds, _ := api(http.MethodGet, "/v1/webhooks/"+wh+"/deliveries", nil)["deliveries"].([]any)
		for _, d := range ds {
			if d := d.(map[string]any); d["state"] == "delivered" {
				delivery = d["id"].(string)
			}
		}
		return delivery != ""
	})
	schedule := func() string {
		return api(http.MethodPost, "/v1/messages", map[string]any{
			"from":    map[string]any{"address": "shop@example.com"},
			"to":      []any{map[string]any{"address": "someone@example.com"}, map[string]any{"address": "ada@example.com"}},
			"subject": "later", "text": "t",
			"send_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
		})["id"].(string)
	}
	scheduled, readmeID := schedule(), schedule()
	keyID := api(http.MethodPost, "/v1/keys", map[string]any{
		"name": "revoked-by-the-readme", "scopes": []string{"read"},
	})["api_key"].(map[string]any)["id"].(string)

	// curl fails on an HTTP error status, which the documents leave out
	// for brevity: a curl of the test's comes first on the PATH.
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatalf("the examples need curl: %v", err)
	}
	tools := t.TempDir()
	wrapper := "#!/bin/sh\nexec " + curl + " --fail-with-body --show-error --max-time 30 \"$@\"\n"
	if err := os.WriteFile(filepath.Join(tools, "curl"), []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "POSTHASTE_") && !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	env = append(env,
		"PATH="+strings.Join([]string{tools, filepath.Dir(bin), os.Getenv("PATH")}, string(os.PathListSeparator)),
		"KEY="+s.key, "POSTHASTE_API_KEY="+s.key, "ADMIN_KEY="+s.key, "KEY_ID="+keyID,
		"POSTHASTE_SERVER="+s.grpc, "POSTHASTE_DATABASE_URL="+s.db,
		"ID="+scheduled, "WH="+wh, "DELIVERY="+delivery,
	)
	return exampleSetup{env: env, hook: hooks.URL + "/hooks/posthaste", readmeID: readmeID}
}

// TestGrpcurlExamples checks the grpcurl examples of the README and docs/,
// which are not run (grpcurl is not a dependency): each names a method the
// API has, and its request JSON holds only fields of that method's request,
// with values of their types.
func TestGrpcurlExamples(t *testing.T) {
	t.Parallel()
	n := 0
	for _, dc := range docsCommands(t) {
		if !strings.HasPrefix(dc.cmd, "grpcurl ") {
			continue
		}
		n++
		// The shell takes the command apart as it would for grpcurl.
		c := exec.Command("bash", "-c", `grpcurl() { printf '%s\0' "$@"; }`+"\n"+dc.cmd)
		c.Env = append(os.Environ(), "KEY=k", "ID=0193a5b4-0000-7000-8000-000000000000")
		out, err := c.Output()
		if err != nil {
			t.Errorf("%s: %v\n%s", dc.path, err, dc.cmd)
			continue
		}
		args := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
		if err := checkGrpcurlCall(args); err != nil {
			t.Errorf("%s: %v\n%s", dc.path, err, dc.cmd)
		}
	}
	if n == 0 {
		t.Error("found no grpcurl examples")
	}
	// The check itself finds a renamed method and a field that is not.
	for _, bad := range [][]string{
		{"-d", `{"id": "x"}`, "localhost:9090", "posthaste.v1.MailService/GetMesage"},
		{"-d", `{"message_id": "x"}`, "localhost:9090", "posthaste.v1.MailService/GetMessage"},
		{"-d", `{"id": 7}`, "localhost:9090", "posthaste.v1.MailService/GetMessage"},
	} {
		if checkGrpcurlCall(bad) == nil {
			t.Errorf("grpcurl %q passed the check", bad)
		}
	}
}

// checkGrpcurlCall checks grpcurl's arguments: the last names the method
// as service/method, and -d, when given, is its request in JSON.
func checkGrpcurlCall(args []string) error {
	full := args[len(args)-1]
	svcName, method, ok := strings.Cut(full, "/")
	if !ok {
		return fmt.Errorf("the last argument %q is not service/method", full)
	}
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(svcName))
	if err != nil {
		return fmt.Errorf("service %s: %w", svcName, err)
	}
	svc, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return fmt.Errorf("%s is not a service", svcName)
	}
	md := svc.Methods().ByName(protoreflect.Name(method))
	if md == nil {
		return fmt.Errorf("%s has no method %s", svcName, method)
	}
	for i, a := range args {
		if a == "-d" && i+1 < len(args) {
			if err := protojson.Unmarshal([]byte(args[i+1]), dynamicpb.NewMessage(md.Input())); err != nil {
				return fmt.Errorf("request of %s: %w", full, err)
			}
		}
	}
	return nil
}
