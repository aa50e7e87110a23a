// Package deploy_test checks the deployment files in this directory against
// the binary they deploy: that they parse, that the image's build command
// builds, that every setting they pass exists, that ports and probes are
// the ones serve listens on and answers, that the alerts and the dashboard
// only use metrics the service exports, and that the README's examples
// work against a sandbox server.
package deploy_test

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v4"

	"github.com/posthaste/posthaste/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// metrics are the names the service exports (internal metrics package);
// alerts and dashboards may use nothing else.
var metrics = []string{
	"posthaste_messages_accepted_total",
	"posthaste_recipients_final_total",
	"posthaste_smtp_attempts_total",
	"posthaste_queue_depth",
	"posthaste_queue_oldest_due_seconds",
	"posthaste_delivery_latency_seconds",
	"posthaste_smtp_session_step_seconds",
	"posthaste_smtp_open_connections",
	"posthaste_bounce_reports_total",
	"posthaste_webhook_deliveries_total",
	"posthaste_api_requests_total",
	"posthaste_api_request_duration_seconds",
	"posthaste_db_pool_connections",
	"posthaste_retention_rows_total",
	"posthaste_ready",
}

// deployFiles returns every file under deploy/ but the tests.
func deployFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && !strings.HasSuffix(path, "_test.go") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// yamlDocs decodes every document of a (multi-document) YAML file.
func yamlDocs(t *testing.T, path string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(readFile(t, path)))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if err == io.EOF {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, len(docs)+1, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
}

// kubeObject returns the manifest of the given kind and name.
func kubeObject(t *testing.T, kind, name string) map[string]any {
	t.Helper()
	paths, _ := filepath.Glob("kubernetes/*.yaml")
	for _, p := range paths {
		for _, doc := range yamlDocs(t, p) {
			if doc["kind"] == kind && dig(doc, "metadata", "name") == name {
				return doc
			}
		}
	}
	t.Fatalf("no %s %s in deploy/kubernetes", kind, name)
	return nil
}

// dig walks nested maps and lists: a string key indexes a map, an int a
// list. A missing step gives nil.
func dig(v any, path ...any) any {
	for _, step := range path {
		switch k := step.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func TestFilesParse(t *testing.T) {
	t.Parallel()
	n := 0
	for _, path := range deployFiles(t) {
		switch filepath.Ext(path) {
		case ".yaml", ".yml":
			if len(yamlDocs(t, path)) == 0 {
				t.Errorf("%s: no YAML document", path)
			}
			n++
		case ".json":
			var v any
			if err := json.Unmarshal([]byte(readFile(t, path)), &v); err != nil {
				t.Errorf("%s: %v", path, err)
			}
			n++
		}
	}
	if n < 8 {
		t.Errorf("parsed only %d YAML and JSON files", n)
	}
}

// metricName matches a metric name in a PromQL expression.
var metricName = regexp.MustCompile(`\bposthaste_[a-z0-9_]+`)

// checkMetrics fails for every metric in expr the service does not export;
// histograms are used through their _bucket, _sum and _count series.
func checkMetrics(t *testing.T, where, expr string) {
	t.Helper()
	names := metricName.FindAllString(expr, -1)
	if len(names) == 0 {
		t.Errorf("%s: no posthaste metric in %q", where, expr)
	}
	for _, name := range names {
		base := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(name, suffix); ok && slices.Contains(metrics, b) {
				base = b
			}
		}
		if !slices.Contains(metrics, base) {
			t.Errorf("%s: unknown metric %s", where, name)
		}
	}
}

// headingAnchors returns the anchors GitHub gives a Markdown file's
// headings.
func headingAnchors(t *testing.T, path string) map[string]bool {
	t.Helper()
	anchors := map[string]bool{}
	drop := regexp.MustCompile(`[^a-z0-9 _-]`)
	for _, line := range strings.Split(readFile(t, path), "\n") {
		if !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.ToLower(strings.TrimSpace(strings.TrimLeft(line, "#")))
		anchors[strings.ReplaceAll(drop.ReplaceAllString(h, ""), " ", "-")] = true
	}
	return anchors
}

func TestAlerts(t *testing.T) {
	t.Parallel()
	docs := yamlDocs(t, "prometheus/alerts.yaml")
	runbook := regexp.MustCompile(`^https://github\.com/posthaste/posthaste/blob/main/(docs/[a-z]+\.md)#([a-z0-9-]+)$`)
	n := 0
	for _, group := range dig(docs[0], "groups").([]any) {
		for _, r := range dig(group, "rules").([]any) {
			name, _ := dig(r, "alert").(string)
			if name == "" {
				continue
			}
			n++
			expr, _ := dig(r, "expr").(string)
			checkMetrics(t, name, expr)
			for _, a := range []string{"summary", "description", "runbook_url"} {
				if s, _ := dig(r, "annotations", a).(string); strings.TrimSpace(s) == "" {
					t.Errorf("%s: no %s annotation", name, a)
				}
			}
			url, _ := dig(r, "annotations", "runbook_url").(string)
			m := runbook.FindStringSubmatch(url)
			if m == nil {
				t.Errorf("%s: runbook_url %q does not point into docs/", name, url)
				continue
			}
			if !headingAnchors(t, filepath.Join("..", m[1]))[m[2]] {
				t.Errorf("%s: %s has no heading #%s", name, m[1], m[2])
			}
		}
	}
	if n < 5 {
		t.Errorf("only %d alerts", n)
	}
}

func TestDashboard(t *testing.T) {
	t.Parallel()
	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal([]byte(readFile(t, "grafana/posthaste.json")), &d); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			checkMetrics(t, p.Title, q.Expr)
			for _, name := range metricName.FindAllString(q.Expr, -1) {
				seen[strings.TrimSuffix(name, "_bucket")] = true
			}
		}
	}
	for _, m := range metrics {
		if !seen[m] {
			t.Errorf("no panel shows %s", m)
		}
	}
}

func TestKubernetesHardening(t *testing.T) {
	t.Parallel()
	dep := kubeObject(t, "Deployment", "posthaste")
	pod := dig(dep, "spec", "template", "spec")
	c := dig(pod, "containers", 0)
	sc := dig(c, "securityContext")
	want := map[string]any{
		"runAsNonRoot":             true,
		"readOnlyRootFilesystem":   true,
		"allowPrivilegeEscalation": false,
		"runAsUser":                dockerUID(t),
	}
	for k, v := range want {
		if got := dig(sc, k); got != v {
			t.Errorf("container securityContext.%s = %v, want %v", k, got, v)
		}
	}
	if got := dig(sc, "capabilities", "drop", 0); got != "ALL" {
		t.Errorf("capabilities drop %v, want ALL", got)
	}
	if got := dig(sc, "seccompProfile", "type"); got != "RuntimeDefault" {
		t.Errorf("seccompProfile %v, want RuntimeDefault", got)
	}
	for _, k := range []string{"requests", "limits"} {
		for _, r := range []string{"cpu", "memory"} {
			if dig(c, "resources", k, r) == nil {
				t.Errorf("no resources.%s.%s", k, r)
			}
		}
	}
	// The grace period must cover the drain plus the 30s serve takes after
	// it to give leases back.
	shutdown, err := time.ParseDuration(dig(kubeObject(t, "ConfigMap", "posthaste"), "data", "POSTHASTE_SHUTDOWN_TIMEOUT").(string))
	if err != nil {
		t.Fatal(err)
	}
	grace, _ := dig(pod, "terminationGracePeriodSeconds").(int)
	if time.Duration(grace)*time.Second <= shutdown+30*time.Second {
		t.Errorf("terminationGracePeriodSeconds %d is not longer than the shutdown timeout %s plus 30s", grace, shutdown)
	}
	if dig(kubeObject(t, "ConfigMap", "posthaste"), "data", "POSTHASTE_HOSTNAME") == nil {
		t.Error("POSTHASTE_HOSTNAME not set: pods would say EHLO localhost.localdomain")
	}
	for _, kind := range []string{"PodDisruptionBudget", "HorizontalPodAutoscaler", "Service", "Secret"} {
		kubeObject(t, kind, "posthaste")
	}
	if got := dig(kubeObject(t, "Service", "posthaste-grpc"), "spec", "clusterIP"); got != "None" {
		t.Errorf("posthaste-grpc clusterIP %v, want None (headless, for client-side balancing)", got)
	}
	// Every Service's targetPort names a container port.
	names := map[string]bool{}
	for _, p := range dig(c, "ports").([]any) {
		names[dig(p, "name").(string)] = true
	}
	for _, svc := range []string{"posthaste", "posthaste-grpc", "posthaste-bounce"} {
		for _, p := range dig(kubeObject(t, "Service", svc), "spec", "ports").([]any) {
			if tp, _ := dig(p, "targetPort").(string); !names[tp] {
				t.Errorf("Service %s: targetPort %v is not a container port", svc, dig(p, "targetPort"))
			}
		}
	}
}

// dockerUID is the numeric user of the image's final stage.
func dockerUID(t *testing.T) int {
	t.Helper()
	m := regexp.MustCompile(`(?m)^USER (\d+)(:\d+)?$`).FindAllStringSubmatch(readFile(t, "Dockerfile"), -1)
	if len(m) == 0 {
		t.Fatal("Dockerfile: no numeric USER")
	}
	uid, _ := strconv.Atoi(m[len(m)-1][1])
	if uid == 0 {
		t.Fatal("Dockerfile: USER is root")
	}
	return uid
}

func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	unit := readFile(t, "posthaste.service")
	for _, line := range []string{
		"ProtectSystem=strict",
		"StateDirectory=posthaste",
		"ReadWritePaths=/var/lib/posthaste",
		"Environment=POSTHASTE_DATA_DIR=/var/lib/posthaste",
		"EnvironmentFile=/etc/posthaste/env",
		"NoNewPrivileges=yes",
	} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(line) + `$`).MatchString(unit) {
			t.Errorf("posthaste.service: no line %q", line)
		}
	}
	if !regexp.MustCompile(`(?m)^(DynamicUser=yes|User=\S+)$`).MatchString(unit) {
		t.Error("posthaste.service runs as root")
	}
}
