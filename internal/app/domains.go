package app

import (
	"context"
	"net"
	"path/filepath"
	"strings"

	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/service"
)

// devKEKFile is where sandbox mode keeps the key-encryption key it makes
// when none is configured, under the data directory.
const devKEKFile = "dkim-kek"

// DevKEKPath is the key-encryption key that sandbox mode generates in
// dataDir when none is configured. The domains command uses it too, so
// keys made by a sandbox server can be managed from the command line.
func DevKEKPath(dataDir string) string { return filepath.Join(dataDir, devKEKFile) }

// DomainResolver returns the resolver domain verification uses: the DNS
// server delivery asks ("host" or "host:port"), or the system's resolver
// when server is empty, so that what verification finds is what delivery
// and receivers see.
func DomainResolver(server string) service.DomainResolver {
	if server == "" {
		return net.DefaultResolver
	}
	if _, _, err := net.SplitHostPort(server); err != nil {
		server = net.JoinHostPort(strings.Trim(server, "[]"), "53")
	}
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, server)
		},
	}
}

// domainsConfig fills the sending-domain settings of svc that depend on the
// process: the resolver, and in sandbox mode unverified domains and a
// generated key-encryption key.
func (a *App) domainsConfig(svc service.Config) (service.Config, error) {
	if svc.DomainResolver == nil {
		svc.DomainResolver = DomainResolver(a.cfg.Delivery.DNSServer)
	}
	if !a.cfg.Sandbox {
		if svc.KeyEncryptionKey == nil {
			a.log.Info("no key-encryption key configured: sending domains cannot be added or rotated, and stored DKIM keys cannot sign")
		}
		return svc, nil
	}
	svc.AllowUnverifiedDomains = true
	if svc.KeyEncryptionKey == nil && a.cfg.DataDir == "" {
		// A configured database and no data directory: nowhere to keep a
		// key, so one for this run only.
		key, err := keyenc.Parse(keyenc.Generate())
		if err != nil {
			return svc, err
		}
		svc.KeyEncryptionKey = key
		a.log.Warn("sandbox mode: generated a key-encryption key for DKIM keys that lasts until the process stops; configure one to keep using the keys")
	}
	if svc.KeyEncryptionKey == nil {
		path := DevKEKPath(a.cfg.DataDir)
		key, created, err := keyenc.LoadOrCreate(path)
		if err != nil {
			return svc, err
		}
		svc.KeyEncryptionKey = key
		if created {
			a.log.Warn("sandbox mode: generated a key-encryption key for DKIM keys next to the data; configure one for production", "path", path)
		} else {
			a.log.Warn("sandbox mode: using the generated key-encryption key next to the data; configure one for production", "path", path)
		}
	}
	return svc, nil
}
