// Command posthaste runs the Posthaste transactional email service and its
// administration commands.
//
//	posthaste serve [flags]          run the REST + gRPC API and the delivery workers
//	posthaste migrate [flags]        apply database migrations and exit
//	posthaste keys create --name N   create an API key (shown once)
//	posthaste keys list              list API keys
//	posthaste keys revoke ID         revoke an API key
//	posthaste projects create NAME   create a project
//	posthaste projects list          list projects
//	posthaste projects delete NAME   delete a project
//	posthaste domains add DOMAIN     add a sending domain and its DKIM key
//	posthaste domains verify ID      check a domain's DNS records
//	posthaste bench [flags]          measure intake and delivery rates and costs
//	posthaste config print [flags]   show serve's effective configuration
//	posthaste send [flags]           send a message through a running server
//	posthaste status ID              show a message and its recipients
//	posthaste messages list [flags]  list messages
//	posthaste events tail [flags]    follow the event feed
//	posthaste version                print the version
//
// Every flag can also be set through an environment variable: --database-url
// is POSTHASTE_DATABASE_URL, --http-addr is POSTHASTE_HTTP_ADDR, and so on.
// The server-side commands also read a YAML file named by --config (or
// POSTHASTE_CONFIG) whose keys are the flag names. A flag given on the
// command line wins over the environment, which wins over the file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		reportError(os.Stderr, os.Args[1:], os.Getenv, err)
		os.Exit(1)
	}
}

// reportError writes the error that ends the process: one JSON line when
// the logs were asked for as JSON (--log-format json, or its environment
// variable), so that a log pipeline that parses every line also parses the
// last one; else a plain line.
func reportError(w io.Writer, args []string, getenv func(string) string, err error) {
	if !jsonLogsRequested(args, getenv) {
		fmt.Fprintln(w, "posthaste:", err)
		return
	}
	slog.New(slog.NewJSONHandler(w, nil)).Error("posthaste stopped", "err", err.Error())
}

// jsonLogsRequested reports whether args or the environment ask for JSON
// logs. The command line is looked at as text because the error may come
// from parsing it.
func jsonLogsRequested(args []string, getenv func(string) string) bool {
	format := getenv(envName("log-format"))
	for i, a := range args {
		switch {
		case a == "--log-format" || a == "-log-format":
			if i+1 < len(args) {
				format = args[i+1]
			}
		case strings.HasPrefix(a, "--log-format="), strings.HasPrefix(a, "-log-format="):
			_, format, _ = strings.Cut(a, "=")
		}
	}
	return format == "json"
}

const usage = `Usage: posthaste <command> [flags]

Commands:
  serve     run the REST and gRPC API and the delivery workers
  migrate   apply database migrations and exit
  keys      create, list and revoke API keys
  projects  create, list and delete projects
  domains   add, verify, rotate the DKIM key of and delete sending domains
  bench     measure how fast a server takes and delivers mail
  config    print the effective configuration of serve (config print)
  version   print the version

Client commands, talking to a running server over gRPC (--server, --api-key):
  send      send a message, and with --wait follow it to the end
  status    show a message and its recipients
  messages  list messages (messages list)
  events    follow the event feed (events tail)

Run "posthaste <command> -h" for the flags of a command.
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// run runs the command in args. Asking for help (-h, --help) anywhere a
// command parses flags prints the usage and is not an error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := dispatch(ctx, args, stdout, stderr)
	if errors.Is(err, flag.ErrHelp) {
		// The flag package has printed the usage.
		return nil
	}
	return err
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	switch args[0] {
	case "serve":
		return runServe(ctx, args[1:], stdout, stderr)
	case "migrate":
		return runMigrate(ctx, args[1:], stdout, stderr)
	case "keys":
		if len(args) > 1 && isHelp(args[1]) {
			fmt.Fprint(stdout, keysUsage)
			return nil
		}
		return runKeys(ctx, args[1:], stdout, stderr)
	case "projects":
		if len(args) > 1 && isHelp(args[1]) {
			fmt.Fprint(stdout, projectsUsage)
			return nil
		}
		return runProjects(ctx, args[1:], stdout, stderr)
	case "domains":
		if len(args) > 1 && isHelp(args[1]) {
			fmt.Fprint(stdout, domainsUsage)
			return nil
		}
		return runDomains(ctx, args[1:], stdout, stderr)
	case "bench":
		return runBench(ctx, args[1:], stdout, stderr)
	case "config":
		return runConfig(ctx, args[1:], stdout, stderr)
	case "send":
		return runSend(ctx, args[1:], stdout, stderr)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "messages":
		return runMessages(ctx, args[1:], stdout, stderr)
	case "events":
		return runEvents(ctx, args[1:], stdout, stderr)
	case "version", "--version", "-version":
		printVersion(stdout)
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
}
