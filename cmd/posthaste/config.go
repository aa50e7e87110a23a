package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffyaml"
)

// Where a flag's value came from, in rising order of precedence.
const (
	fromDefault = "default"
	fromFile    = "file"
	fromEnv     = "env"
	fromFlag    = "flag"
)

// configFileFlagName is the flag, on every server-side command, that names
// the YAML configuration file.
const configFileFlagName = "config"

// configFile is the value of --config. Besides the path it keeps where each
// flag's value came from once the flag set is parsed, so that "config print"
// can show it without a second bookkeeping structure next to the flag set.
type configFile struct {
	path    string
	sources map[string]string
}

func (c *configFile) String() string { return c.path }

func (c *configFile) Set(v string) error {
	c.path = v
	return nil
}

// addConfigFlag adds --config to fs.
func addConfigFlag(fs *flag.FlagSet) {
	fs.Var(&configFile{}, configFileFlagName, "YAML file of settings whose keys are the flag names, e.g. http-addr: \":8080\"; lists for repeatable flags; flags and environment variables win over it")
}

// configOf returns the --config value of fs, or nil when fs has none.
func configOf(fs *flag.FlagSet) *configFile {
	f := fs.Lookup(configFileFlagName)
	if f == nil {
		return nil
	}
	cf, _ := f.Value.(*configFile)
	return cf
}

// sourcesOf returns where each flag of a parsed fs got its value, or nil
// when fs has no --config.
func sourcesOf(fs *flag.FlagSet) map[string]string {
	if cf := configOf(fs); cf != nil {
		return cf.sources
	}
	return nil
}

// fileFlagRef is flagRef with the configuration file's key for the flag
// and, when known, the file's path.
func fileFlagRef(flagName, path string) string {
	where := fmt.Sprintf("file key %q", flagName)
	if path != "" {
		where += " in " + path
	}
	return "--" + flagName + " (" + envName(flagName) + ", " + where + ")"
}

// placedError is an error about settings that names, for each one whose
// value came from the configuration file, its key and the file.
type placedError struct {
	msg string
	err error
}

func (e *placedError) Error() string { return e.msg }

func (e *placedError) Unwrap() error { return e.err }

// placeSettings makes err, an error of a command whose flags fs parsed,
// say which settings named in it (by flagRef) were read from the
// configuration file, with the key and the file's path. Checks of a value
// after parsing, here or in app's validation, know the flag but not where
// its value came from; this is the one place that does, so none of them
// has to. A value from the command line or the environment is named as
// before: by its flag and variable, not claiming the file.
func placeSettings(fs *flag.FlagSet, err error) error {
	cf := configOf(fs)
	if err == nil || cf == nil || cf.path == "" {
		return err
	}
	msg := err.Error()
	for name, src := range cf.sources {
		if src == fromFile {
			msg = strings.ReplaceAll(msg, flagRef(name), fileFlagRef(name, cf.path))
		}
	}
	if msg == err.Error() {
		return err
	}
	return &placedError{msg: msg, err: err}
}

// setError is a value a flag refused while it was set from the environment
// or the configuration file.
type setError struct {
	flag  string
	value string
	from  string
	err   error
}

func (e *setError) Error() string { return fmt.Sprintf("%s %q: %v", e.flag, e.value, e.err) }

func (e *setError) Unwrap() error { return e.err }

// trackedValue records which layer set a flag, and says which flag and
// layer a refused value belongs to, while the environment and the file are
// applied. It is removed again once parsing is done.
type trackedValue struct {
	flag.Value
	name    string
	layer   *string
	sources map[string]string
}

func (v *trackedValue) Set(s string) error {
	if err := v.Value.Set(s); err != nil {
		return &setError{flag: v.name, value: s, from: *v.layer, err: err}
	}
	v.sources[v.name] = *v.layer
	return nil
}

// IsBoolFlag keeps "--flag" without a value working for boolean flags.
func (v *trackedValue) IsBoolFlag() bool {
	b, ok := v.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// applyEnvAndFile fills the flags the command line left unset from the
// environment and then from the configuration file, through ff. The command
// line must already be parsed into fs; its remaining arguments are kept.
func applyEnvAndFile(fs *flag.FlagSet) error {
	sources := make(map[string]string)
	fs.VisitAll(func(f *flag.Flag) { sources[f.Name] = fromDefault })
	fs.Visit(func(f *flag.Flag) { sources[f.Name] = fromFlag })

	layer := fromEnv
	originals := make(map[string]flag.Value)
	fs.VisitAll(func(f *flag.Flag) {
		originals[f.Name] = f.Value
		f.Value = &trackedValue{Value: f.Value, name: f.Name, layer: &layer, sources: sources}
	})
	// Whatever happens, the flags get their own values back: code after
	// parsing may look at a flag's concrete type.
	defer fs.VisitAll(func(f *flag.Flag) { f.Value = originals[f.Name] })

	cf, _ := originals[configFileFlagName].(*configFile)
	// serve defines every setting, so a key it does not know is a mistake.
	// The other commands share the file with it and read only their keys.
	strict := fs.Name() == "serve"
	parser := func(r io.Reader, set func(name, value string) error) error {
		layer = fromFile
		return parseYAML(r, strict, fs, set)
	}

	rest := fs.Args()
	// ff parses the command line again: "--" makes it take the remaining
	// arguments as they are.
	err := ff.Parse(fs, append([]string{"--"}, rest...),
		ff.WithEnvVarPrefix("POSTHASTE"),
		ff.WithConfigFileFlag(configFileFlagName),
		ff.WithConfigFileParser(parser),
	)
	if cf != nil {
		cf.sources = sources
	}
	if err == nil {
		return nil
	}
	var se *setError
	if errors.As(err, &se) {
		return valueError(fs, originals[se.flag], se, cf)
	}
	if cf != nil && cf.path != "" {
		return fmt.Errorf("config file %s: %w", cf.path, err)
	}
	return err
}

// parseYAML reads the configuration file and hands each of its settings to
// set. A list is joined with commas, the form repeatable flags take from
// the environment, so that it replaces rather than adds to the flag's
// default.
func parseYAML(r io.Reader, strict bool, fs *flag.FlagSet, set func(name, value string) error) error {
	var (
		order  []string
		values = make(map[string][]string)
	)
	err := ffyaml.Parser(r, func(name, value string) error {
		if _, ok := values[name]; !ok {
			order = append(order, name)
		}
		values[name] = append(values[name], value)
		return nil
	})
	if err != nil {
		return err
	}
	for _, name := range order {
		if name == configFileFlagName {
			return fmt.Errorf("key %q: a configuration file cannot name another", name)
		}
		if fs.Lookup(name) == nil {
			if strict {
				return fmt.Errorf("unknown key %q: there is no flag --%s", name, name)
			}
			continue
		}
		if err := set(name, strings.Join(values[name], ",")); err != nil {
			return err
		}
	}
	return nil
}

// valueError names, for a refused value, the flag together with both other
// ways of setting it, since the user may not know which one is in effect.
func valueError(fs *flag.FlagSet, orig flag.Value, se *setError, cf *configFile) error {
	kind := "value"
	if f := fs.Lookup(se.flag); f != nil && orig != nil {
		// UnquoteUsage names the type from the flag's concrete value.
		k, _ := flag.UnquoteUsage(&flag.Flag{Name: f.Name, Usage: f.Usage, Value: orig})
		if k != "" {
			kind = k
		}
	}
	path := ""
	if cf != nil {
		path = cf.path
	}
	from := "the environment"
	if se.from == fromFile {
		from = "the file"
	}
	msg := fmt.Sprintf("%s: invalid %s %q in %s", fileFlagRef(se.flag, path), kind, se.value, from)
	// The flag package's own errors for numbers and durations say only
	// "parse error"; other values explain themselves.
	if detail := se.err.Error(); detail != "parse error" && detail != "value out of range" {
		msg += ": " + detail
	}
	return errors.New(msg)
}

const configUsage = `Usage: posthaste config print [--config FILE] [serve flags]

Prints every setting of serve as it would start with these flags, the
environment and the configuration file: its value and where the value
came from (default, file, env or flag). Secrets are redacted.
`

// runConfig runs "config print".
func runConfig(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || isHelp(args[0]) {
		fmt.Fprint(stdout, configUsage)
		if len(args) == 0 {
			return errors.New("config: no subcommand given")
		}
		return nil
	}
	if args[0] != "print" {
		return fmt.Errorf("config: unknown subcommand %q", args[0])
	}
	return serve(ctx, args[1:], stdout, stderr, true)
}

// printConfig writes every flag of a parsed fs with its value and source.
func printConfig(w io.Writer, fs *flag.FlagSet) error {
	sources := sourcesOf(fs)
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	slices.Sort(names)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FLAG\tVALUE\tFROM")
	for _, name := range names {
		f := fs.Lookup(name)
		src := sources[name]
		if src == "" {
			src = fromDefault
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", name, redact(name, f.Value.String()), src)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("print config: %w", err)
	}
	return nil
}

// dsnPassword finds the password in a key=value connection string.
var dsnPassword = regexp.MustCompile(`(password\s*=\s*)('[^']*'|\S+)`)

// redact hides the secrets among the settings: API keys, signing secrets,
// the key-encryption key and the database password.
func redact(name, value string) string {
	if value == "" {
		return value
	}
	switch name {
	case "bootstrap-api-key", "bounce-secret", "key-encryption-key", "api-key":
		return "REDACTED"
	case "database-url":
		if u, err := url.Parse(value); err == nil && u.Scheme != "" {
			if _, has := u.User.Password(); has {
				u.User = url.UserPassword(u.User.Username(), "REDACTED")
			}
			q := u.Query()
			if q.Has("password") {
				q.Set("password", "REDACTED")
				u.RawQuery = q.Encode()
			}
			return u.String()
		}
		return dsnPassword.ReplaceAllString(value, "${1}REDACTED")
	}
	return value
}
