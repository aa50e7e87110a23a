package telemetry

import (
	"context"
	"strings"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// QueryTracer makes a span of every statement run on a pgx connection,
// a child of the span in the statement's context. The statement's text is
// recorded (Posthaste's SQL is constant, its values are parameters, which
// are not); the span is named after the statement's first word and table,
// so that names stay few.
type QueryTracer struct {
	tracer trace.Tracer
}

// NewQueryTracer returns a tracer for db.WithTracer.
func NewQueryTracer(tp trace.TracerProvider) *QueryTracer {
	return &QueryTracer{tracer: tp.Tracer("github.com/posthaste/posthaste/db")}
}

var _ pgx.QueryTracer = (*QueryTracer)(nil)

// TraceQueryStart starts the statement's span.
func (t *QueryTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if !trace.SpanFromContext(ctx).SpanContext().IsValid() {
		// A statement outside any traced work (the dispatcher's claim
		// loop, heartbeats, LISTEN) would start a trace of its own every
		// few hundred milliseconds; those are left out.
		return ctx
	}
	sql := strings.TrimSpace(data.SQL)
	ctx, _ = t.tracer.Start(ctx, "db "+operation(sql), trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.String("db.system", "postgresql"),
			attribute.String("db.query.text", truncate(sql, 2048))))
	return ctx
}

// TraceQueryEnd ends it, with the error if any.
func (t *QueryTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	if data.Err != nil {
		span.RecordError(data.Err)
		span.SetStatus(codes.Error, "statement failed")
	}
	span.SetAttributes(attribute.Int64("db.rows_affected", data.CommandTag.RowsAffected()))
	span.End()
}

// operation is the first keyword of a statement (SELECT, INSERT, WITH),
// which keeps span names to a handful.
func operation(sql string) string {
	// Skip leading comments.
	for strings.HasPrefix(sql, "--") {
		_, rest, ok := strings.Cut(sql, "\n")
		if !ok {
			return "query"
		}
		sql = strings.TrimSpace(rest)
	}
	word, _, _ := strings.Cut(sql, " ")
	word = strings.ToUpper(strings.TrimSpace(word))
	if word == "" || len(word) > 16 {
		return "query"
	}
	return word
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
