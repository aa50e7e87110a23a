package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/testenv"
	"github.com/posthaste/posthaste/service"
)

func TestKeysSenderDomainsAndProjectLimits(t *testing.T) {
	t.Parallel()
	url := testenv.Database(t)
	ctx := context.Background()
	runCmd := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := run(ctx, append(args, "--database-url", url), &out, &errOut)
		return out.String() + errOut.String(), err
	}
	out, err := runCmd("keys", "create", "--name", "shop", "--sender-domains", "Shop.Example,mail.shop.example")
	if err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`\n\n\s+(ph_\S+)`).FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "sending only from shop.example,mail.shop.example") {
		t.Fatalf("create printed:\n%s", out)
	}
	if out, err := runCmd("keys", "create", "--name", "bad", "--sender-domains", "[192.0.2.1]"); err == nil ||
		!strings.Contains(err.Error(), "--sender-domains") {
		t.Fatalf("an address literal as sender domain: %v\n%s", err, out)
	}
	if out, err := runCmd("projects", "limits", "default", "--recipients-per-day", "500", "--requests-per-second", "0"); err != nil {
		t.Fatalf("projects limits: %v\n%s", err, out)
	}
	store, err := db.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	k, err := store.LookupAPIKey(ctx, service.HashAPIKey(m[1]))
	if err != nil {
		t.Fatal(err)
	}
	if len(k.SenderDomains) != 2 || k.Limits.RecipientsPerDay == nil || *k.Limits.RecipientsPerDay != 500 ||
		k.Limits.RequestsPerSecond == nil || *k.Limits.RequestsPerSecond != 0 {
		t.Fatalf("key %+v, limits %+v", k, k.Limits)
	}
	if out, err := runCmd("projects", "limits", "default"); err != nil {
		t.Fatalf("projects limits back to the defaults: %v\n%s", err, out)
	}
	if k, err = store.LookupAPIKey(ctx, service.HashAPIKey(m[1])); err != nil || k.Limits.RecipientsPerDay != nil {
		t.Fatalf("after reset: %+v, %v", k.Limits, err)
	}
}
