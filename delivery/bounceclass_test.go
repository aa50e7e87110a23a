package delivery

import (
	"testing"
)

// TestClassifyBounce has at least one case per rule, from reply texts in the
// styles of Gmail, Outlook, Yahoo, Postfix and Exim, and the texts this
// package makes up for DNS, TLS and network failures.
func TestClassifyBounce(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		code      int
		enhanced  string
		text      string
		class     BounceClass
		permanent bool
		rule      string
	}{
		// recipient
		{"gmail no such user", 550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser",
			BounceRecipient, true, "recipient-code"},
		{"outlook recipient not found 5.1.10", 550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
			BounceRecipient, true, "recipient-code"},
		{"yahoo no account", 554, "", "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.bf1.yahoo.com",
			BounceRecipient, true, "recipient-text"},
		{"exim unrouteable address", 550, "", "Unrouteable address", BounceRecipient, true, "recipient-text"},
		{"postfix bad syntax", 501, "5.1.3", "Bad recipient address syntax", BounceRecipient, true, "recipient-code"},
		{"sender rejected by code", 553, "5.1.8", "<b+x@bounces.example.test>: Sender address rejected: Domain not found", BouncePolicy, true, "sender-address-code"},
		{"sender rejected by text", 550, "", "Sender address rejected: not owned by user", BouncePolicy, true, "sender-address-text"},
		{"other address status stays unclassified", 550, "5.1.0", "Address rejected", BounceUnclassified, true, "none"},

		// mailbox
		{"postfix mailbox full", 552, "5.2.2", "<a@example.test>: Recipient address rejected: mailbox full", BounceMailboxFull, true, "mailbox-full-code"},
		{"gmail over quota temporary", 452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp",
			BounceMailboxFull, false, "mailbox-full-code"},
		{"exim quota without enhanced code", 552, "", "Mailbox quota exceeded", BounceMailboxFull, true, "mailbox-full-text"},
		{"gmail disabled", 550, "5.2.1", "The email account that you tried to reach is disabled. https://support.google.com/mail/?p=DisabledUser",
			BounceMailboxDisabled, true, "mailbox-disabled-code"},
		{"yahoo mailbox disabled", 554, "", "delivery error: dd Sorry your message to someone@yahoo.com cannot be delivered. This mailbox is disabled (554.30). - mta1234.mail.bf1.yahoo.com",
			BounceMailboxDisabled, true, "mailbox-disabled-text"},

		// domain
		{"null mx reply", 556, "5.1.10", "Recipient address has null MX", BounceDomain, true, "null-mx-reply"},
		{"null mx local", 550, "5.1.10", "domain example.test does not accept mail (null MX)", BounceDomain, true, "null-mx-text"},
		{"nxdomain local", 550, "5.1.2", "domain nowhere.test does not exist", BounceDomain, true, "domain-code"},
		{"no address for hosts", 550, "5.4.4", "no address for the mail hosts of example.test", BounceDomain, true, "domain-code"},
		{"exim unrouteable domain", 550, "", "Unrouteable mail domain \"nowhere.test\"", BounceDomain, true, "domain-text"},

		// policy
		{"spamhaus", 554, "5.7.1", "Service unavailable; Client host [198.51.100.7] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/198.51.100.7",
			BouncePolicy, true, "blocklist"},
		{"outlook block list", 550, "5.7.1", "Unfortunately, messages from [198.51.100.7] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).",
			BouncePolicy, true, "blocklist"},
		{"gmail dmarc", 550, "5.7.26", "Unauthenticated email from example.test is not accepted due to domain's DMARC policy. Please contact the administrator of example.test domain.",
			BouncePolicy, true, "dmarc"},
		{"gmail ptr", 550, "5.7.25", "The IP address sending this message does not have a PTR record setup, or the corresponding forward DNS entry does not point to the sending IP.",
			BouncePolicy, true, "dmarc"},
		{"spf fail without code", 550, "", "SPF check failed for example.test", BouncePolicy, true, "authentication-text"},
		{"gmail reputation", 550, "5.7.1", "Our system has detected that this message is likely suspicious due to the very low reputation of the sending domain.",
			BouncePolicy, true, "authentication-text"},
		{"postfix relay denied", 554, "5.7.1", "<a@example.test>: Relay access denied", BouncePolicy, true, "policy-code"},
		{"relay denied without code", 550, "", "relaying denied", BouncePolicy, true, "policy-text"},

		// rate_limit: never permanent, even when sent as 5yz
		{"outlook too many messages as 5yz", 550, "5.7.1", "Too many messages from this sender, please try again later",
			BounceRateLimit, false, "rate-limit-text"},
		{"exim too many connections", 421, "4.7.0", "Too many concurrent SMTP connections; please try again later.", BounceRateLimit, false, "rate-limit-text"},
		{"yahoo deferred", 421, "4.7.0", "[TSS04] Messages from 198.51.100.7 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
			BounceRateLimit, false, "rate-limit-text"},
		{"yahoo tss code alone", 421, "4.7.0", "[TSS04] Mail from 198.51.100.7 deferred", BounceRateLimit, false, "rate-limit-text"},
		{"outlook server busy", 451, "4.7.500", "Server busy. Please try again later from [198.51.100.7]. (S77714)", BounceRateLimit, false, "rate-limit-text"},
		{"gmail unusual rate", 421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
			BounceRateLimit, false, "rate-limit-code"},
		{"congestion", 452, "4.4.5", "Insufficient system resources", BounceRateLimit, false, "rate-limit-code"},

		// content
		{"virus", 554, "5.7.1", "The message was rejected because it contains prohibited virus or spam content", BounceContent, true, "virus-spam-text"},
		{"gmail unsolicited", 550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.",
			BounceContent, true, "virus-spam-text"},
		{"postfix too big", 552, "5.3.4", "Message size exceeds fixed limit", BounceContent, true, "too-big-code"},
		{"gmail too big", 552, "5.2.3", "Your message exceeded Google's message size limits.", BounceContent, true, "too-big-code"},
		{"too big without code", 552, "", "Message is too large", BounceContent, true, "too-big-text"},
		{"local 8bit conversion", 554, "5.6.3", "8-bit content cannot be converted", BounceContent, true, "content-code"},

		// tls
		{"starttls required", 530, "5.7.0", "Must issue a STARTTLS command first", BounceTLS, true, "tls-text"},
		{"local tls handshake", 451, "4.7.5", "TLS handshake failed", BounceTLS, false, "tls-code"},
		{"encryption needed", 530, "5.7.10", "Encryption needed", BounceTLS, true, "tls-code"},

		// dns
		{"local dns", 451, "4.4.3", "MX lookup for example.test failed", BounceDNS, false, "dns-code"},
		{"postfix temporary lookup", 451, "", "Temporary lookup failure", BounceDNS, false, "dns-text"},

		// network
		{"local connection failed", 451, "4.4.1", "connection failed", BounceNetwork, false, "network-code"},
		{"connection timed out text", 421, "", "Connection timed out", BounceNetwork, false, "network-text"},

		// unclassified
		{"generic mailbox unavailable", 550, "", "Requested action not taken: mailbox unavailable", BounceUnclassified, true, "none"},
		{"nothing at all", 0, "", "", BounceUnclassified, false, "none"},

		// codes read from the text, as in a DSN's Diagnostic-Code
		{"codes in the text", 0, "", "550-5.1.1 The email account that you tried to reach does not exist.", BounceRecipient, true, "recipient-code"},
		{"exim generic status with specific text", 0, "5.0.0", "552 5.2.2 Mailbox full", BounceMailboxFull, true, "mailbox-full-code"},
		{"dsn status alone", 0, "5.1.1", "", BounceRecipient, true, "recipient-code"},
		{"dsn delayed status alone", 0, "4.2.2", "", BounceMailboxFull, false, "mailbox-full-code"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := ClassifyBounce(tt.code, tt.enhanced, tt.text)
			if got.Class != tt.class || got.Permanent != tt.permanent || got.Rule != tt.rule {
				t.Fatalf("ClassifyBounce(%d, %q, %q) = %+v, want class %s permanent %v rule %s",
					tt.code, tt.enhanced, tt.text, got, tt.class, tt.permanent, tt.rule)
			}
		})
	}

	t.Run("every rule has a case", func(t *testing.T) {
		covered := make(map[string]bool)
		for _, tt := range tests {
			covered[tt.rule] = true
		}
		for _, r := range bounceRules {
			if !covered[r.name] {
				t.Errorf("rule %s has no test case", r.name)
			}
		}
	})
}

func TestClassifySMTPError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		err       *SMTPError
		class     BounceClass
		permanent bool
	}{
		{"rcpt refused", &SMTPError{Code: 550, EnhancedCode: "5.1.1", Message: "no such user", Remote: true}, BounceRecipient, true},
		{"refused at greeting", &SMTPError{Code: 554, EnhancedCode: "5.7.1", Message: "blocked using zen.spamhaus.org", Remote: true, Greeting: true}, BouncePolicy, false},
		{"nil", nil, BounceUnclassified, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := ClassifySMTPError(tt.err)
			if got.Class != tt.class || got.Permanent != tt.permanent {
				t.Fatalf("got %+v, want %s permanent=%v", got, tt.class, tt.permanent)
			}
		})
	}
}

func TestBounceSuppression(t *testing.T) {
	t.Parallel()
	classes := []BounceClass{BounceRecipient, BounceMailboxFull, BounceMailboxDisabled, BounceDomain, BouncePolicy,
		BounceRateLimit, BounceContent, BounceTLS, BounceDNS, BounceNetwork, BounceUnclassified}
	want := map[BounceClass]Suppression{
		BounceRecipient:       SuppressionUnknownRecipient,
		BounceMailboxDisabled: SuppressionMailboxDisabled,
	}
	for _, c := range classes {
		t.Run(string(c), func(t *testing.T) {
			t.Parallel()
			if got := BounceSuppression(c, true); got != want[c] {
				t.Errorf("permanent: got %q, want %q", got, want[c])
			}
			if got := BounceSuppression(c, false); got != SuppressionNone {
				t.Errorf("temporary: got %q, want none", got)
			}
		})
	}
}

func TestMatchAnyCode(t *testing.T) {
	t.Parallel()
	tests := []struct {
		patterns []string
		code     string
		want     bool
	}{
		{[]string{"x.1.1"}, "5.1.1", true},
		{[]string{"x.1.1"}, "4.1.1", true},
		{[]string{"x.1.1"}, "2.1.1", false},
		{[]string{"x.1.1"}, "5.1.10", false},
		{[]string{"5.4.4"}, "4.4.4", false},
		{[]string{"x.7.*"}, "5.7.500", true},
		{[]string{"x.7.*"}, "5.17.1", false},
		{[]string{"x.1.1"}, "", false},
		{[]string{"x.1.1"}, "garbage", false},
	}
	for _, tt := range tests {
		t.Run(tt.code, func(t *testing.T) {
			t.Parallel()
			if got := matchAnyCode(tt.patterns, tt.code); got != tt.want {
				t.Fatalf("matchAnyCode(%v, %q) = %v", tt.patterns, tt.code, got)
			}
		})
	}
}
