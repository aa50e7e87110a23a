package sandbox

import (
	"fmt"
	"strings"

	"github.com/emersion/go-smtp"
)

// Outcome describes how the sandbox answers one kind of recipient.
type Outcome struct {
	// LocalPart is the recipient local part that selects the outcome, or "*"
	// for every local part not listed.
	LocalPart string
	// Stage is the SMTP command whose reply carries the outcome: RCPT or DATA.
	Stage string
	// Reply is the reply line the sandbox sends.
	Reply string
	// Description says what a sender sees and why.
	Description string
}

// behaviour is what the sandbox does for one recipient.
type behaviour int

const (
	behaviourAccept behaviour = iota
	behaviourBounce
	behaviourDefer
	behaviourRejectData
	behaviourFull
	behaviourSlow
	behaviourBounceAsync
	behaviourComplaint
)

// The replies follow RFC 3463 enhanced status codes: X.1.1 bad destination
// mailbox, X.2.2 mailbox full, X.3.0 other mail system status, X.6.0 other
// media (content) error.
var (
	errBounce = &smtp.SMTPError{
		Code:         550,
		EnhancedCode: smtp.EnhancedCode{5, 1, 1},
		Message:      "mailbox does not exist",
	}
	errDefer = &smtp.SMTPError{
		Code:         451,
		EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message:      "temporary failure, try again later",
	}
	errFull = &smtp.SMTPError{
		Code:         452,
		EnhancedCode: smtp.EnhancedCode{4, 2, 2},
		Message:      "mailbox full",
	}
	errRejectData = &smtp.SMTPError{
		Code:         554,
		EnhancedCode: smtp.EnhancedCode{5, 6, 0},
		Message:      "message content rejected",
	}
	errShuttingDown = &smtp.SMTPError{
		Code:         421,
		EnhancedCode: smtp.EnhancedCode{4, 3, 2},
		Message:      "sandbox shutting down",
	}
)

// acceptedPrefix starts the text of the 250 reply to DATA; the queue id follows.
const acceptedPrefix = "OK: queued as "

// Outcomes returns the table of local parts the sandbox treats specially, so
// documentation and the command line can print it. Matching ignores case and
// a +tag: "Bounce+welcome@example.test" bounces.
func Outcomes() []Outcome {
	return []Outcome{
		{
			LocalPart:   "bounce",
			Stage:       "RCPT",
			Reply:       replyLine(errBounce),
			Description: "The mailbox does not exist: a permanent failure, the recipient is bounced.",
		},
		{
			LocalPart: "defer",
			Stage:     "RCPT",
			Reply:     replyLine(errDefer),
			Description: "A temporary failure the first time a (recipient, MAIL FROM) pair is seen, " +
				"accepted on the next try; the pair is then forgotten, so the try after that defers again.",
		},
		{
			LocalPart:   "full",
			Stage:       "RCPT",
			Reply:       replyLine(errFull),
			Description: "The mailbox is full, every time: retried until the maximum age, then failed.",
		},
		{
			LocalPart: "reject-data",
			Stage:     "DATA",
			Reply:     replyLine(errRejectData),
			Description: "Accepted at RCPT, then the content is rejected at the end of DATA. SMTP answers DATA " +
				"once per transaction, so every recipient sharing the transaction gets this reply.",
		},
		{
			LocalPart: "slow",
			Stage:     "DATA",
			Reply:     "250 2.0.0 " + acceptedPrefix + "<id>",
			Description: "Accepted, but the reply to DATA waits for the configured delay (2s by default), " +
				"long enough to watch the recipient in \"sending\".",
		},
		{
			LocalPart: "bounce-async",
			Stage:     "DATA",
			Reply:     "250 2.0.0 " + acceptedPrefix + "<id>",
			Description: "Accepted, then a moment later (500ms by default) a delivery status notification " +
				"(RFC 3464, as Postfix writes it: Action failed, Status 5.1.1) is sent over SMTP from <> to the " +
				"MAIL FROM address, at the bounce listener: delivered, then bounced. Only when a bounce listener runs.",
		},
		{
			LocalPart: "complaint",
			Stage:     "DATA",
			Reply:     "250 2.0.0 " + acceptedPrefix + "<id>",
			Description: "Accepted, then a moment later an abuse feedback report (RFC 5965) is sent the same way, " +
				"as a mailbox provider's feedback loop would: delivered, then complained and suppressed. Only when " +
				"a bounce listener runs.",
		},
		{
			LocalPart:   "*",
			Stage:       "DATA",
			Reply:       "250 2.0.0 " + acceptedPrefix + "<id>",
			Description: "Any other local part: accepted with a queue id and kept in the recent-messages list.",
		},
	}
}

func replyLine(e *smtp.SMTPError) string {
	c := e.EnhancedCode
	return fmt.Sprintf("%d %d.%d.%d %s", e.Code, c[0], c[1], c[2], e.Message)
}

// classify picks the behaviour for a recipient address. The local part is
// everything before the last "@" (RFC 5321 section 4.1.2: a quoted local part
// may itself contain "@"); a subaddress "+tag" and letter case are ignored.
func classify(addr string) behaviour {
	local := addr
	if i := strings.LastIndexByte(addr, '@'); i >= 0 {
		local = addr[:i]
	}
	if i := strings.IndexByte(local, '+'); i >= 0 {
		local = local[:i]
	}
	switch strings.ToLower(local) {
	case "bounce":
		return behaviourBounce
	case "defer":
		return behaviourDefer
	case "reject-data":
		return behaviourRejectData
	case "full":
		return behaviourFull
	case "slow":
		return behaviourSlow
	case "bounce-async":
		return behaviourBounceAsync
	case "complaint":
		return behaviourComplaint
	default:
		return behaviourAccept
	}
}
