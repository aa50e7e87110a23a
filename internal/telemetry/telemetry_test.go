package telemetry_test

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.uber.org/goleak"

	"github.com/posthaste/posthaste/internal/telemetry"
)

// TestOffWithoutEndpoint: no OTLP endpoint in the environment means a
// no-op provider and nothing running.
func TestOffWithoutEndpoint(t *testing.T) {
	defer goleak.VerifyNone(t)
	for name, env := range map[string]map[string]string{
		"empty":    {},
		"disabled": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
		"none":     {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"},
	} {
		tel, err := telemetry.Setup(context.Background(), telemetry.Config{Getenv: func(k string) string { return env[k] }})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if tel.Enabled() || tel.Exporter() != "none" {
			t.Errorf("%s: enabled %v, exporter %q; want off", name, tel.Enabled(), tel.Exporter())
		}
		_, span := tel.TracerProvider().Tracer("t").Start(context.Background(), "x")
		if span.IsRecording() {
			t.Errorf("%s: span records", name)
		}
		span.End()
		if err := tel.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	}
}

// TestEndpointFromEnvironment: an endpoint turns tracing on with the
// protocol asked for; Shutdown stops the exporter.
func TestEndpointFromEnvironment(t *testing.T) {
	defer goleak.VerifyNone(t)
	for proto, want := range map[string]string{"": "otlp http/protobuf", "grpc": "otlp grpc", "http/protobuf": "otlp http/protobuf"} {
		env := map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": proto}
		tel, err := telemetry.Setup(context.Background(), telemetry.Config{Getenv: func(k string) string { return env[k] }})
		if err != nil {
			t.Fatal(err)
		}
		if !tel.Enabled() || tel.Exporter() != want {
			t.Errorf("protocol %q: enabled %v, exporter %q; want %q", proto, tel.Enabled(), tel.Exporter(), want)
		}
		// Nothing was exported, so shutting down does not wait for the
		// unreachable endpoint.
		if err := tel.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	}
	env := map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}
	if _, err := telemetry.Setup(context.Background(), telemetry.Config{Getenv: func(k string) string { return env[k] }}); err == nil {
		t.Error("unknown protocol accepted")
	}
}

// TestInjectedExporter sees each span as it ends, with the service name.
func TestInjectedExporter(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tel, err := telemetry.Setup(context.Background(), telemetry.Config{Exporter: exp, Getenv: func(string) string { return "" }})
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Shutdown(context.Background())
	_, span := tel.TracerProvider().Tracer("t").Start(context.Background(), "work")
	span.End()
	got := exp.GetSpans()
	if len(got) != 1 || got[0].Name != "work" {
		t.Fatalf("spans = %v", got)
	}
	found := false
	for _, kv := range got[0].Resource.Attributes() {
		if kv.Key == "service.name" && kv.Value.AsString() == "posthaste" {
			found = true
		}
	}
	if !found {
		t.Errorf("resource %v lacks service.name=posthaste", got[0].Resource.Attributes())
	}
}
