// Package bench measures how fast Posthaste takes and delivers mail: a load
// generator that sends over REST or gRPC (or over SMTP, to measure another
// relay such as Postfix the same way), an SMTP sink that stands in for
// every receiving MX and records when each recipient arrived, and the
// operating-system and PostgreSQL counters that say what the work cost
// (CPU seconds, WAL flushes, disk flushes, peak memory).
//
// The harness talks to Posthaste only through its public API, as a client
// would. It reads PostgreSQL's statistics views and /proc directly: those
// are facts about the machine, not Posthaste's data, so they do not belong
// in the db package.
package bench
