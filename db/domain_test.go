package db_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/posthaste/posthaste/db"
)

func newDomainKey(t *testing.T, selector string) db.NewDomainKey {
	t.Helper()
	return db.NewDomainKey{
		ID: newID(t), Selector: selector, Algorithm: db.KeyEd25519,
		PublicKey: "cHVibGlj", PrivateKeyEnc: []byte{1, 2, 3}, KEKID: "kek1",
	}
}

func TestDomains(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	shop, err := b.db.CreateProject(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	other, err := b.db.CreateProject(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}

	d, err := b.db.CreateDomain(ctx, db.NewDomainParams{ProjectID: shop.ID, Name: "example.test", Key: newDomainKey(t, "ph1")})
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "example.test" || d.VerifiedAt != nil || len(d.Keys) != 1 || d.Keys[0].State != db.KeyPending {
		t.Fatalf("created domain %+v", d)
	}
	if string(d.Keys[0].PrivateKeyEnc) != "\x01\x02\x03" || d.Keys[0].KEKID != "kek1" {
		t.Errorf("key read back %+v", d.Keys[0])
	}
	if _, err := b.db.CreateDomain(ctx, db.NewDomainParams{ProjectID: shop.ID, Name: "example.test", Key: newDomainKey(t, "ph1")}); !errors.Is(err, db.ErrAlreadyExists) {
		t.Errorf("duplicate domain: %v, want ErrAlreadyExists", err)
	}
	// Another project may add the same name; neither sees the other's.
	if _, err := b.db.CreateDomain(ctx, db.NewDomainParams{ProjectID: other.ID, Name: "example.test", Key: newDomainKey(t, "ph1")}); err != nil {
		t.Errorf("same name in another project: %v", err)
	}
	if _, err := b.db.GetDomain(ctx, other.ID, d.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("GetDomain from another project: %v, want ErrNotFound", err)
	}
	if err := b.db.DeleteDomain(ctx, other.ID, d.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("DeleteDomain from another project: %v, want ErrNotFound", err)
	}
	list, err := b.db.ListDomains(ctx, shop.ID)
	if err != nil || len(list) != 1 || list[0].ID != d.ID {
		t.Fatalf("ListDomains = %+v, %v", list, err)
	}

	// Not verified yet: nothing to sign with.
	if sd, err := b.db.SigningDomains(ctx, shop.ID); err != nil || len(sd) != 0 {
		t.Errorf("SigningDomains before verification = %+v, %v", sd, err)
	}

	// A failed lookup changes nothing; a found record verifies.
	t0 := time.Now().Truncate(time.Microsecond)
	d, err = b.db.RecordDomainCheck(ctx, db.DomainCheckParams{ProjectID: shop.ID, DomainID: d.ID, Keys: map[string]db.KeyCheck{"ph1": db.KeyUnknown}, Now: t0})
	if err != nil || d.VerifiedAt != nil || d.Keys[0].State != db.KeyPending || d.LastCheckedAt == nil {
		t.Fatalf("after failed lookup: %+v, %v", d, err)
	}
	d, err = b.db.RecordDomainCheck(ctx, db.DomainCheckParams{ProjectID: shop.ID, DomainID: d.ID,
		Keys: map[string]db.KeyCheck{"ph1": db.KeyFound}, Result: []byte(`{"ok":true}`), Now: t0})
	if err != nil || d.VerifiedAt == nil || d.Keys[0].State != db.KeyActive || d.Keys[0].VerifiedAt == nil {
		t.Fatalf("after found record: %+v, %v", d, err)
	}
	if string(d.LastCheck) != `{"ok": true}` {
		t.Errorf("LastCheck = %s", d.LastCheck)
	}
	sd, err := b.db.SigningDomains(ctx, shop.ID)
	if err != nil || len(sd) != 1 || sd[0].Key.Selector != "ph1" || string(sd[0].Key.PrivateKeyEnc) != "\x01\x02\x03" {
		t.Fatalf("SigningDomains = %+v, %v", sd, err)
	}

	// Rotation: a pending key does not sign until its record is found; a
	// second rotation meanwhile is refused.
	d, err = b.db.AddDomainKey(ctx, shop.ID, d.ID, newDomainKey(t, "ph2"))
	if err != nil || len(d.Keys) != 2 || d.Keys[0].Selector != "ph2" || d.Keys[0].State != db.KeyPending {
		t.Fatalf("AddDomainKey = %+v, %v", d, err)
	}
	if _, err := b.db.AddDomainKey(ctx, shop.ID, d.ID, newDomainKey(t, "ph3")); !errors.Is(err, db.ErrKeyPending) {
		t.Errorf("second pending key: %v, want ErrKeyPending", err)
	}
	if _, err := b.db.AddDomainKey(ctx, other.ID, d.ID, newDomainKey(t, "ph3")); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("AddDomainKey from another project: %v, want ErrNotFound", err)
	}
	t1 := t0.Add(time.Hour)
	d, err = b.db.RecordDomainCheck(ctx, db.DomainCheckParams{ProjectID: shop.ID, DomainID: d.ID,
		Keys: map[string]db.KeyCheck{"ph1": db.KeyFound, "ph2": db.KeyFound}, Grace: 24 * time.Hour, Now: t1})
	if err != nil {
		t.Fatal(err)
	}
	if d.Keys[0].State != db.KeyActive || d.Keys[1].State != db.KeyRetiring || d.Keys[1].RetireAfter == nil ||
		!d.Keys[1].RetireAfter.Equal(t1.Add(24*time.Hour)) {
		t.Fatalf("after rotation: %+v", d.Keys)
	}
	if !d.VerifiedAt.Equal(t0) {
		t.Errorf("VerifiedAt moved to %v, want the first verification %v", d.VerifiedAt, t0)
	}
	if sd, _ := b.db.SigningDomains(ctx, shop.ID); len(sd) != 1 || sd[0].Key.Selector != "ph2" {
		t.Errorf("signing key after rotation %+v, want ph2", sd)
	}
	// Past the grace period the old key is retired, but kept.
	d, err = b.db.RecordDomainCheck(ctx, db.DomainCheckParams{ProjectID: shop.ID, DomainID: d.ID,
		Keys: map[string]db.KeyCheck{"ph2": db.KeyFound}, Now: t1.Add(25 * time.Hour)})
	if err != nil || len(d.Keys) != 2 || d.Keys[1].State != db.KeyRetired {
		t.Fatalf("after grace: %+v, %v", d.Keys, err)
	}
	// The signing key's record gone: the domain is no longer verified.
	d, err = b.db.RecordDomainCheck(ctx, db.DomainCheckParams{ProjectID: shop.ID, DomainID: d.ID,
		Keys: map[string]db.KeyCheck{"ph2": db.KeyNotFound}})
	if err != nil || d.VerifiedAt != nil {
		t.Fatalf("after missing record: %+v, %v", d, err)
	}
	if sd, _ := b.db.SigningDomains(ctx, shop.ID); len(sd) != 0 {
		t.Errorf("SigningDomains of an unverified domain = %+v", sd)
	}

	if err := b.db.DeleteDomain(ctx, shop.ID, d.ID); err != nil {
		t.Fatal(err)
	}
	var keys int
	if err := b.raw.QueryRow(ctx, `SELECT count(*) FROM domain_keys WHERE domain_id = $1`, d.ID).Scan(&keys); err != nil || keys != 0 {
		t.Errorf("keys left after delete: %d, %v", keys, err)
	}
	if _, err := b.db.GetDomain(ctx, shop.ID, d.ID); !errors.Is(err, db.ErrNotFound) {
		t.Errorf("GetDomain after delete: %v", err)
	}
}
