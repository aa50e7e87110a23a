// Package hostname chooses the name this host uses for itself in SMTP and
// in generated header fields, so that EHLO and Message-IDs agree.
package hostname

import (
	"os"
	"strings"
)

// Fallback is the name of last resort, as sendmail uses it.
const Fallback = "localhost.localdomain"

// Default returns the machine's host name when it is fully qualified, else
// Fallback. A Message-ID's id-right should be a domain (RFC 5322 section
// 3.6.4) and EHLO should carry a fully qualified name (RFC 5321 section
// 4.1.1.1); container host names often are single labels.
func Default() string {
	h, err := os.Hostname()
	if err != nil {
		return Fallback
	}
	return choose(h)
}

func choose(h string) string {
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	if h == "" || !strings.Contains(h, ".") || strings.ContainsAny(h, " \t\r\n") {
		return Fallback
	}
	return h
}
