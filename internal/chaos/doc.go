// Package chaos is the fault suite: it runs a real `posthaste serve` against
// a PostgreSQL it controls and a counting SMTP sink, kills the service and
// the database at random moments under load, cuts the outbox listener, and
// points delivery at misbehaving SMTP servers, then checks that every
// accepted message was delivered, none twice more than the kills can
// explain, and that no worker stays stuck.
//
// The tests carry the build tag chaos, so `go test ./...` leaves them out:
//
//	go test -tags chaos -count=1 -v -timeout 30m ./internal/chaos/         # long form (make chaos)
//	go test -tags chaos -count=1 -v -timeout 30m -short ./internal/chaos/  # short form (CI)
//
// They need Linux and the PostgreSQL server binaries; see
// docs/operations.md for what each test checks.
package chaos
