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
//
// Every flag can also be set through an environment variable: --database-url
// is POSTHASTE_DATABASE_URL, --http-addr is POSTHASTE_HTTP_ADDR, and so on.
// A flag given on the command line wins over the environment.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "posthaste:", err)
		os.Exit(1)
	}
}

const usage = `Usage: posthaste <command> [flags]

Commands:
  serve     run the REST and gRPC API and the delivery workers
  migrate   apply database migrations and exit
  keys      create, list and revoke API keys
  projects  create, list and delete projects
  domains   add, verify, rotate the DKIM key of and delete sending domains
  bench     measure how fast a server takes and delivers mail
  version   print the version

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
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "posthaste", version)
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
}
