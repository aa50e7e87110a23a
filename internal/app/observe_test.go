package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/jackc/pgx/v5"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/service"
)

// TestObservability sends mail through the sandbox in a JSON-logging,
// traced process, then checks what an operator sees: the scrape, the log
// lines and the spans.
func TestObservability(t *testing.T) {
	t.Parallel()
	logs := &logBuffer{}
	spans := tracetest.NewInMemoryExporter()
	cfg := app.Config{
		HTTPAddr:        "127.0.0.1:0",
		GRPCAddr:        "127.0.0.1:0",
		DatabaseURL:     testenv.Database(t),
		BootstrapAPIKey: testKey,
		Sandbox:         true,
		Logger:          slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	cfg.Tracing.Exporter = spans
	cfg.Delivery.PollInterval = 100 * time.Millisecond
	a := start(t, cfg)
	b := &bundle{app: a, base: "http://" + a.HTTPAddr()}

	// The first send carries a request id of the test's, to find its line.
	const requestID = "obs-test-request-1"
	body := `{"from":{"address":"sender@posthaste.test"},"to":[{"address":"someone@example.com"}],"subject":"s","text":"t"}`
	req, err := http.NewRequest(http.MethodPost, b.base+"/v1/messages", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testKey)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Request-Id", requestID)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var sent map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&sent); err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("send: %d %v %v", resp.StatusCode, sent, err)
	}
	resp.Body.Close()
	delivered := sent["id"].(string)
	code, bounced := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "sender@posthaste.test"},
		"to":   []any{map[string]any{"address": "bounce@example.com"}}, "subject": "s", "text": "t",
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, bounced)
	}
	b.waitStatus(t, delivered, "delivered")
	b.waitStatus(t, bounced["id"].(string), "bounced")

	t.Run("metrics", func(t *testing.T) {
		// Outcomes are counted once their commit has returned, which can be
		// just after the status shows in the database.
		var families map[string]*dto.MetricFamily
		deadline := time.Now().Add(10 * time.Second)
		for {
			families = scrape(t, "http://"+a.MetricsAddr()+"/metrics")
			if sample(families, "posthaste_recipients_final_total", map[string]string{"outcome": "bounced"}) >= 1 &&
				sample(families, "posthaste_recipients_final_total", map[string]string{"outcome": "delivered", "class": "none"}) >= 1 ||
				time.Now().After(deadline) {
				break
			}
			select {
			case <-t.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
		atLeast := func(name string, labels map[string]string, min float64) {
			t.Helper()
			if v := sample(families, name, labels); v < min {
				t.Errorf("%s%v = %v, want at least %v", name, labels, v, min)
			}
		}
		atLeast("posthaste_messages_accepted_total", nil, 2)
		atLeast("posthaste_recipients_final_total", map[string]string{"outcome": "delivered", "class": "none"}, 1)
		atLeast("posthaste_recipients_final_total", map[string]string{"outcome": "bounced"}, 1)
		atLeast("posthaste_smtp_attempts_total", map[string]string{"result": "2xx"}, 1)
		atLeast("posthaste_smtp_attempts_total", map[string]string{"result": "5xx"}, 1)
		atLeast("posthaste_delivery_latency_seconds", nil, 1)
		atLeast("posthaste_smtp_session_step_seconds", map[string]string{"step": "connect"}, 1)
		atLeast("posthaste_api_requests_total", map[string]string{"protocol": "rest", "method": "POST /v1/messages", "code": "202"}, 2)
		atLeast("posthaste_api_request_duration_seconds", map[string]string{"protocol": "rest", "method": "POST /v1/messages"}, 2)
		atLeast("posthaste_db_pool_connections", map[string]string{"state": "max"}, 1)
		atLeast("posthaste_ready", nil, 1)
		for _, name := range []string{"posthaste_queue_depth", "posthaste_queue_oldest_due_seconds",
			"posthaste_bounce_reports_total", "posthaste_webhook_deliveries_total", "posthaste_retention_rows_total"} {
			if families[name] == nil {
				t.Errorf("%s missing from the scrape", name)
			}
		}
		if g := families["posthaste_smtp_open_connections"]; g != nil {
			for _, m := range g.GetMetric() {
				if p := labelOf(m, "provider"); p != "other" {
					t.Errorf("sandbox connection counted under provider %q", p)
				}
			}
		}
		// No label carries an address, an id or a raw path.
		unbounded := regexp.MustCompile(`@|[0-9a-f]{8}-[0-9a-f]{4}-|/v1/messages/[^{]`)
		for name, f := range families {
			if !strings.HasPrefix(name, "posthaste_") {
				continue
			}
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if unbounded.MatchString(l.GetValue()) {
						t.Errorf("%s has unbounded label %s=%q", name, l.GetName(), l.GetValue())
					}
				}
			}
		}
	})

	t.Run("logs", func(t *testing.T) {
		var restLines, grpcInfo int
		deliveredLine := false
		for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
			var rec map[string]any
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Fatalf("log line is not JSON: %q", line)
			}
			switch {
			case rec["msg"] == "rest call" && rec["request_id"] == requestID:
				restLines++
				if rec["level"] != "INFO" || rec["protocol"] != "rest" || rec["method"] != "POST" ||
					rec["route"] != "/v1/messages" || rec["code"] != float64(202) || rec["duration_ms"] == nil ||
					rec["api_key_id"] == nil || rec["project_id"] == nil || rec["client_addr"] == nil {
					t.Errorf("rest call line lacks fields: %v", rec)
				}
			case rec["msg"] == "grpc call" && rec["request_id"] == requestID:
				grpcInfo++
			case rec["msg"] == "delivery: delivered" && rec["message_id"] == delivered:
				deliveredLine = rec["recipient_id"] != nil && rec["mx_host"] != nil && rec["code"] == float64(250)
			}
			if strings.Contains(line, testKey) {
				t.Errorf("the API key is in the log: %s", line)
			}
		}
		if restLines != 1 || grpcInfo != 0 {
			t.Errorf("request %s: %d rest call lines, %d grpc call lines at info; want 1 and 0", requestID, restLines, grpcInfo)
		}
		if !deliveredLine {
			t.Error("no delivery: delivered line with message, recipient, MX and reply")
		}
	})

	t.Run("traces", func(t *testing.T) {
		var restTrace string
		for _, s := range spans.GetSpans() {
			if s.Name == "rest POST /v1/messages" {
				restTrace = s.SpanContext.TraceID().String()
				break
			}
		}
		if restTrace == "" {
			t.Fatal("no span for the REST call")
		}
		var grpcSpan, dbSpan, smtpSpan bool
		for _, s := range spans.GetSpans() {
			same := s.SpanContext.TraceID().String() == restTrace
			switch {
			case same && s.Name == "posthaste.v1.MailService/SendMessage":
				grpcSpan = true
			case same && strings.HasPrefix(s.Name, "db "):
				dbSpan = true
			case s.Name == "smtp attempt":
				smtpSpan = true
			}
		}
		if !grpcSpan || !dbSpan || !smtpSpan {
			t.Errorf("grpc span in the REST trace %v, db span in it %v, smtp span %v; want all", grpcSpan, dbSpan, smtpSpan)
		}
	})
}

// TestNotReadyWhenSchemaBehind rolls the database's schema back by one
// migration, as a restored backup or a manual rollback would: /healthz and
// gRPC health say not serving, and why.
func TestNotReadyWhenSchemaBehind(t *testing.T) {
	t.Parallel()
	cfg := baseConfig(t)
	cfg.MetricsAddr = "127.0.0.1:0"
	a := start(t, cfg)
	conn, err := pgx.Connect(t.Context(), a.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(),
		`DELETE FROM goose_db_version WHERE version_id = (SELECT max(version_id) FROM goose_db_version)`); err != nil {
		t.Fatal(err)
	}

	resp, err := http.Get("http://" + a.HTTPAddr() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !bytes.Contains(raw, []byte("schema behind binary")) {
		t.Errorf("/healthz = %d %s, want 503 naming the schema", resp.StatusCode, raw)
	}

	gc, err := grpc.NewClient(a.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	var header metadata.MD
	hr, err := healthpb.NewHealthClient(gc).Check(t.Context(),
		&healthpb.HealthCheckRequest{Service: "posthaste.v1.MailService"}, grpc.Header(&header))
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("grpc health = %v, %v; want NOT_SERVING", hr.GetStatus(), err)
	}
	if r := header[service.HealthReasonMetadataKey]; len(r) == 0 || !strings.Contains(r[0], "schema behind") {
		t.Errorf("grpc health reason = %v", r)
	}

	// The separate metrics listener answers, and says not ready.
	families := scrape(t, "http://"+a.MetricsAddr()+"/metrics")
	if v := sample(families, "posthaste_ready", nil); v != 0 {
		t.Errorf("posthaste_ready = %v, want 0", v)
	}
	if a.MetricsAddr() == a.HTTPAddr() {
		t.Error("metrics share the REST listener despite MetricsAddr")
	}
}

// scrape fetches and parses a Prometheus text exposition.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d", url, resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	return families
}

// sample sums the samples of name whose labels include labels: counter
// and gauge values, histogram counts.
func sample(families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	f := families[name]
	if f == nil {
		return -1
	}
	total := 0.0
next:
	for _, m := range f.GetMetric() {
		for k, v := range labels {
			if labelOf(m, k) != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			total += m.GetCounter().GetValue()
		case m.Gauge != nil:
			total += m.GetGauge().GetValue()
		case m.Histogram != nil:
			total += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return total
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// TestCanceledRecipientsCounted cancels a scheduled message through the API
// and reads the outcome counter: each recipient the cancel ended counts
// once, and a second cancel, with nothing left to cancel, adds nothing.
func TestCanceledRecipientsCounted(t *testing.T) {
	t.Parallel()
	b := setup(t)
	canceled := func() float64 {
		v := sample(scrape(t, b.base+"/metrics"), "posthaste_recipients_final_total",
			map[string]string{"outcome": "canceled", "class": "none"})
		return max(v, 0) // no series yet is none counted
	}
	const n = 3
	to := make([]any, n)
	for i := range to {
		to[i] = map[string]any{"address": fmt.Sprintf("r%d@example.test", i)}
	}
	code, sent := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "sender@posthaste.test"},
		"to":   to, "subject": "later", "text": "x",
		"send_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, sent)
	}
	id := sent["id"].(string)

	before := canceled()
	if code, resp := b.do(t, http.MethodPost, "/v1/messages/"+id+":cancel", map[string]any{}); code != http.StatusOK {
		t.Fatalf("cancel: %d %v", code, resp)
	}
	// Counted once the cancel has committed, which is before it answers;
	// polling keeps the test honest should that move after the answer.
	deadline := time.Now().Add(5 * time.Second)
	for canceled() < before+n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := canceled(); got != before+n {
		t.Fatalf("canceled recipients counted: %v, want %v", got-before, n)
	}

	if code, resp := b.do(t, http.MethodPost, "/v1/messages/"+id+":cancel", map[string]any{}); code != http.StatusConflict {
		t.Fatalf("second cancel: %d %v, want 409", code, resp)
	}
	if got := canceled(); got != before+n {
		t.Errorf("second cancel changed the count: %v, want %v", got-before, n)
	}
}

// TestProfiling serves runtime profiles on the metrics listener only, and
// only when asked.
func TestProfiling(t *testing.T) {
	t.Parallel()
	get := func(url string) int {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	cfg := baseConfig(t)
	cfg.MetricsAddr = "127.0.0.1:0"
	cfg.Profiling = true
	a := start(t, cfg)
	if code := get("http://" + a.MetricsAddr() + "/debug/pprof/heap?debug=1"); code != http.StatusOK {
		t.Errorf("heap profile on the metrics listener: %d, want 200", code)
	}
	if code := get("http://" + a.HTTPAddr() + "/debug/pprof/heap?debug=1"); code == http.StatusOK {
		t.Error("heap profile served on the REST listener")
	}

	off := baseConfig(t)
	off.MetricsAddr = "127.0.0.1:0"
	b := start(t, off)
	if code := get("http://" + b.MetricsAddr() + "/debug/pprof/heap?debug=1"); code != http.StatusNotFound {
		t.Errorf("heap profile without Profiling: %d, want 404", code)
	}

	bad := baseConfig(t)
	bad.Profiling = true
	if _, err := app.New(bad); err == nil || !strings.Contains(err.Error(), "Profiling") {
		t.Errorf("Profiling without MetricsAddr: %v, want an error naming Profiling", err)
	}
}

// TestCanceledWhileSendingCounted cancels a message through the API while
// the MX holds its DATA, then has the MX answer 451: the recipient ends
// canceled, and the outcome counter counts it once as canceled, not as
// deferred or failed.
func TestCanceledWhileSendingCounted(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{}, 1)
	gate := make(chan struct{})
	b := setup(t, testenv.WithDataReply(func(string, []string, []byte) *smtp.SMTPError {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-gate
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
	}))
	released := false
	defer func() {
		if !released {
			close(gate)
		}
	}()
	finals := func() map[string]float64 {
		families := scrape(t, b.base+"/metrics")
		out := map[string]float64{}
		for _, outcome := range []string{"delivered", "bounced", "failed", "suppressed", "canceled"} {
			out[outcome] = max(sample(families, "posthaste_recipients_final_total", map[string]string{"outcome": outcome}), 0)
		}
		return out
	}

	code, sent := b.do(t, http.MethodPost, "/v1/messages", map[string]any{
		"from": map[string]any{"address": "sender@posthaste.test"},
		"to":   []any{map[string]any{"address": "held@example.test"}}, "subject": "s", "text": "t",
	})
	if code != http.StatusAccepted {
		t.Fatalf("send: %d %v", code, sent)
	}
	id := sent["id"].(string)
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatal("the message never reached DATA")
	}
	before := finals()
	if code, resp := b.do(t, http.MethodPost, "/v1/messages/"+id+":cancel", map[string]any{}); code != http.StatusOK {
		t.Fatalf("cancel: %d %v", code, resp)
	}
	// The cancel only marks a recipient in flight: nothing is counted yet.
	if got := finals(); got["canceled"] != before["canceled"] {
		t.Fatalf("counted canceled before the attempt ended: %v, before %v", got, before)
	}
	close(gate)
	released = true

	msg := b.waitStatus(t, id, "canceled")
	if rec := msg["recipients"].([]any)[0].(map[string]any); rec["status"] != "canceled" {
		t.Fatalf("recipient after the 451: %v", rec)
	}
	// Counted once the outcome's commit has returned, which can be just
	// after the status shows.
	deadline := time.Now().Add(10 * time.Second)
	got := finals()
	for got["canceled"] < before["canceled"]+1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		got = finals()
	}
	want := maps.Clone(before)
	want["canceled"]++
	if !maps.Equal(got, want) {
		t.Fatalf("final outcomes counted %v, want %v (before %v)", got, want, before)
	}
}
