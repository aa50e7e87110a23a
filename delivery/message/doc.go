// Package message builds, checks and addresses the RFC 5322 / MIME messages
// Posthaste stores and sends.
//
// Messages are built once, when the API accepts them, and the stored bytes are
// what every delivery attempt sends. Build turns a Spec into those bytes;
// CheckRaw vets a caller-supplied message and adds the header fields it lacks;
// NormalizeMailbox turns an address into the form used in the SMTP envelope.
//
// The package supports 7-bit headers only: internationalized text in header
// fields is encoded per RFC 2047, internationalized domains are converted to
// A-labels, and a non-ASCII local part is refused because SMTPUTF8 (RFC 6531)
// is not supported.
//
// DKIM signing (RFC 6376) is a separate step that runs on the bytes Build and
// CheckRaw return: SignDKIM prepends its DKIM-Signature field, which RFC 6376
// section 5.6 permits, and never needs to rewrite what this package wrote.
package message
