package service_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/posthaste/posthaste/db"
	"github.com/posthaste/posthaste/internal/keyenc"
	"github.com/posthaste/posthaste/internal/testenv"
	posthastev1 "github.com/posthaste/posthaste/proto/posthaste/v1"
	"github.com/posthaste/posthaste/service"
)

// domainsEnv is a service that refuses unverified From domains, verifies
// against a loopback DNS server, and an admin key.
type domainsEnv struct {
	*env
	dns   *testenv.DNSServer
	kek   []byte
	admin context.Context
}

func setupDomains(t *testing.T, withKEK bool) *domainsEnv {
	t.Helper()
	d := &domainsEnv{dns: testenv.StartDNS(t)}
	cfg := service.Config{DomainResolver: d.dns.Resolver(), BounceDomain: "bounces.posthaste.test"}
	if withKEK {
		var err error
		if d.kek, err = keyenc.Parse(keyenc.Generate()); err != nil {
			t.Fatal(err)
		}
		cfg.KeyEncryptionKey = d.kek
	}
	d.env = setupEnv(t, cfg)
	admin, _ := createScopedKey(t, d.store, uuid.Nil, "admin", db.ScopeAdmin)
	d.admin = withKey(t.Context(), admin)
	return d
}

// publish serves the domain's DKIM records of keys in state.
func (d *domainsEnv) publish(dom *posthastev1.Domain, selector string) {
	for _, r := range dom.GetRecords() {
		if r.GetPurpose() == service.PurposeDKIM && strings.HasPrefix(r.GetName(), selector+".") {
			d.dns.AddTXT(r.GetName(), r.GetValue())
		}
	}
}

func record(dom *posthastev1.Domain, purpose string) *posthastev1.DnsRecord {
	for _, r := range dom.GetRecords() {
		if r.GetPurpose() == purpose {
			return r
		}
	}
	return nil
}

// verifySignature checks raw's DKIM signature with keys looked up in the
// test DNS server and returns the verification.
func (d *domainsEnv) verifySignature(t *testing.T, raw []byte) *dkim.Verification {
	t.Helper()
	r := d.dns.Resolver()
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(raw), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) { return r.LookupTXT(context.Background(), name+".") },
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 1 {
		t.Fatalf("%d signatures, want 1", len(vs))
	}
	return vs[0]
}

func (d *domainsEnv) storedRaw(t *testing.T, id string) []byte {
	t.Helper()
	var raw []byte
	if err := d.raw.QueryRow(t.Context(), `SELECT raw FROM messages WHERE id = $1`, id).Scan(&raw); err != nil {
		t.Fatal(err)
	}
	return raw
}

func TestDomainsCRUD(t *testing.T) {
	t.Parallel()
	d := setupDomains(t, true)
	ctx := d.admin

	for _, bad := range []string{"", "not a domain", "localhost", "[192.0.2.1]", "a@example.test", "-x.example.test"} {
		_, err := d.client.CreateDomain(ctx, &posthastev1.CreateDomainRequest{Domain: bad})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(strings.Join(violations(err), ","), "domain") {
			t.Errorf("domain %q: %v, want InvalidArgument naming domain", bad, err)
		}
	}
	if _, err := d.client.CreateDomain(ctx, &posthastev1.CreateDomainRequest{Domain: "ok.test", KeyType: "dsa"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("key_type dsa: %v", err)
	}
	// A send key may not manage domains.
	if _, err := d.client.CreateDomain(d.ctx(t), &posthastev1.CreateDomainRequest{Domain: "shop.test"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("send key: %v, want PermissionDenied", err)
	}

	dom, err := d.client.CreateDomain(ctx, &posthastev1.CreateDomainRequest{Domain: "Shop.TEST.", KeyType: "ed25519", Selector: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if dom.GetName() != "shop.test" || dom.GetStatus() != service.DomainPending || len(dom.GetDkimKeys()) != 1 {
		t.Fatalf("created %v", dom)
	}
	dk := record(dom, service.PurposeDKIM)
	if dk.GetName() != "s1._domainkey.shop.test" || !strings.HasPrefix(dk.GetValue(), "v=DKIM1; k=ed25519; p=") || !dk.GetRequired() || dk.GetStatus() != service.RecordUnchecked {
		t.Errorf("DKIM record %v", dk)
	}
	if r := record(dom, service.PurposeDMARC); r.GetName() != "_dmarc.shop.test" || !strings.HasPrefix(r.GetValue(), "v=DMARC1; p=none; rua=mailto:") {
		t.Errorf("DMARC record %v", r)
	}
	if r := record(dom, service.PurposeReturnPath); r.GetType() != "MX" || r.GetName() != "bounces.posthaste.test" || r.GetValue() != "10 mta.posthaste.test" {
		t.Errorf("return-path record %v", r)
	}
	if r := record(dom, service.PurposeSPF); r.GetName() != "bounces.posthaste.test" || r.GetValue() != "v=spf1 a:mta.posthaste.test ~all" {
		t.Errorf("SPF record %v", r)
	}
	// The default selector is ph and the date.
	rsa, err := d.client.CreateDomain(ctx, &posthastev1.CreateDomainRequest{Domain: "rsa.test"})
	if err != nil {
		t.Fatal(err)
	}
	if k := rsa.GetDkimKeys()[0]; k.GetKeyType() != "rsa" || !strings.HasPrefix(k.GetSelector(), "ph20") {
		t.Errorf("default key %v", k)
	}

	_, err = d.client.CreateDomain(ctx, &posthastev1.CreateDomainRequest{Domain: "shop.test"})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("duplicate: %v, want AlreadyExists", err)
	}

	// Another project's admin sees nothing of this one's domains.
	otherKey, _ := otherProject(t, d.env, "other", db.ScopeAdmin)
	other := withKey(t.Context(), otherKey)
	if _, err := d.client.GetDomain(other, &posthastev1.GetDomainRequest{Id: dom.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("other project's get: %v, want NotFound", err)
	}
	if _, err := d.client.VerifyDomain(other, &posthastev1.VerifyDomainRequest{Id: dom.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("other project's verify: %v, want NotFound", err)
	}
	if _, err := d.client.DeleteDomain(other, &posthastev1.DeleteDomainRequest{Id: dom.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("other project's delete: %v, want NotFound", err)
	}
	if l, err := d.client.ListDomains(other, &posthastev1.ListDomainsRequest{}); err != nil || len(l.GetDomains()) != 0 {
		t.Errorf("other project's list: %v, %v", l, err)
	}
	l, err := d.client.ListDomains(ctx, &posthastev1.ListDomainsRequest{})
	if err != nil || len(l.GetDomains()) != 2 || l.GetDomains()[0].GetName() != "rsa.test" {
		t.Fatalf("list: %v, %v", l, err)
	}

	// The private key is stored sealed: not in the clear, and only the
	// configured key-encryption key opens it.
	var sealed []byte
	var keyID uuid.UUID
	if err := d.raw.QueryRow(t.Context(), `SELECT id, private_key_enc FROM domain_keys WHERE selector = 's1'`).Scan(&keyID, &sealed); err != nil {
		t.Fatal(err)
	}
	kek, err := keyenc.New(d.kek)
	if err != nil {
		t.Fatal(err)
	}
	der, err := kek.Open(sealed, keyID.String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := x509.ParsePKCS8PrivateKey(der); err != nil {
		t.Fatalf("opened key does not parse: %v", err)
	}
	if bytes.Contains(sealed, der) || bytes.Contains(sealed, der[len(der)-32:]) || bytes.Contains(sealed, []byte("PRIVATE KEY")) {
		t.Error("the stored bytes hold the private key")
	}

	if _, err := d.client.DeleteDomain(ctx, &posthastev1.DeleteDomainRequest{Id: dom.GetId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.client.GetDomain(ctx, &posthastev1.GetDomainRequest{Id: dom.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("get after delete: %v, want NotFound", err)
	}
}

func TestDomainsWithoutKEK(t *testing.T) {
	t.Parallel()
	d := setupDomains(t, false)
	_, err := d.client.CreateDomain(d.admin, &posthastev1.CreateDomainRequest{Domain: "shop.test"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "key-encryption key") {
		t.Errorf("create without KEK: %v, want FailedPrecondition about the key-encryption key", err)
	}
}

func TestVerifyReportsEachRecord(t *testing.T) {
	t.Parallel()
	d := setupDomains(t, true)
	dom, err := d.client.CreateDomain(d.admin, &posthastev1.CreateDomainRequest{Domain: "shop.test", KeyType: "ed25519", Selector: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	// Nothing published: DKIM missing, not verified.
	got, err := d.client.VerifyDomain(d.admin, &posthastev1.VerifyDomainRequest{Id: dom.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetStatus() != service.DomainPending || record(got, service.PurposeDKIM).GetStatus() != service.RecordMissing {
		t.Fatalf("nothing published: %v", got)
	}

	// A DKIM record with another key is wrong; SPF without our host is
	// wrong; two DMARC records are wrong; the bounce MX is right.
	d.dns.AddTXT("s1._domainkey.shop.test", "v=DKIM1; k=ed25519; p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	d.dns.AddTXT("bounces.posthaste.test", "v=spf1 ip4:192.0.2.1 -all")
	d.dns.AddTXT("_dmarc.shop.test", "v=DMARC1; p=none")
	d.dns.AddTXT("_dmarc.shop.test", "v=DMARC1; p=reject")
	d.dns.AddMX("bounces.posthaste.test", "mta.posthaste.test", 10)
	got, err = d.client.VerifyDomain(d.admin, &posthastev1.VerifyDomainRequest{Id: dom.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		service.PurposeDKIM: service.RecordWrong, service.PurposeSPF: service.RecordWrong,
		service.PurposeDMARC: service.RecordWrong, service.PurposeReturnPath: service.RecordOK,
	}
	for p, st := range want {
		if r := record(got, p); r.GetStatus() != st {
			t.Errorf("%s: %s (found %v), want %s", p, r.GetStatus(), r.GetFound(), st)
		}
	}
	if got.GetStatus() != service.DomainPending {
		t.Errorf("verified with a wrong DKIM record")
	}

	// The right records: verified; the results are kept for GetDomain.
	d2 := setupDomains(t, true)
	dom2, err := d2.client.CreateDomain(d2.admin, &posthastev1.CreateDomainRequest{Domain: "shop.test", Selector: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	d2.publish(dom2, "s1")
	d2.dns.AddTXT("bounces.posthaste.test", "v=spf1 a:mta.posthaste.test ~all")
	d2.dns.AddTXT("_dmarc.shop.test", "v=DMARC1; p=none")
	got, err = d2.client.VerifyDomain(d2.admin, &posthastev1.VerifyDomainRequest{Id: dom2.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetStatus() != service.DomainVerified || got.GetVerifiedAt() == nil {
		t.Fatalf("right records: %v", got)
	}
	want = map[string]string{
		service.PurposeDKIM: service.RecordOK, service.PurposeSPF: service.RecordOK,
		service.PurposeDMARC: service.RecordOK, service.PurposeReturnPath: service.RecordMissing,
	}
	again, err := d2.client.GetDomain(d2.admin, &posthastev1.GetDomainRequest{Id: dom2.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	for p, st := range want {
		if r := record(again, p); r.GetStatus() != st {
			t.Errorf("%s: %s, want %s", p, r.GetStatus(), st)
		}
	}
}

func TestUnverifiedDomainRefused(t *testing.T) {
	t.Parallel()
	d := setupDomains(t, true)
	req := validRequest() // from ada@example.test
	_, err := d.client.SendMessage(d.ctx(t), req)
	if status.Code(err) != codes.PermissionDenied || !strings.HasPrefix(status.Convert(err).Message(), "from: example.test") {
		t.Fatalf("unverified From: %v, want PermissionDenied naming from", err)
	}
	if info := errorInfo(err); info.GetReason() != service.ReasonDomainNotVerified || info.GetMetadata()["field"] != "from" {
		t.Errorf("error info %v", info)
	}
	raw := "From: ada@example.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhi\r\n"
	_, err = d.client.SendRawMessage(d.ctx(t), &posthastev1.SendRawMessageRequest{
		Raw: b64(raw), EnvelopeFrom: "ada@example.test", Recipients: []string{"bob@example.test"},
	})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("raw from an unverified domain: %v, want PermissionDenied", err)
	}
	batch, err := d.client.SendBatch(d.ctx(t), &posthastev1.SendBatchRequest{Messages: []*posthastev1.SendMessageRequest{req}})
	if err != nil {
		t.Fatal(err)
	}
	if e := batch.GetResults()[0].GetError(); e.GetCode() != 403 || e.GetReason() != service.ReasonDomainNotVerified ||
		!strings.HasPrefix(e.GetMessage(), "messages[0].from:") {
		t.Errorf("batch item: %v, want 403 naming messages[0].from", e)
	}
	// A domain added but not verified is refused too.
	if _, err := d.client.CreateDomain(d.admin, &posthastev1.CreateDomainRequest{Domain: "example.test", KeyType: "ed25519"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.client.SendMessage(d.ctx(t), req); status.Code(err) != codes.PermissionDenied {
		t.Errorf("added, unverified: %v, want PermissionDenied", err)
	}
	if m, r := d.counts(t); m != 0 || r != 0 {
		t.Errorf("stored %d messages, %d recipients; want none", m, r)
	}
}

// Signed mail verifies with the key published in DNS, from SendMessage,
// SendRawMessage (8-bit body converted first) and a subdomain, and across a
// key rotation; a changed body does not.
func TestSignedMessagesVerify(t *testing.T) {
	t.Parallel()
	d := setupDomains(t, true)
	dom, err := d.client.CreateDomain(d.admin, &posthastev1.CreateDomainRequest{Domain: "example.test", Selector: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	d.publish(dom, "s1")
	if v, err := d.client.VerifyDomain(d.admin, &posthastev1.VerifyDomainRequest{Id: dom.GetId()}); err != nil || v.GetStatus() != service.DomainVerified {
		t.Fatalf("verify: %v, %v", v, err)
	}

	resp, err := d.client.SendMessage(d.ctx(t), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	raw := d.storedRaw(t, resp.GetId())
	v := d.verifySignature(t, raw)
	if v.Err != nil || v.Domain != "example.test" {
		t.Fatalf("signature of a sent message: domain %q, %v", v.Domain, v.Err)
	}
	tampered := bytes.Replace(raw, []byte("Hello there."), []byte("Hello th3re."), 1)
	if bytes.Equal(tampered, raw) {
		t.Fatal("body not found to tamper with")
	}
	if v := d.verifySignature(t, tampered); v.Err == nil {
		t.Error("tampered body verified")
	}

	// A subdomain signs with its verified parent (relaxed alignment).
	sub := validRequest()
	sub.From.Address = "news@mail.example.test"
	resp, err = d.client.SendMessage(d.ctx(t), sub)
	if err != nil {
		t.Fatal(err)
	}
	if v := d.verifySignature(t, d.storedRaw(t, resp.GetId())); v.Err != nil || v.Domain != "example.test" {
		t.Errorf("subdomain: %q, %v", v.Domain, v.Err)
	}

	rawMsg := "From: Ada <ada@example.test>\r\nTo: bob@example.test\r\nSubject: raw\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n"
	resp, err = d.client.SendRawMessage(d.ctx(t), &posthastev1.SendRawMessageRequest{
		Raw: b64(rawMsg), EnvelopeFrom: "ada@example.test", Recipients: []string{"bob@example.test"},
	})
	if err != nil {
		t.Fatal(err)
	}
	stored := d.storedRaw(t, resp.GetId())
	if v := d.verifySignature(t, stored); v.Err != nil {
		t.Errorf("raw message: %v", v.Err)
	}
	for _, c := range stored {
		if c >= 0x80 {
			t.Error("signed raw message still has 8-bit content")
			break
		}
	}

	// Rotation: the old key signs until the new record verifies.
	rot, err := d.client.RotateDomainKey(d.admin, &posthastev1.RotateDomainKeyRequest{Id: dom.GetId(), Selector: "s2"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.client.RotateDomainKey(d.admin, &posthastev1.RotateDomainKeyRequest{Id: dom.GetId()}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second rotation while one is pending: %v, want FailedPrecondition", err)
	}
	resp, err = d.client.SendMessage(d.ctx(t), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	if s := selectorOf(d.storedRaw(t, resp.GetId())); s != "s1" {
		t.Errorf("signed with %q before the new record verified, want s1", s)
	}
	d.publish(rot, "s2")
	v2, err := d.client.VerifyDomain(d.admin, &posthastev1.VerifyDomainRequest{Id: dom.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, k := range v2.GetDkimKeys() {
		states[k.GetSelector()] = k.GetState()
	}
	if states["s2"] != db.KeyActive || states["s1"] != db.KeyRetiring {
		t.Errorf("key states after rotation: %v", states)
	}
	resp, err = d.client.SendMessage(d.ctx(t), validRequest())
	if err != nil {
		t.Fatal(err)
	}
	raw = d.storedRaw(t, resp.GetId())
	if s := selectorOf(raw); s != "s2" {
		t.Errorf("signed with %q after rotation, want s2", s)
	}
	if v := d.verifySignature(t, raw); v.Err != nil {
		t.Errorf("after rotation: %v", v.Err)
	}
}

// selectorOf returns the s= tag of raw's DKIM-Signature.
func selectorOf(raw []byte) string {
	sig, _, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
	for _, tag := range strings.Split(strings.ReplaceAll(string(sig), "\r\n", ""), ";") {
		if k, v, ok := strings.Cut(strings.TrimSpace(tag), "="); ok && k == "s" {
			return v
		}
	}
	return ""
}
