package devca_test

import (
	"bytes"
	"crypto/x509"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"latch.dev/latch/identity/devca"
)

const partnerTD = "partner.test"

func newPartnerCA(t *testing.T) *devca.CA {
	t.Helper()
	ca, err := devca.New(partnerTD, devca.Options{Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	return ca
}

func federatedOf(c *workloadapi.X509Context) (*x509bundle.Bundle, bool) {
	return c.Bundles.Get(spiffeid.RequireTrustDomainFromString(partnerTD))
}

func sameCAs(a []*x509.Certificate, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i].Raw, b[i].Raw) {
			return false
		}
	}
	return true
}

// TestFederatedBundleServed: a CA federating with another serves that CA's
// bundle to its workloads as federated, in the X.509-SVID stream and in the
// bundles stream, follows the other CA's rollover, and stops serving it when
// the federation is removed; its own bundle is never touched.
func TestFederatedBundleServed(t *testing.T) {
	ca, partner := newCA(t, devca.Options{}), newPartnerCA(t)
	addr := addWorkload(t, ca, "spiffe://"+td+"/ns/server")
	w := watch(t, addr)
	first := w.next(t)
	if _, ok := federatedOf(first); ok {
		t.Fatal("a federated bundle before any federation")
	}
	own := bundleOf(t, first).X509Authorities()

	if err := ca.FederateWith(partner); err != nil {
		t.Fatal(err)
	}
	w.until(t, func(c *workloadapi.X509Context) bool {
		b, ok := federatedOf(c)
		return ok && sameCAs(b.X509Authorities(), partner.Bundle().X509Authorities())
	}, nil)

	// The bundles stream carries it too.
	ctx := testContext(t)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	set, err := client.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b, ok := set.Get(spiffeid.RequireTrustDomainFromString(partnerTD)); !ok || !sameCAs(b.X509Authorities(), partner.Bundle().X509Authorities()) {
		t.Errorf("FetchX509Bundles: federated bundle %v", b)
	}

	// A rollover of the partner reaches the federating CA's workloads.
	if err := partner.RollCA(); err != nil {
		t.Fatal(err)
	}
	rolled := partner.Bundle().X509Authorities()
	if len(rolled) != 2 {
		t.Fatalf("partner bundle after RollCA holds %d CAs", len(rolled))
	}
	w.until(t, func(c *workloadapi.X509Context) bool {
		b, ok := federatedOf(c)
		return ok && sameCAs(b.X509Authorities(), rolled)
	}, nil)

	ca.RemoveFederatedBundle(spiffeid.RequireTrustDomainFromString(partnerTD))
	last := w.until(t, func(c *workloadapi.X509Context) bool { _, ok := federatedOf(c); return !ok }, nil)
	if !sameCAs(bundleOf(t, last).X509Authorities(), own) {
		t.Error("the CA's own bundle changed with the federation")
	}
	if got := ca.FederatedTrustDomains(); len(got) != 0 {
		t.Errorf("FederatedTrustDomains after removal = %v", got)
	}
	// Removing stopped the following: a later rollover does not bring it back.
	if err := partner.ActivateCA(); err != nil {
		t.Fatal(err)
	}
	if got := ca.FederatedTrustDomains(); len(got) != 0 {
		t.Errorf("federation came back after removal: %v", got)
	}
}

// TestSetFederatedBundle: any bundle can be served, even one holding the
// CA's own certificate (for the consumers' refusal of it to be tested), but
// not one claiming the CA's own trust domain.
func TestSetFederatedBundle(t *testing.T) {
	ca := newCA(t, devca.Options{})
	w := watch(t, addWorkload(t, ca, "spiffe://"+td+"/ns/server"))
	w.next(t)
	if err := ca.SetFederatedBundle(ca.Bundle()); err == nil {
		t.Error("a federated bundle for the CA's own trust domain was accepted")
	}
	own := ca.Bundle().X509Authorities()
	hostile := x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(partnerTD), own)
	if err := ca.SetFederatedBundle(hostile); err != nil {
		t.Fatal(err)
	}
	w.until(t, func(c *workloadapi.X509Context) bool {
		b, ok := federatedOf(c)
		return ok && sameCAs(b.X509Authorities(), own)
	}, nil)
}
