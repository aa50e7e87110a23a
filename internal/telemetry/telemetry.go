// Package telemetry sets up OpenTelemetry tracing for one Posthaste
// process. Tracing is off unless an OTLP endpoint is configured through the
// standard environment variables (OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, with the exporter's other OTEL_*
// settings); off, the tracer provider is a no-op one and no exporter or
// goroutine is started. The provider is a value handed to the components
// that trace; nothing here sets otel's global provider.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Config configures tracing.
type Config struct {
	// Exporter receives the spans, instead of an OTLP exporter built from
	// the environment; tests pass an in-memory one. Spans are exported as
	// each ends, so a test sees them without a flush. Defaults to nil.
	Exporter sdktrace.SpanExporter
	// Getenv reads the OTEL_* variables. Defaults to os.Getenv.
	Getenv func(string) string
	// ServiceName names the process in traces unless OTEL_SERVICE_NAME
	// does. Defaults to "posthaste".
	ServiceName string
	// Version is the binary's version, recorded on the resource. Defaults
	// to "".
	Version string
}

// Telemetry is the tracing of one process.
type Telemetry struct {
	tp       trace.TracerProvider
	sdk      *sdktrace.TracerProvider // nil when tracing is off
	exporter string
}

// Setup returns the process's tracing: with cfg.Exporter or an OTLP
// endpoint in the environment, an SDK provider exporting in batches;
// otherwise a no-op provider.
func Setup(ctx context.Context, cfg Config) (*Telemetry, error) {
	getenv := cfg.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	if cfg.ServiceName == "" {
		cfg.ServiceName = "posthaste"
	}
	if strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true") {
		return Disabled(), nil
	}
	var processor sdktrace.SpanProcessor
	name := "custom"
	switch {
	case cfg.Exporter != nil:
		processor = sdktrace.NewSimpleSpanProcessor(cfg.Exporter)
	case getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" && getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "",
		strings.EqualFold(getenv("OTEL_TRACES_EXPORTER"), "none"):
		return Disabled(), nil
	default:
		exp, proto, err := otlpExporter(ctx, getenv)
		if err != nil {
			return nil, err
		}
		name = "otlp " + proto
		processor = sdktrace.NewBatchSpanProcessor(exp)
	}
	// The resource's attributes merge the defaults (host, SDK) with
	// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES when set, which win.
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(
		semconv.ServiceName(cfg.ServiceName), semconv.ServiceVersion(cfg.Version)))
	if err != nil {
		return nil, fmt.Errorf("telemetry resource: %w", err)
	}
	if env, err := resource.New(ctx, resource.WithFromEnv()); err == nil {
		if merged, err := resource.Merge(res, env); err == nil {
			res = merged
		}
	}
	sdk := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(processor), sdktrace.WithResource(res))
	return &Telemetry{tp: sdk, sdk: sdk, exporter: name}, nil
}

// otlpExporter builds the OTLP exporter the environment asks for. The
// exporters read their endpoint, headers, TLS and timeout settings from the
// OTEL_EXPORTER_OTLP_* variables themselves; only the protocol is chosen
// here, http/protobuf by default as the specification says.
func otlpExporter(ctx context.Context, getenv func(string) string) (sdktrace.SpanExporter, string, error) {
	proto := getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if proto == "" {
		proto = getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	if proto == "" {
		proto = "http/protobuf"
	}
	var (
		exp sdktrace.SpanExporter
		err error
	)
	switch proto {
	case "grpc":
		exp, err = otlptracegrpc.New(ctx)
	case "http/protobuf":
		exp, err = otlptracehttp.New(ctx)
	default:
		return nil, "", fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol %q (use grpc or http/protobuf)", proto)
	}
	if err != nil {
		return nil, "", fmt.Errorf("otlp trace exporter (%s): %w", proto, err)
	}
	return exp, proto, nil
}

// Disabled returns tracing that records nothing.
func Disabled() *Telemetry {
	return &Telemetry{tp: noop.NewTracerProvider(), exporter: "none"}
}

// TracerProvider is the provider to hand to the components that trace.
func (t *Telemetry) TracerProvider() trace.TracerProvider { return t.tp }

// Enabled reports whether spans are recorded and exported.
func (t *Telemetry) Enabled() bool { return t.sdk != nil }

// Exporter names where spans go: "none", "custom" or "otlp <protocol>".
func (t *Telemetry) Exporter() string { return t.exporter }

// Propagator carries trace context between the REST gateway and the gRPC
// server, and from clients that send a traceparent header.
func Propagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
}

// Shutdown exports the spans still buffered and stops the exporter.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	if t == nil || t.sdk == nil {
		return nil
	}
	if err := t.sdk.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("shut down tracing: %w", err)
	}
	return nil
}
