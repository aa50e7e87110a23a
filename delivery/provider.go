package delivery

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// ProviderLimits are the limits of one destination provider, for this
// instance (see ShapingConfig.Instances). Zero means no limit.
type ProviderLimits struct {
	// Connections is the most SMTP connections open at once to the
	// provider's hosts, idle pooled ones included: a receiver counts every
	// connection it has open, whatever it is doing.
	Connections int
	// PerConnection is the most messages (transactions) sent on one
	// connection before it is closed. Zero keeps SMTPConfig.MaxReuse.
	PerConnection int
	// PerMinute is the most transactions started per minute.
	PerMinute int
}

// Provider is a mailbox provider: the MX hosts that belong to it, known by
// their name's suffix, share one set of limits, whichever recipient domain
// led to them. Gmail and every Google Workspace domain, say, all point at
// hosts under google.com, and Google's limits are per sender, not per
// recipient domain.
type Provider struct {
	// Name identifies the provider in flags, logs and overrides.
	Name string
	// Suffixes are host name suffixes ("google.com"): a host matches when
	// it equals one or ends with "." and one. The longest matching suffix
	// over all providers wins.
	Suffixes []string
	Limits   ProviderLimits
}

// DefaultProviders is the built-in provider table. The limits are
// conservative figures for a sender without an established reputation;
// configuration raises or lowers them (see ParseProvider). The function
// returns a new slice on every call, so callers may change it.
func DefaultProviders() []Provider {
	return []Provider{
		// Gmail and Google Workspace: MX hosts under google.com, and the
		// older googlemail.com ones.
		{Name: "google", Suffixes: []string{"google.com", "googlemail.com"},
			Limits: ProviderLimits{Connections: 20, PerConnection: 100, PerMinute: 1200}},
		// Outlook.com, Hotmail, Live and Microsoft 365 (EOP).
		{Name: "microsoft", Suffixes: []string{"outlook.com", "protection.outlook.com", "hotmail.com"},
			Limits: ProviderLimits{Connections: 10, PerConnection: 50, PerMinute: 600}},
		// Yahoo, AOL and their regional domains.
		{Name: "yahoo", Suffixes: []string{"yahoodns.net"},
			Limits: ProviderLimits{Connections: 10, PerConnection: 20, PerMinute: 300}},
		// iCloud, me.com, mac.com.
		{Name: "apple", Suffixes: []string{"icloud.com", "apple.com"},
			Limits: ProviderLimits{Connections: 10, PerConnection: 50, PerMinute: 300}},
		{Name: "gmx", Suffixes: []string{"gmx.net", "web.de", "mail.com"},
			Limits: ProviderLimits{Connections: 5, PerConnection: 50, PerMinute: 300}},
		{Name: "yandex", Suffixes: []string{"yandex.net", "yandex.ru"},
			Limits: ProviderLimits{Connections: 5, PerConnection: 50, PerMinute: 300}},
		{Name: "zoho", Suffixes: []string{"zoho.com", "zoho.eu"},
			Limits: ProviderLimits{Connections: 5, PerConnection: 50, PerMinute: 300}},
		{Name: "protonmail", Suffixes: []string{"protonmail.ch"},
			Limits: ProviderLimits{Connections: 5, PerConnection: 50, PerMinute: 300}},
		{Name: "comcast", Suffixes: []string{"comcast.net"},
			Limits: ProviderLimits{Connections: 5, PerConnection: 20, PerMinute: 120}},
	}
}

// ParseProvider reads one provider of the --provider flag:
//
//	name=suffix1,suffix2;connections=N;per-connection=M;per-minute=K
//
// Every part but the name is optional. A provider of the same name as a
// built-in one replaces the parts it gives and keeps the others (see
// BuildProviders); "name=" without suffixes keeps the built-in suffixes.
func ParseProvider(spec string) (Provider, error) {
	parts := strings.Split(spec, ";")
	name, suffixes, ok := strings.Cut(parts[0], "=")
	name = strings.ToLower(strings.TrimSpace(name))
	if !ok || name == "" {
		return Provider{}, fmt.Errorf("provider %q: want name=suffix1,suffix2;connections=N;per-connection=M;per-minute=K", spec)
	}
	p := Provider{Name: name, Limits: ProviderLimits{Connections: -1, PerConnection: -1, PerMinute: -1}}
	for s := range strings.SplitSeq(suffixes, ",") {
		s = strings.ToLower(strings.Trim(strings.TrimSpace(s), "."))
		if s == "" {
			continue
		}
		if strings.ContainsAny(s, " /:@;=") {
			return Provider{}, fmt.Errorf("provider %s: %q is not a host name suffix", name, s)
		}
		p.Suffixes = append(p.Suffixes, s)
	}
	for _, kv := range parts[1:] {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return Provider{}, fmt.Errorf("provider %s: %q is not key=value", name, kv)
		}
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 0 {
			return Provider{}, fmt.Errorf("provider %s: %s must be a whole number, 0 for no limit", name, k)
		}
		switch strings.TrimSpace(k) {
		case "connections":
			p.Limits.Connections = n
		case "per-connection":
			p.Limits.PerConnection = n
		case "per-minute":
			p.Limits.PerMinute = n
		default:
			return Provider{}, fmt.Errorf("provider %s: unknown limit %q (connections, per-connection, per-minute)", name, k)
		}
	}
	return p, nil
}

// BuildProviders merges overrides (from ParseProvider) into base (usually
// DefaultProviders): an override of a known name replaces the suffixes and
// limits it gives, a new name adds a provider, whose limits left out are 0
// (none).
func BuildProviders(base, overrides []Provider) ([]Provider, error) {
	out := slices.Clone(base)
	for _, o := range overrides {
		i := slices.IndexFunc(out, func(p Provider) bool { return p.Name == o.Name })
		if i < 0 {
			if len(o.Suffixes) == 0 {
				return nil, fmt.Errorf("provider %s: not built in, so it needs suffixes", o.Name)
			}
			out = append(out, Provider{Name: o.Name, Suffixes: o.Suffixes})
			i = len(out) - 1
		}
		p := &out[i]
		if len(o.Suffixes) > 0 {
			p.Suffixes = o.Suffixes
		}
		if o.Limits.Connections >= 0 {
			p.Limits.Connections = o.Limits.Connections
		}
		if o.Limits.PerConnection >= 0 {
			p.Limits.PerConnection = o.Limits.PerConnection
		}
		if o.Limits.PerMinute >= 0 {
			p.Limits.PerMinute = o.Limits.PerMinute
		}
	}
	return out, nil
}

// providerTable finds the provider of an MX host. It is built once and
// never changed, so lookups need no lock.
type providerTable struct {
	// bySuffix is sorted longest suffix first, so the most specific entry
	// wins ("protection.outlook.com" before "outlook.com").
	bySuffix []suffixEntry
}

type suffixEntry struct {
	suffix   string
	provider int // index into the shaper's providers
}

func newProviderTable(providers []Provider) (providerTable, error) {
	var t providerTable
	seen := make(map[string]string)
	for i, p := range providers {
		if p.Name == "" {
			return providerTable{}, errors.New("provider without a name")
		}
		if p.Limits.Connections < 0 || p.Limits.PerConnection < 0 || p.Limits.PerMinute < 0 {
			return providerTable{}, fmt.Errorf("provider %s: limits must not be negative", p.Name)
		}
		for _, s := range p.Suffixes {
			s = strings.ToLower(strings.Trim(s, "."))
			if other, dup := seen[s]; dup && other != p.Name {
				return providerTable{}, fmt.Errorf("provider %s: suffix %s is already %s's", p.Name, s, other)
			}
			seen[s] = p.Name
			t.bySuffix = append(t.bySuffix, suffixEntry{suffix: s, provider: i})
		}
	}
	slices.SortStableFunc(t.bySuffix, func(a, b suffixEntry) int { return len(b.suffix) - len(a.suffix) })
	return t, nil
}

// lookup returns the index of host's provider, or -1.
func (t providerTable) lookup(host string) int {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	for _, e := range t.bySuffix {
		if host == e.suffix || strings.HasSuffix(host, e.suffix) && host[len(host)-len(e.suffix)-1] == '.' {
			return e.provider
		}
	}
	return -1
}
