package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/service"
)

func TestProjectsAndScopedKeys(t *testing.T) {
	t.Parallel()
	url := testenv.Database(t)
	ctx := context.Background()
	runCmd := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := run(ctx, append(args, "--database-url", url), &out, &errOut)
		return out.String() + errOut.String(), err
	}

	if out, err := runCmd("projects", "create", "shop"); err != nil || !strings.Contains(out, "created project shop") {
		t.Fatalf("projects create: %v\n%s", err, out)
	}
	if _, err := runCmd("projects", "create", "shop"); err == nil {
		t.Error("creating a project twice succeeded")
	}
	if _, err := runCmd("projects", "create", "Bad Name"); err == nil {
		t.Error("a bad project name was accepted")
	}

	out, err := runCmd("keys", "create", "--project", "shop", "--name", "ops", "--scopes", "send,admin")
	if err != nil {
		t.Fatalf("keys create: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Created API key ([0-9a-f-]{36}) \(ops\) in project shop with scopes send,admin.*\n\n\s+(ph_\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("create printed no id and key:\n%s", out)
	}
	id, key := m[1], m[2]
	store, err := db.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	k, err := store.LookupAPIKey(ctx, service.HashAPIKey(key))
	if err != nil {
		t.Fatalf("the printed key is not stored: %v", err)
	}
	if !slices.Equal(k.Scopes, []string{db.ScopeSend, db.ScopeAdmin}) {
		t.Errorf("scopes %v", k.Scopes)
	}
	if _, err := runCmd("keys", "create", "--project", "shop", "--name", "x", "--scopes", "write"); err == nil {
		t.Error("an unknown scope was accepted")
	}
	if _, err := runCmd("keys", "create", "--project", "nope", "--name", "x"); err == nil {
		t.Error("a key in an unknown project was created")
	}

	out, err = runCmd("keys", "list", "--project", "shop")
	if err != nil || !strings.Contains(out, id) || !strings.Contains(out, "send,admin") || strings.Contains(out, key) {
		t.Errorf("keys list --project shop: %v\n%s", err, out)
	}
	if out, _ := runCmd("keys", "list"); strings.Contains(out, id) {
		t.Errorf("the default project lists shop's key:\n%s", out)
	}
	out, err = runCmd("projects", "list")
	if err != nil || !regexp.MustCompile(`(?m)^shop\s+\S+\s+1\s`).MatchString(out) || !strings.Contains(out, "default") {
		t.Errorf("projects list: %v\n%s", err, out)
	}

	if out, err := runCmd("projects", "delete", "shop"); err == nil || !strings.Contains(out+err.Error(), "active API key") {
		t.Errorf("deleting a project with a key: %v\n%s", err, out)
	}
	if _, err := runCmd("keys", "revoke", id); err == nil {
		t.Error("revoking shop's key through the default project succeeded")
	}
	if out, err := runCmd("keys", "revoke", id, "--project", "shop"); err != nil {
		t.Fatalf("keys revoke: %v\n%s", err, out)
	}
	if _, err := store.LookupAPIKey(ctx, service.HashAPIKey(key)); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("revoked key still found: %v", err)
	}
	if out, err := runCmd("projects", "delete", "shop"); err != nil {
		t.Errorf("deleting a project with only revoked keys: %v\n%s", err, out)
	}
	if _, err := runCmd("projects", "delete", "default", "--force"); err == nil {
		t.Error("the default project was deleted")
	}
}

// keys and projects against a data directory without a database fail and
// leave the directory as it was, instead of running initdb there.
func TestAdminCommandsRefuseEmptyDataDir(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "wrong")
	for _, args := range [][]string{
		{"keys", "list"},
		{"keys", "create", "--name", "x"},
		{"keys", "revoke", "00000000-0000-0000-0000-000000000000"},
		{"projects", "list"},
		{"projects", "create", "p"},
		{"projects", "delete", "p"},
	} {
		t.Run(strings.Join(args[:2], " "), func(t *testing.T) {
			var out, errOut bytes.Buffer
			// An empty --database-url overrides one in the environment.
			err := run(context.Background(), append(args, "--data-dir", dir, "--database-url", ""), &out, &errOut)
			if err == nil || !strings.Contains(err.Error(), "no database in the data directory") {
				t.Errorf("err = %v, want a refusal naming the data directory\n%s%s", err, out.String(), errOut.String())
			}
			if out.Len() != 0 {
				t.Errorf("printed %q", out.String())
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the data directory was created: %v", err)
			}
		})
	}
}
