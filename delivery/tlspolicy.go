package delivery

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// TLSPolicy is how much TLS a destination gets. The policy that applied is
// recorded on every attempt row.
type TLSPolicy string

// The TLS policies. The first four can be configured per domain
// (Config.TLSPolicies); the MTA-STS ones come from the domain's published
// policy (RFC 8461) when no policy is configured for it.
const (
	// TLSNone never starts TLS, for servers whose STARTTLS is broken in a
	// way that a plain-text retry does not catch.
	TLSNone TLSPolicy = "none"
	// TLSOpportunistic starts TLS when the server offers it and delivers in
	// plain text otherwise (RFC 3207, RFC 7435). The certificate is checked
	// and the result recorded, but a failed check does not stop delivery.
	TLSOpportunistic TLSPolicy = "opportunistic"
	// TLSRequire delivers only over TLS: a server that does not offer
	// STARTTLS, or whose handshake fails, is not sent the message.
	TLSRequire TLSPolicy = "require"
	// TLSRequireVerified is TLSRequire with a certificate that chains to a
	// trusted root and is valid for the MX host name.
	TLSRequireVerified TLSPolicy = "require-verified"
	// TLSMTASTSEnforce is an MTA-STS policy in enforce mode: only MX hosts
	// the policy lists, over TLS with a verified certificate (RFC 8461
	// section 5).
	TLSMTASTSEnforce TLSPolicy = "mta-sts-enforce"
	// TLSMTASTSTesting is an MTA-STS policy in testing mode: what enforce
	// mode would refuse is recorded, and the message delivered as with
	// TLSOpportunistic.
	TLSMTASTSTesting TLSPolicy = "mta-sts-testing"
)

// parseTLSPolicies validates Config.TLSPolicies: keys are domains, values
// one of the configurable policies.
func parseTLSPolicies(in map[string]string) (map[string]TLSPolicy, error) {
	out := make(map[string]TLSPolicy, len(in))
	for domain, value := range in {
		key := strings.ToLower(strings.TrimSuffix(strings.TrimSpace(domain), "."))
		if key == "" || strings.ContainsAny(key, " */[]:") {
			return nil, fmt.Errorf("TLSPolicies: %q is not a domain", domain)
		}
		switch p := TLSPolicy(strings.ToLower(strings.TrimSpace(value))); p {
		case TLSNone, TLSOpportunistic, TLSRequire, TLSRequireVerified:
			out[key] = p
		default:
			return nil, fmt.Errorf("TLSPolicies: %s: %q is not none, opportunistic, require or require-verified", domain, value)
		}
	}
	return out, nil
}

// tlsRequirement is what a policy asks of each host of one domain's
// attempt.
type tlsRequirement struct {
	policy TLSPolicy
	domain string
	// sts is the domain's MTA-STS policy under TLSMTASTSEnforce and
	// TLSMTASTSTesting.
	sts *stsPolicy
	// verifyIfOffered fails a host whose certificate does not verify even
	// under TLSOpportunistic (SMTPConfig.VerifyTLS).
	verifyIfOffered bool
}

// startTLS reports whether STARTTLS is used when offered.
func (r tlsRequirement) startTLS() bool { return r.policy != TLSNone }

// needTLS reports whether a host without TLS is refused.
func (r tlsRequirement) needTLS() bool {
	return r.policy == TLSRequire || r.policy == TLSRequireVerified || r.policy == TLSMTASTSEnforce
}

// needVerified reports whether a host whose certificate does not verify is
// refused.
func (r tlsRequirement) needVerified() bool {
	return r.policy == TLSRequireVerified || r.policy == TLSMTASTSEnforce || r.verifyIfOffered
}

// plainFallback reports whether a host whose TLS handshake failed may be
// tried again in plain text: only when nothing requires TLS, or a verified
// certificate, since falling back would let anyone who can break the
// handshake disable either.
func (r tlsRequirement) plainFallback() bool { return !r.needTLS() && !r.needVerified() }

// label names the policy in replies: "MTA-STS policy of example.com" or
// "TLS policy require of example.com".
func (r tlsRequirement) label() string {
	if r.sts != nil {
		return "MTA-STS policy of " + r.domain
	}
	return fmt.Sprintf("TLS policy %s of %s", r.policy, r.domain)
}

// refuse is the error of a host that does not meet the policy. Its reply
// defers the recipients: policies change, certificates are renewed, and
// RFC 8461 section 5 asks for the message to be queued, not bounced.
func (r tlsRequirement) refuse(enhanced, reason string) *policyError {
	return &policyError{reason: reason, reply: &SMTPError{Code: codeTempFailure, EnhancedCode: enhanced,
		Message: r.label() + ": " + reason}}
}

// policyError is a host refused by the TLS policy; reason is what the
// attempt row records as the policy failure.
type policyError struct {
	reason string
	reply  *SMTPError
}

func (e *policyError) Error() string { return e.reply.Error() }
func (e *policyError) Unwrap() error { return e.reply }

// mxFailure says why host may not be used under an MTA-STS policy, "" when
// it may (RFC 8461 section 4.1).
func (r tlsRequirement) mxFailure(host string) string {
	if r.sts == nil || r.sts.matchMX(host) {
		return ""
	}
	return host + " does not match"
}

// check says why the session sc does not meet the policy, "" when it
// does. Under TLSMTASTSTesting it is what enforce mode would refuse; the
// caller records it and goes on.
func (r tlsRequirement) check(sc *smtpConn) (enhanced, reason string) {
	host := sc.target.Host
	switch {
	case !sc.tls && (r.needTLS() || r.policy == TLSMTASTSTesting):
		if sc.noTLS != "" {
			return "4.7.10", host + " " + sc.noTLS
		}
		// RFC 3463 X.7.10 (RFC 5248 registry): encryption needed.
		return "4.7.10", host + " does not offer STARTTLS"
	case sc.tls && sc.verifyErr != nil && (r.needVerified() || r.policy == TLSMTASTSTesting):
		return "4.7.5", fmt.Sprintf("certificate of %s not valid: %v", host, sc.verifyErr)
	}
	return "", ""
}

// suits reports whether a pooled connection, opened under some domain's
// policy, may carry a transaction under req: it tried STARTTLS if req
// would, and meets req.
func (sc *smtpConn) suits(req tlsRequirement) bool {
	if req.startTLS() && !sc.triedTLS {
		return false
	}
	_, reason := req.check(sc)
	return reason == "" || req.policy == TLSMTASTSTesting
}

// verifyPeer checks the server's certificate chain against roots (the
// system's when nil) and host, as a client with certificate checks on
// would (RFC 8461 section 4.2 asks the same of MTA-STS: a chain to a
// trusted root, valid for the MX host name, wildcards allowed). It runs
// whatever the policy, so that every attempt records whether the
// certificate verified.
func verifyPeer(cs tls.ConnectionState, host string, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("no certificate")
	}
	opts := x509.VerifyOptions{DNSName: host, Roots: roots, Intermediates: x509.NewCertPool()}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(opts)
	return err
}
