package metrics_test

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/posthaste/posthaste/internal/metrics"
)

func TestNilMetricsRecordNothing(t *testing.T) {
	var m *metrics.Metrics
	m.ObserveCall("grpc", "/x", "OK", time.Second)
	m.SMTPAttempt("2xx")
	m.RecipientFinal("delivered", "", time.Now())
	m.SessionStep("connect", time.Second)
	m.Claim(time.Millisecond)
	m.ConnectionOpened("other")()
	m.BounceReport("dsn")
	m.WebhookDelivery("delivered")
	m.SetSources(metrics.Sources{})
}

// TestLabelsStayBounded: values outside the documented sets fold into one.
func TestLabelsStayBounded(t *testing.T) {
	m := metrics.New()
	m.SMTPAttempt("something odd")
	m.RecipientFinal("delivered", "Mailbox Full!", time.Time{})
	for i := range 300 {
		m.ObserveCall("grpc", "/unknown.Service/M"+strings.Repeat("x", i%250), "Unimplemented", time.Millisecond)
	}
	m.ConnectionOpened("google")
	m.ConnectionOpened("")
	if n := testutil.CollectAndCount(m.Registry(), "posthaste_api_requests_total"); n > 201 {
		t.Errorf("%d method series, want at most 201", n)
	}
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(`
# HELP posthaste_smtp_open_connections Open outbound SMTP connections, by provider of the MX host (other when unknown).
# TYPE posthaste_smtp_open_connections gauge
posthaste_smtp_open_connections{provider="google"} 1
posthaste_smtp_open_connections{provider="other"} 1
`), "posthaste_smtp_open_connections"); err != nil {
		t.Error(err)
	}
}
