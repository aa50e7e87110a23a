package delivery

import (
	"regexp"
	"strconv"
	"strings"
)

// BounceClass says why a recipient bounced. Every bounce gets one, whether
// the reply came during delivery (an SMTPError) or later in a report.
type BounceClass string

// The bounce classes.
const (
	// BounceRecipient: the address does not exist (RFC 3463 X.1.1).
	BounceRecipient BounceClass = "recipient"
	// BounceMailboxFull: the mailbox exists but is over its quota (X.2.2).
	BounceMailboxFull BounceClass = "mailbox_full"
	// BounceMailboxDisabled: the mailbox exists but accepts no mail
	// (X.2.1), such as a closed or suspended account.
	BounceMailboxDisabled BounceClass = "mailbox_disabled"
	// BounceDomain: the domain does not exist or accepts no mail (X.1.2,
	// null MX per RFC 7505).
	BounceDomain BounceClass = "domain"
	// BouncePolicy: the receiver refused the sender, not the recipient:
	// blocklists, reputation, DMARC, SPF, DKIM (X.7.x).
	BouncePolicy BounceClass = "policy"
	// BounceRateLimit: too many connections, messages or recipients for
	// now, even when the reply is 5yz.
	BounceRateLimit BounceClass = "rate_limit"
	// BounceContent: the message itself was refused: spam, a virus, its
	// size (X.3.4, X.6.x).
	BounceContent BounceClass = "content"
	// BounceTLS: encryption was required or failed (X.7.10, X.7.5).
	BounceTLS BounceClass = "tls"
	// BounceDNS: a DNS lookup failed (X.4.3, X.4.4 when temporary).
	BounceDNS BounceClass = "dns"
	// BounceNetwork: the connection failed or broke (X.4.1, X.4.2).
	BounceNetwork BounceClass = "network"
	// BounceUnclassified: nothing above matched.
	BounceUnclassified BounceClass = "unclassified"
)

// BounceClassification is the class of one bounce and whether it is
// permanent.
type BounceClassification struct {
	Class BounceClass
	// Permanent is true for a 5yz reply (or a class 5 enhanced code when
	// there is no reply code), except for rate limits, which are never
	// permanent whatever the code says: the same mail is accepted later.
	Permanent bool
	// Rule names the rule that decided the class, for logs and tests.
	Rule string
}

// bounceRule is one row of the classification table. A rule matches when
// every condition it has holds: the enhanced code matches one of codes
// (patterns such as "5.1.1", "x.7.26" for either class, or "x.7.*"), the
// reply code is one of replies, and the text matches text.
type bounceRule struct {
	name      string
	class     BounceClass
	codes     []string
	replies   []int
	text      *regexp.Regexp
	transient bool // never permanent (rate limits)
}

// bounceRules is the one classification table, tried in order; the first
// match wins. Text rules that recognize a specific cause come before the
// code rules, because receivers reuse broad codes: Outlook answers an
// unknown user with 5.1.10 and a rate limit with 5.7.1, and Spamhaus'
// name contains "spam". It is built once and never changed.
var bounceRules = []bounceRule{
	// RFC 7505 section 4.2: 556 5.1.10 is a null MX, a domain that takes
	// no mail. Outlook sends 550 5.1.10 for unknown recipients, so the
	// reply code or the text decides.
	{name: "null-mx-reply", class: BounceDomain, replies: []int{556}},
	{name: "null-mx-text", class: BounceDomain, text: rx(`null mx`)},

	// RFC 3207 section 4 ("530 5.7.0 Must issue a STARTTLS command first"),
	// RFC 5248's X.7.10 (encryption needed) and X.7.5 (cryptographic
	// failure).
	{name: "tls-code", class: BounceTLS, codes: []string{"x.7.10", "x.7.5", "x.7.11"}},
	{name: "tls-text", class: BounceTLS, text: rx(`starttls|\btls\b.*(required|failed|handshake)|encryption (is )?(needed|required)|certificate (verification|validation) failed`)},

	{name: "mailbox-full-code", class: BounceMailboxFull, codes: []string{"x.2.2"}},
	{name: "mailbox-full-text", class: BounceMailboxFull, text: rx(`(mailbox|inbox|mail ?box|account|user|recipient)('s)? (is )?(full|over (its |the )?quota)|over ?quota|quota (exceeded|full)|out of storage|insufficient (mailbox )?storage|exceeded (its|the|their) storage`)},

	// Blocklists before content and rate limits: their names and texts
	// ("spamhaus", "listed due to too many complaints") mislead both.
	{name: "blocklist", class: BouncePolicy, text: rx(`blocked using|block ?list|black ?list|\blisted (in|on|at|by)\b|spamhaus|spamcop|barracuda|sorbs|dnsbl|\brbl\b|\bs5h\b|uceprotect`)},

	{name: "rate-limit-code", class: BounceRateLimit, transient: true, codes: []string{"x.7.28", "x.4.5"}},
	{name: "rate-limit-text", class: BounceRateLimit, transient: true, text: rx(`too many (connections|concurrent|messages|mails|emails|recipients|sessions)|rate ?limit|rate-limit|throttl|unusual rate|sending rate|receiving mail (at )?a rate|temporarily deferred|unexpected volume|\btss0[0-9]\b|server busy|try again later, closing connection|exceeded .*(sending|message) (limit|quota)|too many .* (per|in) (hour|day|minute)`)},

	{name: "dmarc", class: BouncePolicy, codes: []string{"x.7.26", "x.7.27", "x.7.25", "x.7.23", "x.7.24"}},
	{name: "authentication-text", class: BouncePolicy, text: rx(`dmarc|\bspf\b|\bdkim\b|unauthenticated|not authenticated|authentication (failed|required)|sender (policy|authentication)|reputation|poor reputation|banned sender`)},

	{name: "virus-spam-text", class: BounceContent, text: rx(`virus|malware|infected|phish|\bspam\b|unsolicited|junk mail|message content|content (rejected|filter|policy)|suspicious (content|link|attachment)|prohibited (attachment|content|file)`)},
	{name: "too-big-code", class: BounceContent, codes: []string{"x.3.4", "x.2.3"}},
	{name: "too-big-text", class: BounceContent, text: rx(`message (is )?too (big|large)|exceeds? (the )?(maximum|fixed|size)|size (limit|exceeded)|message length exceeds`)},
	{name: "content-code", class: BounceContent, codes: []string{"x.6.*"}},

	{name: "mailbox-disabled-code", class: BounceMailboxDisabled, codes: []string{"x.2.1"}},
	{name: "mailbox-disabled-text", class: BounceMailboxDisabled, text: rx(`(mailbox|account|user|address) (has been |is |was )?(disabled|deactivated|suspended|inactive|closed|locked|blocked for inactivity|expired)|(disabled|inactive|suspended|deactivated) (mailbox|account|user)|no longer (active|in use|available|valid)`)},

	// RFC 3463 X.1.7 and X.1.8 are about the sender's address, not the
	// recipient's: a refusal of the sender.
	{name: "sender-address-code", class: BouncePolicy, codes: []string{"x.1.7", "x.1.8"}},
	{name: "sender-address-text", class: BouncePolicy, text: rx(`sender address rejected|sender (domain|address) (is )?(invalid|unknown|not found)`)},

	{name: "domain-code", class: BounceDomain, codes: []string{"x.1.2", "5.4.4"}},
	{name: "domain-text", class: BounceDomain, text: rx(`no such domain|domain (does not exist|not found|name not found|unknown)|unknown domain|unrouteable (mail )?domain|host (or domain name )?not found|nxdomain|domain .* does not accept mail|no mx (record|host)`)},

	{name: "recipient-code", class: BounceRecipient, codes: []string{"x.1.1", "x.1.10", "x.1.3", "x.1.6"}},
	{name: "recipient-text", class: BounceRecipient, text: rx(`user unknown|unknown user|no such (user|mailbox|recipient|account|address|person)|(user|mailbox|recipient|account|address)( address)? (does not|doesn't|did not) exist|does not exist|recipient ?not ?found|recipnotfound|invalid (recipient|mailbox|address|user)|unknown (recipient|mailbox|local[- ]part|address)|mailbox not found|not a valid (mailbox|recipient|user)|no mailbox here|address rejected: user|unrouteable address|doesn't have an? [^ ]+ account`)},

	{name: "dns-code", class: BounceDNS, codes: []string{"x.4.3", "4.4.4"}},
	{name: "dns-text", class: BounceDNS, text: rx(`\bdns\b|servfail|name ?server|lookup (failed|failure|error|timed out)`)},

	{name: "network-code", class: BounceNetwork, codes: []string{"x.4.1", "x.4.2"}},
	{name: "network-text", class: BounceNetwork, text: rx(`connection (refused|timed out|reset|lost|closed)|timed? ?out|no route to host|network is unreachable`)},

	// Broad rules last: whatever is left of X.7 is a policy refusal. What
	// is left of X.1 (X.1.0 "other address status" is used for senders and
	// recipients alike) stays unclassified, so that it never suppresses.
	{name: "policy-code", class: BouncePolicy, codes: []string{"x.7.*"}},
	{name: "policy-text", class: BouncePolicy, text: rx(`relay(ing)? (access )?denied|not permitted|access denied|rejected (by|for) policy|policy (reasons|violation)`)},
}

// rx compiles a case-insensitive pattern for the table.
func rx(pattern string) *regexp.Regexp {
	return regexp.MustCompile(`(?i)` + pattern)
}

// ClassifyBounce classifies a bounce from its reply code (0 when unknown),
// its RFC 3463 enhanced status code ("" when unknown) and its text: a reply
// text, or a DSN's Diagnostic-Code. A code missing from the arguments is
// looked for at the start of the text ("550 5.1.1 ..."); a generic X.0.0
// code gives way to a more specific one in the text, as Exim writes
// "Status: 5.0.0" above "552 5.2.2 Mailbox full".
func ClassifyBounce(code int, enhanced, text string) BounceClassification {
	text = strings.TrimSpace(text)
	textCode, textEnhanced := leadingCodes(text)
	if code == 0 {
		code = textCode
	}
	if enhanced == "" || strings.HasSuffix(enhanced, ".0.0") && textEnhanced != "" {
		if textEnhanced != "" {
			enhanced = textEnhanced
		}
	}
	permanent := code/100 == 5 || code == 0 && strings.HasPrefix(enhanced, "5.")
	for _, r := range bounceRules {
		if r.matches(code, enhanced, text) {
			return BounceClassification{Class: r.class, Permanent: permanent && !r.transient, Rule: r.name}
		}
	}
	return BounceClassification{Class: BounceUnclassified, Permanent: permanent, Rule: "none"}
}

// ClassifySMTPError classifies a failure recorded during delivery.
func ClassifySMTPError(e *SMTPError) BounceClassification {
	if e == nil {
		return BounceClassification{Class: BounceUnclassified, Rule: "none"}
	}
	c := ClassifyBounce(e.Code, e.EnhancedCode, e.Message)
	// A reply at the greeting is never a bounce of the recipients (see
	// SMTPError.Greeting), so it is never permanent either.
	if e.Temporary() {
		c.Permanent = false
	}
	return c
}

func (r *bounceRule) matches(code int, enhanced, text string) bool {
	if len(r.codes) > 0 && !matchAnyCode(r.codes, enhanced) {
		return false
	}
	if len(r.replies) > 0 && !containsInt(r.replies, code) {
		return false
	}
	if r.text != nil && !r.text.MatchString(text) {
		return false
	}
	return len(r.codes) > 0 || len(r.replies) > 0 || r.text != nil
}

// matchAnyCode matches an enhanced code against patterns: "x" stands for
// class 4 or 5, "*" for any detail.
func matchAnyCode(patterns []string, enhanced string) bool {
	if enhanced == "" {
		return false
	}
	cls, rest, ok := strings.Cut(enhanced, ".")
	if !ok {
		return false
	}
	subject, detail, _ := strings.Cut(rest, ".")
	for _, p := range patterns {
		pc, prest, _ := strings.Cut(p, ".")
		ps, pd, _ := strings.Cut(prest, ".")
		if pc != "x" && pc != cls || pc == "x" && cls != "4" && cls != "5" {
			continue
		}
		if ps != subject {
			continue
		}
		if pd == "*" || pd == detail {
			return true
		}
	}
	return false
}

func containsInt(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// leadingCodes reads "550 5.1.1 text", "550-5.1.1 text" or "5.1.1 text" at
// the start of a reply text or diagnostic (RFC 5321 section 4.2, RFC 2034
// section 4).
func leadingCodes(text string) (code int, enhanced string) {
	rest := text
	if len(rest) >= 3 {
		if c, err := strconv.Atoi(rest[:3]); err == nil && c >= 200 && c < 600 && (len(rest) == 3 || rest[3] == ' ' || rest[3] == '-') {
			code = c
			rest = strings.TrimLeft(rest[3:], " -")
		}
	}
	first, _, _ := strings.Cut(rest, " ")
	first = strings.TrimRight(first, ".,;:")
	if isEnhancedCode(first) {
		enhanced = first
	}
	return code, enhanced
}

// Suppression says whether a bounce or complaint puts an address on the
// suppression list, and why. The zero value suppresses nothing.
type Suppression string

// The suppression reasons.
const (
	SuppressionNone             Suppression = ""
	SuppressionUnknownRecipient Suppression = "unknown_recipient"
	SuppressionMailboxDisabled  Suppression = "mailbox_disabled"
	SuppressionComplaint        Suppression = "complaint"
)

// BounceSuppression says whether a bounce suppresses its address. Only a
// permanent bounce that speaks about the address itself does: the address
// does not exist, or its mailbox is disabled. Everything else (a full
// mailbox, policy and reputation refusals, rate limits, content, TLS, DNS
// and network trouble, domains) says something about the sender, the
// message or the moment, and suppressing for it would lose mail for good
// over a problem that can be fixed. Complaints always suppress; see
// SuppressionComplaint.
func BounceSuppression(class BounceClass, permanent bool) Suppression {
	if !permanent {
		return SuppressionNone
	}
	switch class {
	case BounceRecipient:
		return SuppressionUnknownRecipient
	case BounceMailboxDisabled:
		return SuppressionMailboxDisabled
	default:
		return SuppressionNone
	}
}
