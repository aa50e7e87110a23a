package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/delivery/message"
	"github.com/posthaste/posthaste/internal/keyenc"
)

// ErrNoKeyEncryptionKey is returned when a DKIM key would have to be stored
// but no key-encryption key is configured: private keys are never stored in
// the clear.
var ErrNoKeyEncryptionKey = errors.New("no key-encryption key is configured (--key-encryption-key-file or POSTHASTE_KEY_ENCRYPTION_KEY), so DKIM keys cannot be stored")

// DefaultDKIMKeyGrace is how long a replaced DKIM key stays published by
// default: longer than a message may wait for delivery (48h by default),
// since receivers verify a signature when the message arrives.
const DefaultDKIMKeyGrace = 7 * 24 * time.Hour

// domainCheckTimeout bounds all the lookups of one verification.
const domainCheckTimeout = 20 * time.Second

// DomainResolver looks up the DNS records a domain verification checks.
// *net.Resolver implements it.
type DomainResolver interface {
	LookupTXT(ctx context.Context, name string) ([]string, error)
	LookupMX(ctx context.Context, name string) ([]*net.MX, error)
}

// Record statuses, as the API reports them.
const (
	RecordOK        = "ok"
	RecordMissing   = "missing"
	RecordWrong     = "wrong"
	RecordError     = "error"
	RecordUnchecked = "unchecked"
)

// Record purposes.
const (
	PurposeDKIM       = "dkim"
	PurposeSPF        = "spf"
	PurposeDMARC      = "dmarc"
	PurposeReturnPath = "return_path"
)

// DNSRecord is a record a sending domain needs, with what the last
// verification found for it.
type DNSRecord struct {
	// Purpose is PurposeDKIM, PurposeSPF, PurposeDMARC or PurposeReturnPath.
	Purpose string
	// Type is TXT or MX.
	Type string
	// Name is the owner name, without a trailing dot.
	Name string
	// Value is what to publish; for MX "preference host".
	Value string
	// Required records decide verification: the DKIM record of the key
	// that signs (or is to sign first).
	Required bool
	// Status is one of the Record* statuses.
	Status string
	// Found is what the lookup found, for missing and wrong records.
	Found []string
	// Note says why the record matters or what to change.
	Note string
	// selector is the DKIM key's, for recording the key's check.
	selector string
}

// DomainsConfig configures Domains.
type DomainsConfig struct {
	// KEK seals new private keys and opens stored ones. Without it,
	// adding a domain or a key fails with ErrNoKeyEncryptionKey.
	KEK *keyenc.KEK
	// Resolver looks records up for Verify. Defaults to net.DefaultResolver.
	Resolver DomainResolver
	// BounceDomain is the domain of the envelope senders (the return
	// path), whose MX and SPF records are suggested. Empty when bounces
	// are not received. Defaults to "".
	BounceDomain string
	// Hostname is this host's name, suggested in SPF and as the bounce
	// domain's MX. Defaults to hostname.Default() through Config.
	Hostname string
	// KeyGrace is how long a replaced key stays published. Defaults to
	// DefaultDKIMKeyGrace.
	KeyGrace time.Duration
	// Now is the clock, for selectors and key states. Defaults to
	// time.Now.
	Now func() time.Time
}

// Domains manages the sending domains of projects and their DKIM keys: the
// API and the command line share it.
type Domains struct {
	cfg   DomainsConfig
	store *db.DB
}

// NewDomains returns a Domains storing into store.
func NewDomains(store *db.DB, cfg DomainsConfig) *Domains {
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.KeyGrace == 0 {
		cfg.KeyGrace = DefaultDKIMKeyGrace
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.BounceDomain = strings.TrimSuffix(strings.ToLower(cfg.BounceDomain), ".")
	return &Domains{cfg: cfg, store: store}
}

// AddDomainParams is a domain to add.
type AddDomainParams struct {
	// Domain is the domain of the From addresses, e.g. example.com.
	Domain string
	// KeyType is message.DKIMRSA (the default) or message.DKIMEd25519.
	KeyType string
	// Selector defaults to "ph" and today's date.
	Selector string
}

// selectorRE is the selector grammar this service accepts: one DNS label
// (RFC 6376 section 3.1 allows several; one is all anyone needs), in the
// lowercase the database keeps.
var selectorRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// NormalizeDomainName returns name as domains are stored: lowercase
// A-labels, no trailing dot. It refuses address literals and names
// message.NormalizeMailbox would refuse in an address.
func NormalizeDomainName(name string) (string, error) {
	name = strings.TrimSuffix(strings.TrimSpace(name), ".")
	if name == "" {
		return "", errors.New("is required")
	}
	if strings.HasPrefix(name, "[") || strings.ContainsAny(name, "@ ") {
		return "", errors.New("must be a domain name such as example.com")
	}
	_, domain, err := message.NormalizeMailbox("postmaster@" + name)
	if err != nil {
		_, reason, _ := strings.Cut(err.Error(), ": ")
		if reason == "" {
			reason = err.Error()
		}
		return "", fmt.Errorf("is not a valid domain name: %s", reason)
	}
	return domain, nil
}

// Add adds a domain to the project with a new key. Errors about p are
// invalid-argument errors naming domain, key_type or selector; a domain the
// project has already is db.ErrAlreadyExists.
func (m *Domains) Add(ctx context.Context, projectID uuid.UUID, p AddDomainParams) (db.Domain, error) {
	var v violations
	name, err := NormalizeDomainName(p.Domain)
	if err != nil {
		v.add("domain", "%v", err)
	}
	keyType := checkKeyType(&v, p.KeyType, message.DKIMRSA)
	selector := p.Selector
	if selector == "" {
		selector = m.defaultSelector(nil)
	}
	checkSelector(&v, selector)
	if err := v.err(); err != nil {
		return db.Domain{}, err
	}
	key, err := m.newKey(keyType, selector)
	if err != nil {
		return db.Domain{}, err
	}
	d, err := m.store.CreateDomain(ctx, db.NewDomainParams{ProjectID: projectID, Name: name, Key: key})
	if err != nil {
		return db.Domain{}, fmt.Errorf("add domain: %w", err)
	}
	return d, nil
}

// Rotate adds a new key to a domain of the project; the current key signs
// until Verify finds the new key's record. keyType defaults to the newest
// key's type, selector to "ph" and today's date (made unique).
func (m *Domains) Rotate(ctx context.Context, projectID, id uuid.UUID, keyType, selector string) (db.Domain, error) {
	d, err := m.store.GetDomain(ctx, projectID, id)
	if err != nil {
		return db.Domain{}, fmt.Errorf("rotate key: %w", err)
	}
	current := message.DKIMRSA
	if len(d.Keys) > 0 {
		current = d.Keys[0].Algorithm
	}
	var v violations
	keyType = checkKeyType(&v, keyType, current)
	if selector == "" {
		selector = m.defaultSelector(d.Keys)
	}
	checkSelector(&v, selector)
	if err := v.err(); err != nil {
		return db.Domain{}, err
	}
	key, err := m.newKey(keyType, selector)
	if err != nil {
		return db.Domain{}, err
	}
	d, err = m.store.AddDomainKey(ctx, projectID, id, key)
	if err != nil {
		return db.Domain{}, fmt.Errorf("rotate key: %w", err)
	}
	return d, nil
}

func checkKeyType(v *violations, keyType, def string) string {
	switch keyType {
	case "":
		return def
	case message.DKIMRSA, message.DKIMEd25519:
		return keyType
	default:
		v.add("key_type", "must be rsa or ed25519, got %q", keyType)
		return ""
	}
}

func checkSelector(v *violations, selector string) {
	if !selectorRE.MatchString(selector) {
		v.add("selector", "must be 1 to 63 lowercase letters, digits or '-', starting with a letter or digit")
	}
}

// defaultSelector is "ph" and today's date (UTC), with "-2", "-3"... when a
// key of the domain already has it: a new selector for every key, so a
// rotation never replaces a record that mail in flight is verified with.
func (m *Domains) defaultSelector(keys []db.DomainKey) string {
	base := "ph" + m.cfg.Now().UTC().Format("20060102")
	taken := func(s string) bool {
		return slices.ContainsFunc(keys, func(k db.DomainKey) bool { return k.Selector == s })
	}
	s := base
	for i := 2; taken(s); i++ {
		s = fmt.Sprintf("%s-%d", base, i)
	}
	return s
}

// newKey makes a key pair and seals its private half under the KEK, bound
// to the new row's id.
func (m *Domains) newKey(keyType, selector string) (db.NewDomainKey, error) {
	if m.cfg.KEK == nil {
		return db.NewDomainKey{}, ErrNoKeyEncryptionKey
	}
	id, err := uuid.NewV7()
	if err != nil {
		return db.NewDomainKey{}, fmt.Errorf("new key id: %w", err)
	}
	der, pub, err := message.GenerateDKIMKey(keyType)
	if err != nil {
		return db.NewDomainKey{}, err
	}
	sealed := m.cfg.KEK.Seal(der, id.String())
	clear(der)
	return db.NewDomainKey{
		ID: id, Selector: selector, Algorithm: keyType, PublicKey: pub,
		PrivateKeyEnc: sealed, KEKID: m.cfg.KEK.ID(),
	}, nil
}

// recordCheck is what a verification found for one record, kept in the
// domain's last_check.
type recordCheck struct {
	Status string   `json:"status"`
	Found  []string `json:"found,omitempty"`
}

// checkKey names a record in last_check.
func checkKey(r DNSRecord) string { return r.Purpose + " " + r.Type + " " + r.Name }

// Records lists the records d needs, with the results of its last check.
func (m *Domains) Records(d db.Domain) []DNSRecord {
	var last map[string]recordCheck
	_ = json.Unmarshal(d.LastCheck, &last) // "{}" before any check
	recs := m.records(d)
	for i := range recs {
		if c, ok := last[checkKey(recs[i])]; ok && recs[i].Status == "" {
			recs[i].Status, recs[i].Found = c.Status, c.Found
		}
		if recs[i].Status == "" {
			recs[i].Status = RecordUnchecked
		}
	}
	return recs
}

// records lists the records d needs (RFC 6376 section 3.6.2.1 for DKIM,
// RFC 7208 for SPF, RFC 7489 section 6.1 for DMARC), without statuses.
func (m *Domains) records(d db.Domain) []DNSRecord {
	var out []DNSRecord
	_, hasActive := d.ActiveKey()
	for _, k := range d.Keys {
		r := DNSRecord{
			Purpose:  PurposeDKIM,
			Type:     "TXT",
			Name:     k.Selector + "._domainkey." + d.Name,
			Value:    message.DKIMRecord(k.Algorithm, k.PublicKey),
			selector: k.Selector,
		}
		switch k.State {
		case db.KeyActive:
			r.Required = true
			r.Note = "The key that signs this domain's mail."
		case db.KeyPending:
			r.Required = !hasActive
			r.Note = "A new key: it signs once a verification finds this record."
		case db.KeyRetiring:
			r.Note = "A replaced key: keep this record until " + k.RetireAfter.UTC().Format(time.RFC3339) +
				" so that mail it signed still verifies."
		default: // retired: no longer needed in DNS
			continue
		}
		out = append(out, r)
	}

	host := m.cfg.Hostname
	spfName := d.Name
	spfNote := "SPF (RFC 7208) for the envelope sender, which is the From address while no bounce domain is configured. " +
		"Merge it into an existing v=spf1 record; a name may have only one. It must cover the addresses this server sends from."
	if m.cfg.BounceDomain != "" {
		spfName = m.cfg.BounceDomain
		spfNote = "SPF (RFC 7208) is checked against the envelope sender, which is at the bounce domain. " +
			"It must cover the addresses this server sends from. DMARC alignment comes from the DKIM signature " +
			"unless the bounce domain is a subdomain of " + d.Name + "."
	}
	out = append(out, DNSRecord{
		Purpose: PurposeSPF, Type: "TXT", Name: spfName,
		Value: "v=spf1 a:" + host + " ~all", Note: spfNote,
	})
	out = append(out, DNSRecord{
		Purpose: PurposeDMARC, Type: "TXT", Name: "_dmarc." + d.Name,
		Value: "v=DMARC1; p=none; rua=mailto:dmarc-reports@" + d.Name,
		Note: "DMARC (RFC 7489): start with p=none and read the aggregate reports sent to rua; " +
			"move to quarantine or reject once they show only your own mail failing nothing. " +
			"A record at the organizational domain also applies.",
	})
	if m.cfg.BounceDomain != "" {
		out = append(out, DNSRecord{
			Purpose: PurposeReturnPath, Type: "MX", Name: m.cfg.BounceDomain,
			Value: "10 " + host,
			Note:  "Bounces are sent to the envelope sender at the bounce domain; its MX must reach this server's bounce listener.",
		})
	} else {
		out = append(out, DNSRecord{
			Purpose: PurposeReturnPath, Type: "MX", Name: d.Name, Status: RecordUnchecked,
			Note: "No bounce domain is configured (--bounce-domain): mail goes out with the From address as envelope sender, " +
				"so bounces reach the From domain's own mail server and are not recorded here. " +
				"Configure a bounce domain and point its MX at this server to record them.",
		})
	}
	return out
}

// Verify looks up d's records, records what it found and returns the
// domain afterwards with its records. See db.RecordDomainCheck for what
// changes.
func (m *Domains) Verify(ctx context.Context, projectID, id uuid.UUID) (db.Domain, error) {
	d, err := m.store.GetDomain(ctx, projectID, id)
	if err != nil {
		return db.Domain{}, fmt.Errorf("verify domain: %w", err)
	}
	lookupCtx, cancel := context.WithTimeout(ctx, domainCheckTimeout)
	defer cancel()
	results := make(map[string]recordCheck)
	keys := make(map[string]db.KeyCheck)
	for _, r := range m.records(d) {
		if r.Status == RecordUnchecked {
			continue
		}
		c := m.check(lookupCtx, r)
		results[checkKey(r)] = c
		if r.Purpose == PurposeDKIM {
			switch c.Status {
			case RecordOK:
				keys[r.selector] = db.KeyFound
			case RecordMissing, RecordWrong:
				keys[r.selector] = db.KeyNotFound
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return db.Domain{}, err
	}
	js, err := json.Marshal(results)
	if err != nil {
		return db.Domain{}, fmt.Errorf("verify domain: encode results: %w", err)
	}
	d, err = m.store.RecordDomainCheck(ctx, db.DomainCheckParams{
		ProjectID: projectID, DomainID: id, Keys: keys, Result: js,
		Grace: m.cfg.KeyGrace, Now: m.cfg.Now(),
	})
	if err != nil {
		return db.Domain{}, fmt.Errorf("verify domain: %w", err)
	}
	return d, nil
}

// check looks r up and compares what it finds with r.Value.
func (m *Domains) check(ctx context.Context, r DNSRecord) recordCheck {
	// The trailing dot keeps the system resolver from trying search
	// domains.
	fqdn := r.Name + "."
	if r.Type == "MX" {
		mxs, err := m.cfg.Resolver.LookupMX(ctx, fqdn)
		if c, failed := lookupFailed(err); failed {
			return c
		}
		_, want, _ := strings.Cut(r.Value, " ")
		var found []string
		ok := false
		for _, mx := range mxs {
			h := strings.TrimSuffix(strings.ToLower(mx.Host), ".")
			found = append(found, fmt.Sprintf("%d %s", mx.Pref, h))
			ok = ok || h == strings.ToLower(want)
		}
		switch {
		case len(found) == 0:
			return recordCheck{Status: RecordMissing}
		case !ok:
			return recordCheck{Status: RecordWrong, Found: found}
		}
		return recordCheck{Status: RecordOK}
	}
	txts, err := m.cfg.Resolver.LookupTXT(ctx, fqdn)
	if c, failed := lookupFailed(err); failed {
		return c
	}
	switch r.Purpose {
	case PurposeDKIM:
		return checkDKIMRecord(r.Value, txts)
	case PurposeSPF:
		return checkVersioned(txts, "v=spf1", func(rec string) bool {
			_, mech, _ := strings.Cut(r.Value, " ")
			mech, _, _ = strings.Cut(mech, " ")
			return slices.Contains(strings.Fields(strings.ToLower(rec)), strings.ToLower(mech))
		})
	default: // DMARC: any policy will do
		return checkVersioned(txts, "v=DMARC1", func(string) bool { return true })
	}
}

// lookupFailed turns a lookup error into a result: a name without records
// (NXDOMAIN or no data) is missing, anything else an error.
func lookupFailed(err error) (recordCheck, bool) {
	if err == nil {
		return recordCheck{}, false
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
		return recordCheck{Status: RecordMissing}, true
	}
	return recordCheck{Status: RecordError, Found: []string{err.Error()}}, true
}

// checkDKIMRecord compares the TXT records at a key's name with the record
// wanted: the p= tags must be equal (whitespace within them is folding,
// RFC 6376 section 3.6.1) and the k= tags too (rsa when absent). More than
// one record at the name is wrong: which one a verifier uses is not
// defined (RFC 6376 section 3.6.2.2).
func checkDKIMRecord(want string, txts []string) recordCheck {
	if len(txts) == 0 {
		return recordCheck{Status: RecordMissing}
	}
	wantTags := dkimTags(want)
	if len(txts) == 1 {
		got := dkimTags(txts[0])
		k := got["k"]
		if k == "" {
			k = message.DKIMRSA
		}
		if got["p"] == wantTags["p"] && k == wantTags["k"] {
			return recordCheck{Status: RecordOK}
		}
	}
	return recordCheck{Status: RecordWrong, Found: txts}
}

// dkimTags parses a tag=value list (RFC 6376 section 3.2), with the
// whitespace removed from values.
func dkimTags(rec string) map[string]string {
	tags := make(map[string]string)
	for part := range strings.SplitSeq(rec, ";") {
		name, value, ok := strings.Cut(part, "=")
		if !ok {
			continue
		}
		tags[strings.TrimSpace(name)] = strings.Join(strings.Fields(value), "")
	}
	return tags
}

// checkVersioned looks for the one record starting with version (SPF and
// DMARC allow one each: RFC 7208 section 4.5, RFC 7489 section 6.6.3) and
// reports it ok when good accepts it.
func checkVersioned(txts []string, version string, good func(string) bool) recordCheck {
	var recs []string
	for _, t := range txts {
		first, _, _ := strings.Cut(t, ";")
		first, _, _ = strings.Cut(strings.TrimSpace(first), " ")
		if strings.EqualFold(first, version) {
			recs = append(recs, t)
		}
	}
	switch {
	case len(recs) == 0:
		return recordCheck{Status: RecordMissing, Found: txts}
	case len(recs) > 1 || !good(recs[0]):
		return recordCheck{Status: RecordWrong, Found: recs}
	}
	return recordCheck{Status: RecordOK}
}
