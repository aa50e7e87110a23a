package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
)

// envName is the environment variable that sets a flag: --http-addr is
// POSTHASTE_HTTP_ADDR.
func envName(flagName string) string {
	return "POSTHASTE_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// flagRef names a flag the way error messages do, with its environment
// variable: --http-addr (POSTHASTE_HTTP_ADDR).
func flagRef(flagName string) string {
	return "--" + flagName + " (" + envName(flagName) + ")"
}

// isHelp reports whether a command-line argument asks for usage.
func isHelp(arg string) bool {
	switch arg {
	case "-h", "-help", "--help", "help":
		return true
	}
	return false
}

// newFlagSet returns the flag set of a server-side command: each flag can
// also be set through its environment variable and through the
// configuration file named by --config, which it adds.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := newPlainFlagSet(name, stderr)
	addConfigFlag(fs)
	return fs
}

// newPlainFlagSet returns a flag set whose usage lists each flag's
// environment variable too, without --config.
func newPlainFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: posthaste %s [flags]\n\nFlags (each also read from the environment variable shown", name)
		if fs.Lookup(configFileFlagName) != nil {
			fmt.Fprint(stderr, ", and from the --config file under the flag's name")
		}
		fmt.Fprintln(stderr, "):")
		fs.VisitAll(func(f *flag.Flag) {
			fmt.Fprintf(stderr, "  --%s (%s)\n    \t%s", f.Name, envName(f.Name), f.Usage)
			// A zero default means "derived from other flags", which the
			// usage text then explains itself.
			if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "0s" && f.DefValue != "false" && f.DefValue != "[]" {
				fmt.Fprintf(stderr, " (default %s)", f.DefValue)
			}
			fmt.Fprintln(stderr)
		})
	}
	return fs
}

// parseFlags sets the flags of fs from, in order of precedence, the command
// line, the environment and the configuration file (--config or
// POSTHASTE_CONFIG, when fs has that flag); what none of them sets keeps
// its default. Every flag defined on fs is covered, whenever it was added.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	return applyEnvAndFile(fs)
}

// parseInterspersed is parseFlags that also accepts flags after positional
// arguments ("keys revoke ID --database-url ..."), returning the positionals.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var positional []string
	for fs.NArg() > 0 {
		positional = append(positional, fs.Arg(0))
		if err := fs.Parse(fs.Args()[1:]); err != nil {
			return nil, err
		}
	}
	if err := applyEnvAndFile(fs); err != nil {
		return nil, err
	}
	return positional, nil
}

// listFlag collects a repeatable flag. From the environment it takes a
// comma-separated list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, part := range strings.Split(v, ",") {
		if part = strings.TrimSpace(part); part != "" {
			*l = append(*l, part)
		}
	}
	return nil
}

// repeatFlag is a repeatable flag whose values may hold commas (such as
// --provider); one value, or its environment variable, may also hold
// several separated by white space.
type repeatFlag []string

func (l *repeatFlag) String() string { return strings.Join(*l, " ") }

func (l *repeatFlag) Set(v string) error {
	*l = append(*l, strings.Fields(v)...)
	return nil
}

// newLogger builds the process logger from --log-level and --log-format.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("%s: %w", flagRef("log-level"), err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("%s: want text or json, got %q", flagRef("log-format"), format)
	}
}

// durationListFlag is a comma-separated list of durations, such as a retry
// schedule.
type durationListFlag []time.Duration

func (l *durationListFlag) String() string {
	parts := make([]string, len(*l))
	for i, d := range *l {
		parts[i] = d.String()
	}
	return strings.Join(parts, ",")
}

func (l *durationListFlag) Set(v string) error {
	var out durationListFlag
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		d, err := time.ParseDuration(part)
		if err != nil {
			return fmt.Errorf("%q: %w", part, err)
		}
		if d < 0 {
			return fmt.Errorf("%q: must not be negative", part)
		}
		out = append(out, d)
	}
	*l = out
	return nil
}
