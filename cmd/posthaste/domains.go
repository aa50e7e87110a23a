package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/app"
	"github.com/posthaste/posthaste/internal/hostname"
	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/service"
)

const domainsUsage = `Usage:
  posthaste domains add DOMAIN [--project P] [--key-type rsa|ed25519] [--selector S]
                                      add a sending domain with a new DKIM key and
                                      print the DNS records to publish
  posthaste domains list [--project P]
  posthaste domains get ID [--project P]
                                      show a domain and its DNS records
  posthaste domains verify ID [--project P] [--dns-server HOST:PORT]
                                      look the records up now; the domain is verified
                                      once its DKIM record is right
  posthaste domains rotate ID [--project P] [--key-type T] [--selector S]
                                      make a new DKIM key; it signs once verify finds
                                      its record, and the old one stays listed until
                                      its grace period ends
  posthaste domains delete ID [--project P]

--project defaults to "default". Adding and rotating need the key-encryption
key the server uses (--key-encryption-key-file or POSTHASTE_KEY_ENCRYPTION_KEY);
without one, the key a sandbox server generated in --data-dir is used when
it exists. See docs/deliverability.md.
`

// kekFlags are the key-encryption key settings shared by serve and domains.
type kekFlags struct {
	file  string
	value string
}

func (k *kekFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&k.file, "key-encryption-key-file", "", "file holding the 32-byte key that encrypts DKIM private keys, as 64 hex digits or base64")
	fs.StringVar(&k.value, "key-encryption-key", "", "the 32-byte key that encrypts DKIM private keys, as 64 hex digits or base64; prefer the environment variable or the file, since command lines are visible to other users")
}

// load returns the configured key, or nil when none is.
func (k *kekFlags) load() ([]byte, error) {
	switch {
	case k.file != "" && k.value != "":
		return nil, fmt.Errorf("%s and %s: give one, not both", flagRef("key-encryption-key-file"), flagRef("key-encryption-key"))
	case k.file != "":
		key, err := keyenc.ReadFile(k.file)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flagRef("key-encryption-key-file"), err)
		}
		return key, nil
	case k.value != "":
		key, err := keyenc.Parse(k.value)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flagRef("key-encryption-key"), err)
		}
		return key, nil
	}
	return nil, nil
}

func runDomains(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	if len(args) == 0 {
		fmt.Fprint(stderr, domainsUsage)
		return errors.New("domains: no subcommand given")
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "add", "list", "get", "verify", "rotate", "delete":
	default:
		fmt.Fprint(stderr, domainsUsage)
		return fmt.Errorf("domains: unknown subcommand %q", sub)
	}
	fs := newFlagSet("domains "+sub, stderr)
	defer func() { err = placeSettings(fs, err) }()
	var (
		dbf                       databaseFlags
		kf                        kekFlags
		projectName, keyType, sel string
		dnsServer, bounce, host   string
		grace                     time.Duration
	)
	dbf.register(fs)
	fs.StringVar(&projectName, "project", db.DefaultProjectName, "the project the domain belongs to")
	if sub == "add" || sub == "rotate" {
		kf.register(fs)
		fs.StringVar(&keyType, "key-type", "", "rsa (2048 bits) or ed25519; add defaults to rsa, rotate to the current key's type")
		fs.StringVar(&sel, "selector", "", `DKIM selector; defaults to "ph" and the date`)
	}
	fs.StringVar(&dnsServer, "dns-server", "", "DNS server (host:port) to verify against; empty uses the system's resolver configuration")
	fs.StringVar(&bounce, "bounce-domain", "", "the bounce (return-path) domain the server uses, for the suggested records")
	fs.StringVar(&host, "hostname", "", "the server's host name, for the suggested SPF and MX records; empty uses the machine's")
	fs.DurationVar(&grace, "dkim-key-grace", service.DefaultDKIMKeyGrace, "how long a replaced DKIM key stays published after a rotation")
	positional, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	wantArgs := 1
	if sub == "list" {
		wantArgs = 0
	}
	if len(positional) != wantArgs {
		if wantArgs == 0 {
			return fmt.Errorf("domains list: unexpected argument %q", positional[0])
		}
		if sub == "add" {
			return errors.New("domains add: give exactly one domain name")
		}
		return fmt.Errorf("domains %s: give exactly one domain ID", sub)
	}
	var id uuid.UUID
	if sub != "add" && sub != "list" {
		if id, err = uuid.Parse(positional[0]); err != nil {
			return fmt.Errorf("domains %s: %q is not a domain ID", sub, positional[0])
		}
	}
	if host == "" {
		host = hostname.Default()
	}
	cfg := service.DomainsConfig{
		Resolver:     app.DomainResolver(dnsServer),
		BounceDomain: bounce,
		Hostname:     host,
		KeyGrace:     grace,
	}
	if sub == "add" || sub == "rotate" {
		key, err := kf.load()
		if err != nil {
			return err
		}
		if key == nil {
			// A sandbox server's generated key, when there is one.
			if k, err := keyenc.ReadFile(app.DevKEKPath(dbf.dataDir)); err == nil {
				key = k
				fmt.Fprintf(stderr, "using the key-encryption key generated in %s\n", app.DevKEKPath(dbf.dataDir))
			} else if !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		if key == nil {
			return fmt.Errorf("domains %s: %w", sub, service.ErrNoKeyEncryptionKey)
		}
		if cfg.KEK, err = keyenc.New(key); err != nil {
			return err
		}
	}
	return withProject(ctx, dbf, projectName, stderr, func(store *db.DB, project db.Project) error {
		m := service.NewDomains(store, cfg)
		var d db.Domain
		switch sub {
		case "list":
			ds, err := store.ListDomains(ctx, project.ID)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tDOMAIN\tSTATUS\tSIGNING SELECTOR\tLAST CHECKED")
			for _, d := range ds {
				sel := "-"
				if k, ok := d.ActiveKey(); ok {
					sel = k.Selector
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.ID, d.Name, domainStatus(d), sel, formatOptionalTime(d.LastCheckedAt))
			}
			return tw.Flush()
		case "add":
			d, err = m.Add(ctx, project.ID, service.AddDomainParams{Domain: positional[0], KeyType: keyType, Selector: sel})
			if errors.Is(err, db.ErrAlreadyExists) {
				return fmt.Errorf("domains add: project %s already has %s", project.Name, positional[0])
			}
		case "get":
			d, err = store.GetDomain(ctx, project.ID, id)
		case "verify":
			d, err = m.Verify(ctx, project.ID, id)
		case "rotate":
			d, err = m.Rotate(ctx, project.ID, id, keyType, sel)
		case "delete":
			err = store.DeleteDomain(ctx, project.ID, id)
		}
		if errors.Is(err, db.ErrNotFound) {
			return fmt.Errorf("domains %s: no domain with ID %s in project %s", sub, id, project.Name)
		}
		if err != nil {
			return fmt.Errorf("domains %s: %w", sub, err)
		}
		if sub == "delete" {
			fmt.Fprintf(stdout, "deleted %s\n", id)
			return nil
		}
		printDomain(stdout, m, d)
		return nil
	})
}

func domainStatus(d db.Domain) string {
	if d.VerifiedAt != nil {
		return service.DomainVerified
	}
	return service.DomainPending
}

// printDomain writes a domain, its keys and its records for people.
func printDomain(w io.Writer, m *service.Domains, d db.Domain) {
	fmt.Fprintf(w, "Domain %s (%s): %s\n", d.Name, d.ID, domainStatus(d))
	if d.LastCheckedAt != nil {
		fmt.Fprintf(w, "Last checked %s\n", d.LastCheckedAt.UTC().Format(time.RFC3339))
	}
	fmt.Fprintln(w, "\nDKIM keys:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  SELECTOR\tTYPE\tSTATE\tCREATED\tRETIRE AFTER")
	for _, k := range d.Keys {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", k.Selector, k.Algorithm, k.State,
			k.CreatedAt.UTC().Format(time.RFC3339), formatOptionalTime(k.RetireAfter))
	}
	tw.Flush()
	fmt.Fprintln(w, "\nDNS records:")
	for _, r := range m.Records(d) {
		req := ""
		if r.Required {
			req = ", required"
		}
		fmt.Fprintf(w, "\n  [%s] %s%s\n", r.Status, r.Purpose, req)
		if r.Value != "" {
			fmt.Fprintf(w, "    %s %s\n    %s\n", r.Name, r.Type, r.Value)
		}
		for _, f := range r.Found {
			fmt.Fprintf(w, "    found: %s\n", f)
		}
		if r.Note != "" {
			fmt.Fprintf(w, "    %s\n", r.Note)
		}
	}
}
