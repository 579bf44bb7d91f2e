package identitytest

import (
	"crypto/x509"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

const id = "spiffe://mesh.test/ns/a"

func TestDefaultsAreAValidSVID(t *testing.T) {
	ca := NewCA(t, "mesh.test")
	svid := ca.SVID(t, id)
	// x509svid.ParseRaw applies go-spiffe's own SVID rules to the result.
	certs, key, err := svid.MarshalRaw()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := x509svid.ParseRaw(certs, key)
	if err != nil {
		t.Fatalf("default SVID is not a valid SVID: %v", err)
	}
	if got := parsed.ID.String(); got != id {
		t.Errorf("ID = %s, want %s", got, id)
	}
	leaf := parsed.Certificates[0]
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage = %v", leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 {
		t.Errorf("ExtKeyUsage = %v, want serverAuth+clientAuth", leaf.ExtKeyUsage)
	}
	if _, _, err := x509svid.Verify(parsed.Certificates, ca.Bundle()); err != nil {
		t.Errorf("verify against own bundle: %v", err)
	}
	if _, _, err := x509svid.Verify(parsed.Certificates, NewCA(t, "mesh.test").Bundle()); err == nil {
		t.Error("verified against another CA's bundle")
	}
}

func TestIntermediateChain(t *testing.T) {
	root := NewCA(t, "mesh.test")
	inter := root.NewIntermediate(t).NewIntermediate(t)
	svid := inter.SVID(t, id)
	if len(svid.Certificates) != 3 {
		t.Fatalf("chain length %d, want 3", len(svid.Certificates))
	}
	if _, _, err := x509svid.Verify(svid.Certificates, inter.Bundle()); err != nil {
		t.Errorf("verify through two intermediates: %v", err)
	}
	short := inter.SVID(t, id, OmitChain())
	if _, _, err := x509svid.Verify(short.Certificates, root.Bundle()); err == nil {
		t.Error("leaf without its intermediates verified")
	}
}

func TestHostileOptions(t *testing.T) {
	ca := NewCA(t, "mesh.test")
	tests := []struct {
		name    string
		opts    []LeafOption
		wantErr string
	}{
		{"expired", []LeafOption{Expired()}, "expired"},
		{"not yet valid", []LeafOption{NotYetValid()}, "not yet valid"},
		{"no URI", []LeafOption{URIs()}, "no URI SAN"},
		{"two URIs", []LeafOption{URIs(id, "spiffe://mesh.test/b")}, "more than one URI SAN"},
		{"non-SPIFFE URI", []LeafOption{URIs("https://x")}, "scheme"},
		{"CA as leaf", []LeafOption{AsCA()}, "CA flag"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svid := ca.SVID(t, id, tt.opts...)
			_, _, err := x509svid.Verify(svid.Certificates, ca.Bundle())
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Verify error = %v, want it to mention %q", err, tt.wantErr)
			}
		})
	}
	if c := ca.TLSCertificate(t, id, KeyUsage(x509.KeyUsageKeyEncipherment), ExtKeyUsage(x509.ExtKeyUsageServerAuth)); c.Leaf.KeyUsage != x509.KeyUsageKeyEncipherment || len(c.Leaf.ExtKeyUsage) != 1 {
		t.Errorf("KeyUsage/ExtKeyUsage options not applied: %v %v", c.Leaf.KeyUsage, c.Leaf.ExtKeyUsage)
	}
	if c := ca.TLSCertificate(t, id, ExtKeyUsage()); len(c.Leaf.ExtKeyUsage) != 0 {
		t.Errorf("ExtKeyUsage() left %v", c.Leaf.ExtKeyUsage)
	}
}

func TestSourceSwapsConcurrently(t *testing.T) {
	ca := NewCA(t, "mesh.test")
	src := NewSource(ca.SVID(t, id), ca.Bundle())
	next := NewCA(t, "mesh.test")
	svids := []*x509svid.SVID{ca.SVID(t, id), next.SVID(t, id)}
	td := spiffeid.RequireTrustDomainFromString("mesh.test")

	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for j := range 200 {
				if i%2 == 0 {
					src.SetSVID(svids[j%2])
					src.SetBundle(next.Bundle())
					continue
				}
				if _, err := src.GetX509SVID(); err != nil {
					t.Error(err)
				}
				if _, err := src.GetX509BundleForTrustDomain(td); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()

	src.RemoveBundle(td)
	if _, err := src.GetX509BundleForTrustDomain(td); err == nil {
		t.Error("removed bundle still served")
	}
}
