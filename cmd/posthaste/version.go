package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// printVersion writes the stamped version, or, in a build that was not
// stamped, what the Go toolchain recorded: the module version and the
// commit it was built from.
func printVersion(w io.Writer) {
	v := version
	revision, modified := "", false
	goVersion := runtime.Version()
	if info, ok := debug.ReadBuildInfo(); ok {
		goVersion = info.GoVersion
		if v == "dev" && info.Main.Version != "" && info.Main.Version != "(devel)" {
			v = info.Main.Version
		}
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	fmt.Fprintf(w, "posthaste %s\n", v)
	fmt.Fprintf(w, "go        %s\n", goVersion)
	if revision != "" {
		if modified {
			revision += " (modified)"
		}
		fmt.Fprintf(w, "revision  %s\n", revision)
	}
}
