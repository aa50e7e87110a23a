package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"

	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/internal/testenv"
)

func TestDomainsAddListVerifyDelete(t *testing.T) {
	t.Parallel()
	url := testenv.Database(t)
	dns := testenv.StartDNS(t)
	ctx := context.Background()
	runCmd := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		args = append(args, "--database-url", url)
		if args[0] == "domains" {
			args = append(args, "--data-dir", t.TempDir(), "--dns-server", dns.Addr, "--hostname", "mta.posthaste.test")
		}
		err := run(ctx, args, &out, &errOut)
		return out.String() + errOut.String(), err
	}

	// No key-encryption key: adding is refused, saying what to configure.
	if _, err := runCmd("domains", "add", "shop.test"); err == nil || !strings.Contains(err.Error(), "POSTHASTE_KEY_ENCRYPTION_KEY") {
		t.Fatalf("add without a key-encryption key: %v", err)
	}
	kek := keyenc.Generate()
	out, err := runCmd("domains", "add", "shop.test", "--key-type", "ed25519", "--selector", "s1", "--key-encryption-key", kek)
	if err != nil {
		t.Fatalf("add: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Domain shop\.test \(([0-9a-f-]{36})\): pending`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("add printed no id:\n%s", out)
	}
	id := m[1]
	rec := regexp.MustCompile(`s1\._domainkey\.shop\.test TXT\n\s+(v=DKIM1; k=ed25519; p=\S+)`).FindStringSubmatch(out)
	if rec == nil || !strings.Contains(out, "_dmarc.shop.test TXT") {
		t.Fatalf("add printed no DKIM or DMARC record:\n%s", out)
	}
	if _, err := runCmd("domains", "add", "shop.test", "--key-encryption-key", kek); err == nil || !strings.Contains(err.Error(), "already has") {
		t.Errorf("duplicate add: %v", err)
	}
	if _, err := runCmd("domains", "add", "bad domain", "--key-encryption-key", kek); err == nil || !strings.Contains(err.Error(), "domain") {
		t.Errorf("bad domain: %v", err)
	}

	out, err = runCmd("domains", "verify", id)
	if err != nil || !strings.Contains(out, ": pending") || !strings.Contains(out, "[missing] dkim") {
		t.Fatalf("verify before publishing: %v\n%s", err, out)
	}
	dns.AddTXT("s1._domainkey.shop.test", rec[1])
	out, err = runCmd("domains", "verify", id)
	if err != nil || !strings.Contains(out, ": verified") || !strings.Contains(out, "[ok] dkim") {
		t.Fatalf("verify after publishing: %v\n%s", err, out)
	}
	out, err = runCmd("domains", "list")
	if err != nil || !strings.Contains(out, id) || !strings.Contains(out, "verified") || !strings.Contains(out, "s1") {
		t.Errorf("list: %v\n%s", err, out)
	}
	// Another project does not see it.
	if _, err := runCmd("projects", "create", "other"); err != nil {
		t.Fatal(err)
	}
	if _, err := runCmd("domains", "get", id, "--project", "other"); err == nil || !strings.Contains(err.Error(), "no domain") {
		t.Errorf("get from another project: %v", err)
	}
	if out, err := runCmd("domains", "delete", id); err != nil || !strings.Contains(out, "deleted") {
		t.Fatalf("delete: %v\n%s", err, out)
	}
	if _, err := runCmd("domains", "get", id); err == nil {
		t.Error("get after delete succeeded")
	}
}
