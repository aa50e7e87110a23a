// Package bounce owns what comes back after delivery: the VERP addresses
// outgoing mail is sent from, the SMTP listener that receives the replies to
// them, and the parsing of those replies into a Report.
//
// Each SMTP transaction is sent with the envelope sender
// prefix+token@bounce-domain (see VERP). Bounces, complaints and auto-replies
// are sent to that address, so the bounce domain's MX points at a Listener,
// which accepts mail for valid tokens only, parses each message with
// ParseReport (RFC 3464 delivery status notifications, RFC 5965 feedback
// reports, RFC 3834 auto-replies and the plain-text bounces of older MTAs)
// and hands the token and the report to a Handler.
//
// Classifying a bounce (which recipient, why, whether to suppress) belongs to
// the delivery package (delivery.ClassifyBounce), which classifies the
// replies received during delivery with the same rules.
package bounce
