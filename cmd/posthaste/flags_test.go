package main

import (
	"io"
	"testing"
)

// Not parallel: it sets environment variables.
func TestFlagsFromEnvironmentAndCommandLine(t *testing.T) {
	t.Setenv("POSTHASTE_HTTP_ADDR", "127.0.0.1:1111")
	t.Setenv("POSTHASTE_GRPC_ADDR", "127.0.0.1:2222")
	t.Setenv("POSTHASTE_ROUTE", "a.test=127.0.0.1:25, *=127.0.0.1:2525")
	fs := newFlagSet("serve", io.Discard)
	httpAddr := fs.String("http-addr", ":8080", "")
	grpcAddr := fs.String("grpc-addr", ":9090", "")
	var routes listFlag
	fs.Var(&routes, "route", "")
	if err := parseFlags(fs, []string{"--grpc-addr", "127.0.0.1:3333"}); err != nil {
		t.Fatal(err)
	}
	if *httpAddr != "127.0.0.1:1111" {
		t.Errorf("http-addr = %q, want the environment's", *httpAddr)
	}
	if *grpcAddr != "127.0.0.1:3333" {
		t.Errorf("grpc-addr = %q, want the command line's over the environment's", *grpcAddr)
	}
	if len(routes) != 2 || routes[0] != "a.test=127.0.0.1:25" || routes[1] != "*=127.0.0.1:2525" {
		t.Errorf("routes = %q", routes)
	}

	t.Setenv("POSTHASTE_CONCURRENCY", "lots")
	fs = newFlagSet("serve", io.Discard)
	fs.Int("concurrency", 100, "")
	if err := parseFlags(fs, nil); err == nil {
		t.Error("a malformed environment value was accepted")
	}
}
