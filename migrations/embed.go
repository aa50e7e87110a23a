// Package migrations holds the numbered SQL migrations of the Posthaste
// schema in goose format, embedded so the binary can apply them itself.
//
// A migration is never edited once it has shipped: a change to the schema is
// a new file with the next number.
package migrations

import "embed"

// FS holds every migration file, named NNNNN_description.sql.
//
//go:embed *.sql
var FS embed.FS
