// Package delivery sends queued mail to the recipients' mail servers and
// records what happened to each recipient.
//
// The Dispatcher claims due recipients from the database under a lease,
// groups the recipients of one message and domain into one SMTP transaction,
// finds the domain's mail hosts (MX records, null MX, implicit MX, or a
// static route), talks SMTP to them with go-smtp, and writes each
// recipient's outcome, with an attempt row for every host tried (or one
// without a host when DNS alone decided): delivered (2yz to the end of
// DATA); bounced (5yz to MAIL, RCPT or DATA; a domain that does not exist,
// has a null MX, or whose mail hosts do not exist; a message larger than the
// server's SIZE, or with 8-bit content that cannot be converted for a server
// without 8BITMIME); or deferred with a backoff (4yz, network and DNS
// trouble, hosts that refuse the session even with 5yz, outcomes left
// unknown, and 5yz replies that ClassifyBounce takes for a rate limit)
// until the message is too old, when it fails. Every failure is expressed
// as an *SMTPError, which says whether its reply is the server's or was
// made up here, and every 5yz refusal gets a BounceClass; a permanent refusal
// of the address itself puts it on the project's suppression list in the
// same statement as the outcome.
//
// With Config.VERP set, each transaction is sent from a VERP address that
// names its message (and its recipient, when it has one), and a
// ReportHandler applies what the bounce listener receives at those
// addresses: later bounces, complaints, automatic replies.
//
// # Delivery is at least once
//
// A recipient is delivered when the receiving server answers 2yz to the end
// of DATA; it is marked delivered when our transaction that records it
// commits. Between the two lies a window in which a message can be sent
// twice:
//
//   - the process dies after the server's reply and before our commit, or
//     the database cannot be reached for longer than the lease and another
//     dispatcher's rescuer gets to the recipient before this one can write
//     the outcome it kept: the rescuer returns the recipient to the queue
//     once the lease runs out, and a dispatcher sends it again;
//   - the connection breaks, or a timeout (SMTP.DataTimeout,
//     MaxAttemptDuration, or Stop's ShutdownTimeout) cuts the session,
//     after the end of the data was sent but before the reply arrived: the
//     server may have taken the message, but that cannot be known, so the
//     attempt is recorded as ambiguous and the recipient is deferred and
//     sent again (the problem RFC 1047 describes), at most
//     Config.MaxAmbiguousRetries times when that is set.
//
// Nothing can close that window without the receiver's help, so it is kept
// short instead. The outcome is written right after the reply (never in a
// transaction held open across SMTP), committed together with the outcomes
// of the other sessions that ended meanwhile, which adds at most the commit
// in flight to the window, and the write is retried about every second; an outcome that cannot be written before the
// lease may run out is kept in memory and written when the database is
// back, before this dispatcher rescues anything. Leases are short
// (LeaseDuration) and renewed by a heartbeat while the dispatcher holds
// them, so a dead dispatcher's recipients go back to the queue within about
// one lease, and an attempt whose lease is no longer known to be held stops
// before the end of the data; an outcome that arrives after its lease was
// taken over anyway is fenced off instead of overwriting the other
// dispatcher's.
//
// The reverse failure (the message is lost) does not happen: a recipient is
// only final once its outcome is committed, and one whose outcome was never
// written goes back to the queue when its lease runs out. The one exception
// is chosen by the operator: with MaxAmbiguousRetries set, a recipient whose
// outcome stayed unknown too often ends failed although the receiver may
// not have the message.
package delivery
