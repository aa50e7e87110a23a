package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "posthaste.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Not parallel: it sets environment variables.
func TestConfigPrecedence(t *testing.T) {
	path := writeConfig(t, `
http-addr: "file:1"
grpc-addr: "file:2"
lease: 1m
route:
  - a.test=127.0.0.1:25
  - b.test=127.0.0.1:26
`)
	t.Setenv("POSTHASTE_CONFIG", path)
	t.Setenv("POSTHASTE_GRPC_ADDR", "env:2")
	t.Setenv("POSTHASTE_LEASE", "2m")
	fs := newFlagSet("serve", io.Discard)
	httpAddr := fs.String("http-addr", ":8080", "")
	grpcAddr := fs.String("grpc-addr", ":9090", "")
	lease := fs.Duration("lease", 0, "")
	smtpPort := fs.Int("smtp-port", 25, "")
	var routes listFlag
	fs.Var(&routes, "route", "")
	if err := parseFlags(fs, []string{"--lease", "3m"}); err != nil {
		t.Fatal(err)
	}
	if *httpAddr != "file:1" || *grpcAddr != "env:2" || lease.String() != "3m0s" || *smtpPort != 25 {
		t.Errorf("http-addr %q (want the file's), grpc-addr %q (want the environment's), lease %s (want the flag's), smtp-port %d (want the default)",
			*httpAddr, *grpcAddr, lease, *smtpPort)
	}
	if strings.Join(routes, " ") != "a.test=127.0.0.1:25 b.test=127.0.0.1:26" {
		t.Errorf("routes = %q, want the file's list", routes)
	}
	want := map[string]string{"http-addr": fromFile, "grpc-addr": fromEnv, "lease": fromFlag, "smtp-port": fromDefault, "route": fromFile, "config": fromEnv}
	got := sourcesOf(fs)
	for name, src := range want {
		if got[name] != src {
			t.Errorf("source of %s = %q, want %q", name, got[name], src)
		}
	}
}

// Not parallel: it sets environment variables.
func TestConfigBadValueNamesEveryWayToSetIt(t *testing.T) {
	path := writeConfig(t, "lease: abc\n")
	for _, tc := range []struct {
		name, env, want string
	}{
		{"file", "", `--lease (POSTHASTE_LEASE, file key "lease" in ` + path + `): invalid duration "abc" in the file`},
		{"environment", "xyz", `--lease (POSTHASTE_LEASE, file key "lease" in ` + path + `): invalid duration "xyz" in the environment`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("POSTHASTE_LEASE", tc.env)
			}
			err := run(context.Background(), []string{"serve", "--config", path}, io.Discard, io.Discard)
			if err == nil || err.Error() != tc.want {
				t.Errorf("error = %v\nwant %s", err, tc.want)
			}
		})
	}
}

// A value that parses but fails a check names the file key and the file
// when it came from the file, and only the flag and the variable when it
// came from the command line or the environment, which win over the file.
// Not parallel: it sets environment variables.
func TestConfigRefusedValueNamesWhereItCameFrom(t *testing.T) {
	// Nothing listens at the database address; no case may get as far as
	// connecting.
	path := writeConfig(t, `
database-url: postgres://postgres@127.0.0.1:1/none
database-wait: 0s
lease: 500ms
route: [nothing]
`)
	fileRef := `(POSTHASTE_LEASE, file key "lease" in ` + path + `)`
	for _, tc := range []struct {
		name, env string
		args      []string
		want      string
	}{
		{"file", "", []string{"--route", "a.test=mx.test:25"},
			`--lease ` + fileRef + `: 500ms is shorter than 1s`},
		{"flag", "", []string{"--route", "a.test=mx.test:25", "--lease", "400ms"},
			`--lease (POSTHASTE_LEASE): 400ms is shorter than 1s`},
		{"environment", "300ms", []string{"--route", "a.test=mx.test:25"},
			`--lease (POSTHASTE_LEASE): 300ms is shorter than 1s`},
		// A check of serve's own, before the app's validation.
		{"file, serve's check", "", nil,
			`--route (POSTHASTE_ROUTE, file key "route" in ` + path + `): want domain=host:port, got "nothing"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("POSTHASTE_LEASE", tc.env)
			}
			err := run(context.Background(), append([]string{"serve", "--config", path}, tc.args...), io.Discard, io.Discard)
			if err == nil || err.Error() != tc.want {
				t.Errorf("error = %v\nwant %s", err, tc.want)
			}
		})
	}
}

func TestConfigUnknownKeyRefused(t *testing.T) {
	t.Parallel()
	path := writeConfig(t, "http-addr: \":1\"\nleese: 30s\n")
	err := run(context.Background(), []string{"config", "print", "--config", path}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), `unknown key "leese"`) {
		t.Errorf("error = %v, want one naming the unknown key", err)
	}
	// Other commands share the file with serve and skip its settings.
	fs := newFlagSet("migrate", io.Discard)
	fs.String("database-url", "", "")
	if err := parseFlags(fs, []string{"--config", writeConfig(t, "http-addr: \":1\"\n")}); err != nil {
		t.Errorf("migrate refused a serve setting: %v", err)
	}
}

func TestConfigPrintRedactsSecrets(t *testing.T) {
	t.Parallel()
	path := writeConfig(t, `
database-url: postgres://posthaste:hunter2hunter2@db.test/posthaste
bootstrap-api-key: ph_bootstrapbootstrap
bounce-secret: [verysecretsecret1, verysecretsecret2]
key-encryption-key: 0000000000000000000000000000000000000000000000000000000000000000
`)
	var out bytes.Buffer
	if err := run(context.Background(), []string{"config", "print", "--config", path, "--http-addr", ":1234"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, secret := range []string{"hunter2", "ph_bootstrap", "verysecret", "00000000"} {
		if strings.Contains(text, secret) {
			t.Errorf("config print shows %q:\n%s", secret, text)
		}
	}
	for _, line := range []string{"database-url", "posthaste:REDACTED@db.test", "http-addr", ":1234", "max-age"} {
		if !strings.Contains(text, line) {
			t.Errorf("config print lacks %q:\n%s", line, text)
		}
	}
	for name, src := range map[string]string{"http-addr": "flag", "database-url": "file", "lease": "default"} {
		found := false
		for _, l := range strings.Split(text, "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && f[0] == name && f[len(f)-1] == src {
				found = true
			}
		}
		if !found {
			t.Errorf("config print does not show %s from %s:\n%s", name, src, text)
		}
	}
}
