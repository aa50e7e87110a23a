package pgserver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// findBinDir returns the directory holding initdb and postgres: explicit if
// set, else the first discovered one. wantMajor, when set, is the major
// version of an existing cluster; a server of another major version cannot
// open it.
func findBinDir(ctx context.Context, explicit, wantMajor string) (string, error) {
	if explicit != "" {
		if !hasServerBinaries(explicit) {
			return "", fmt.Errorf("BinDir %s has no initdb and postgres: %w", explicit, ErrNoBinaries)
		}
		if wantMajor != "" {
			got, err := majorVersion(ctx, explicit)
			if err != nil {
				return "", err
			}
			if got != wantMajor {
				return "", fmt.Errorf("BinDir %s holds PostgreSQL %s, but the cluster was created by PostgreSQL %s",
					explicit, got, wantMajor)
			}
		}
		return explicit, nil
	}

	candidates := discover(ctx)
	if len(candidates) == 0 {
		return "", fmt.Errorf("looked in pg_config --bindir, /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin, "+
			"/opt/homebrew/opt/postgresql*/bin and PATH: %w", ErrNoBinaries)
	}
	if wantMajor == "" {
		return candidates[0], nil
	}
	var found []string
	for _, dir := range candidates {
		got, err := majorVersion(ctx, dir)
		if err != nil {
			continue
		}
		if got == wantMajor {
			return dir, nil
		}
		found = append(found, fmt.Sprintf("%s (%s)", dir, got))
	}
	return "", fmt.Errorf("the cluster was created by PostgreSQL %s and no server binaries of that version were found "+
		"(found: %s); install them or set BinDir", wantMajor, strings.Join(found, ", "))
}

// discover lists directories with server binaries, best first, without
// duplicates.
func discover(ctx context.Context) []string {
	var dirs []string
	add := func(dir string) {
		if dir == "" || !hasServerBinaries(dir) {
			return
		}
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			dir = real
		}
		if !slices.Contains(dirs, dir) {
			dirs = append(dirs, dir)
		}
	}

	// pg_config often comes with the client libraries alone, so its bindir
	// is only a candidate like the others.
	if path, err := exec.LookPath("pg_config"); err == nil {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, err := exec.CommandContext(ctx, path, "--bindir").Output()
		cancel()
		if err == nil {
			add(strings.TrimSpace(string(out)))
		}
	}
	for _, dir := range byVersionDesc(glob("/usr/lib/postgresql/*/bin")) {
		add(dir)
	}
	add("/usr/local/pgsql/bin")
	for _, dir := range byVersionDesc(glob("/opt/homebrew/opt/postgresql*/bin")) {
		add(dir)
	}
	if path, err := exec.LookPath("postgres"); err == nil {
		add(filepath.Dir(path))
	}
	return dirs
}

func glob(pattern string) []string {
	m, _ := filepath.Glob(pattern) // the only error is a bad pattern
	return m
}

// byVersionDesc orders paths by the first number in them, highest first, so
// /usr/lib/postgresql/16/bin precedes .../9.6/bin and postgresql@17 precedes
// postgresql@14; paths without a number go last.
func byVersionDesc(paths []string) []string {
	version := func(p string) float64 {
		start := strings.IndexAny(p, "0123456789")
		if start < 0 {
			return -1
		}
		end := start
		for end < len(p) && (p[end] == '.' || (p[end] >= '0' && p[end] <= '9')) {
			end++
		}
		v, err := strconv.ParseFloat(strings.TrimSuffix(p[start:end], "."), 64)
		if err != nil {
			return -1
		}
		return v
	}
	out := slices.Clone(paths)
	slices.SortStableFunc(out, func(a, b string) int {
		va, vb := version(a), version(b)
		switch {
		case va > vb:
			return -1
		case va < vb:
			return 1
		}
		return strings.Compare(a, b)
	})
	return out
}

func hasServerBinaries(dir string) bool {
	return isExecutable(filepath.Join(dir, "initdb")) && isExecutable(filepath.Join(dir, "postgres"))
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// majorVersion runs `postgres --version` ("postgres (PostgreSQL) 15.14 (Debian
// ...)") and returns the major version as PG_VERSION spells it: "15", or
// "9.6" before version 10.
func majorVersion(ctx context.Context, dir string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(dir, "postgres"), "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s/postgres --version: %w", dir, err)
	}
	return parseMajor(string(out))
}

func parseMajor(versionOutput string) (string, error) {
	_, rest, ok := strings.Cut(versionOutput, "(PostgreSQL) ")
	if !ok {
		return "", fmt.Errorf("unrecognized postgres --version output %q", strings.TrimSpace(versionOutput))
	}
	version, _, _ := strings.Cut(strings.TrimSpace(rest), " ")
	parts := strings.Split(version, ".")
	digits := parts[0] // "16beta1" and "17devel" have no dot
	if i := strings.IndexFunc(digits, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		digits = digits[:i]
	}
	major, err := strconv.Atoi(digits)
	if err != nil {
		return "", fmt.Errorf("unrecognized postgres version %q", version)
	}
	if major < 10 && len(parts) > 1 {
		return parts[0] + "." + parts[1], nil
	}
	return strconv.Itoa(major), nil
}

// FindBinDir returns the directory of the PostgreSQL server binaries Start
// would use when Config.BinDir is empty, or an error wrapping ErrNoBinaries.
func FindBinDir(ctx context.Context) (string, error) {
	return findBinDir(ctx, "", "")
}
