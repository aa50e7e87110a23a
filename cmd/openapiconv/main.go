// Command openapiconv writes the OpenAPI 3 form of an OpenAPI 2 document;
// make generate runs it on the document protoc-gen-openapiv2 writes:
//
//	go run ./cmd/openapiconv -in proto/posthaste/v1/mail.swagger.json -out proto/posthaste/v1/mail.openapi3.json
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/posthaste/posthaste/internal/openapiconv"
)

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "openapiconv:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("openapiconv", flag.ContinueOnError)
	in := fs.String("in", "", "OpenAPI 2 document to read")
	out := fs.String("out", "", "where to write the OpenAPI 3 document")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *in == "" || *out == "" {
		return fmt.Errorf("-in and -out are required")
	}
	v2, err := os.ReadFile(*in)
	if err != nil {
		return fmt.Errorf("read %s: %w", *in, err)
	}
	v3, err := openapiconv.ToV3(ctx, v2)
	if err != nil {
		return fmt.Errorf("%s: %w", *in, err)
	}
	if err := os.WriteFile(*out, v3, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", *out, err)
	}
	return nil
}
