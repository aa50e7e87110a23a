// Package delivery sends queued mail to the recipients' mail servers and
// records what happened to each recipient.
//
// The Dispatcher claims due recipients from the database under a lease,
// groups the recipients of one message and domain into one SMTP transaction,
// finds the domain's mail hosts (MX records, null MX, implicit MX, or a
// static route), talks SMTP to them with go-smtp, and writes each
// recipient's outcome: delivered (2yz after DATA), bounced (5yz), or deferred
// with a backoff (4yz, network and DNS trouble) until the message is too old,
// when it fails. Every failure is expressed as an *SMTPError.
//
// # Delivery is at least once
//
// A recipient is delivered when the receiving server answers 250 to the end
// of DATA; it is marked delivered when our transaction that records it
// commits. Between the two lies a window: if the process dies, or the
// database cannot be reached, after the server's 250 and before our commit,
// the lease runs out, another dispatcher claims the recipient again, and the
// message arrives twice. Nothing can close that window without the receiver's
// help, so it is kept short instead: the outcome is written right after the
// reply, in its own small transaction (never one held open across SMTP), the
// write is retried for a few seconds, and the lease is sized to outlast the
// longest possible attempt so that a slow but live dispatcher never loses
// recipients to another one. The reverse failure (the message is lost) does
// not happen: a recipient is only final after its outcome is committed.
package delivery
