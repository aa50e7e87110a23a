package delivery

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// route is a static next hop: like an entry of Postfix's transport map, it
// replaces the MX lookup for a domain.
type route struct {
	Host string // IP address or a name resolved through the resolver
	Port int    // 0 means the configured SMTP port
}

// routeTable maps lowercased domains, or "*" for every domain, to a route.
type routeTable map[string]route

// parseRoutes validates the configured routes: keys are domains or "*",
// values "host" or "host:port".
func parseRoutes(in map[string]string) (routeTable, error) {
	out := make(routeTable, len(in))
	for domain, dest := range in {
		key := strings.ToLower(strings.TrimSuffix(strings.TrimSpace(domain), "."))
		if key == "" {
			return nil, fmt.Errorf("Routes: empty domain for %q", dest)
		}
		rt, err := parseRoute(dest)
		if err != nil {
			return nil, fmt.Errorf("Routes: %s: %w", domain, err)
		}
		out[key] = rt
	}
	return out, nil
}

func parseRoute(dest string) (route, error) {
	dest = strings.TrimSpace(dest)
	if dest == "" {
		return route{}, fmt.Errorf("empty destination")
	}
	host, portStr, err := net.SplitHostPort(dest)
	if err != nil {
		// No port: the whole value is the host ("[::1]" or "mx.test").
		host = strings.Trim(dest, "[]")
		if strings.ContainsAny(host, "[]/ ") {
			return route{}, fmt.Errorf("bad destination %q", dest)
		}
		return route{Host: host}, nil
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return route{}, fmt.Errorf("bad port in %q", dest)
	}
	if host == "" {
		return route{}, fmt.Errorf("empty host in %q", dest)
	}
	return route{Host: strings.TrimSuffix(host, "."), Port: port}, nil
}

// lookup returns the route for domain: its own entry, else the "*" entry.
func (t routeTable) lookup(domain string) (route, bool) {
	if rt, ok := t[domain]; ok {
		return rt, true
	}
	rt, ok := t["*"]
	return rt, ok
}
