package main

import (
	"bytes"
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/service"
)

func TestKeysCreateListRevoke(t *testing.T) {
	t.Parallel()
	url := testenv.Database(t)
	ctx := context.Background()
	runCmd := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := run(ctx, append(args, "--database-url", url), &out, &errOut)
		return out.String() + errOut.String(), err
	}

	out, err := runCmd("keys", "create", "--name", "billing")
	if err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Created API key ([0-9a-f-]{36}) \(billing\).*\n\n\s+(ph_\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("create printed no id and key:\n%s", out)
	}
	id, key := m[1], m[2]

	store, err := db.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if _, err := store.LookupAPIKey(ctx, service.HashAPIKey(key)); err != nil {
		t.Fatalf("the printed key is not stored: %v", err)
	}

	out, err = runCmd("keys", "list")
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	if !strings.Contains(out, id) || !strings.Contains(out, "billing") || strings.Contains(out, key) {
		t.Errorf("list must show the id and name but never the key:\n%s", out)
	}

	if out, err := runCmd("keys", "revoke", id); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	if _, err := store.LookupAPIKey(ctx, service.HashAPIKey(key)); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("revoked key still found: %v", err)
	}
	if _, err := runCmd("keys", "revoke", "00000000-0000-0000-0000-000000000000"); err == nil {
		t.Error("revoking an unknown key succeeded")
	}
	if _, err := runCmd("keys", "create"); err == nil {
		t.Error("create without --name succeeded")
	}
	// The API refuses these names; the command line must too.
	for _, name := range []string{strings.Repeat("a", db.MaxKeyNameLen+1), "bad\x01name", "two\nlines"} {
		if _, err := runCmd("keys", "create", "--name", name); err == nil || !strings.Contains(err.Error(), "--name") {
			t.Errorf("create --name %q: %v, want an error naming --name", name, err)
		}
	}
}
