package identity_test

import (
	"crypto/tls"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

const (
	partnerTD     = "partner.test"
	partnerClient = "spiffe://partner.test/ns/client"
	partnerServer = "spiffe://partner.test/ns/server"
)

var partner = spiffeid.RequireTrustDomainFromString(partnerTD)

// federatedWorld is the local trust domain's world plus a foreign trust
// domain, partner.test, whose bundle the local workloads hold as federated
// (and a third one, held too, that nobody federates with).
type federatedWorld struct {
	*world
	partner *identitytest.CA
	third   *identitytest.CA
}

func newFederatedWorld(t *testing.T) *federatedWorld {
	t.Helper()
	w := &federatedWorld{world: newWorld(t), partner: identitytest.NewCA(t, partnerTD), third: identitytest.NewCA(t, "third.test")}
	for _, src := range []*identitytest.Source{w.server, w.client} {
		src.SetBundle(w.partner.Bundle())
		src.SetBundle(w.third.Bundle())
	}
	return w
}

// TestFederatedClients: a server that federates with partner.test admits
// partner.test's workloads, each chain verified against partner.test's own
// bundle and no other; everything else about federation is refused with its
// class.
func TestFederatedClients(t *testing.T) {
	w := newFederatedWorld(t)
	allow := identity.NewAllowList(identity.AllowID(mustID(clientID)), identity.AllowID(mustID(partnerClient)),
		identity.AllowTrustDomain(spiffeid.RequireTrustDomainFromString("third.test"))).Authorize
	federating := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allow, identity.FederatesWith(partner)))
	plain := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allow))

	withLocalCA := w.partner.Bundle()
	withLocalCA.AddX509Authority(w.ca.Cert())

	for _, tc := range []struct {
		name   string
		srv    *tlsServer
		cert   tls.Certificate
		bundle *x509bundle.Bundle // partner.test's bundle for this case; nil: none at all
		class  identity.Class
		msg    string
		peerTD string // the bundle that verified an admitted peer
	}{
		{name: "local peer", srv: federating, cert: w.ca.TLSCertificate(t, clientID), bundle: w.partner.Bundle(), peerTD: trustDomain},
		{name: "federated peer", srv: federating, cert: w.partner.TLSCertificate(t, partnerClient), bundle: w.partner.Bundle(), peerTD: partnerTD},
		{"federated peer on a listener that does not federate", plain, w.partner.TLSCertificate(t, partnerClient), w.partner.Bundle(),
			identity.ClassWrongTrustDomain, `trust domain "partner.test" is not the local trust domain "mesh.test"`, ""},
		{"peer of a trust domain whose bundle is held but not federated here", federating, w.third.TLSCertificate(t, "spiffe://third.test/ns/client"), w.partner.Bundle(),
			identity.ClassWrongTrustDomain, `trust domain "third.test" is neither the local trust domain "mesh.test" nor one this configuration federates with (partner.test)`, ""},
		{"claims partner.test, signed by the local CA", federating, w.ca.TLSCertificate(t, partnerClient), w.partner.Bundle(),
			identity.ClassUnknownCA, `not signed by a CA of the trust bundle of "partner.test"`, ""},
		{"claims the local trust domain, signed by partner.test's CA", federating, w.partner.TLSCertificate(t, clientID), w.partner.Bundle(),
			identity.ClassUnknownCA, `not signed by a CA of the trust bundle of "mesh.test"`, ""},
		{"claims partner.test, signed by third.test's CA", federating, w.third.TLSCertificate(t, partnerClient), w.partner.Bundle(),
			identity.ClassUnknownCA, `not signed by a CA of the trust bundle of "partner.test"`, ""},
		{"federated peer, no bundle of its trust domain", federating, w.partner.TLSCertificate(t, partnerClient), nil,
			identity.ClassUnknownCA, `no bundle of trust domain "partner.test" from the Workload API`, ""},
		{"federated bundle holding the local CA: its own peers", federating, w.partner.TLSCertificate(t, partnerClient), withLocalCA,
			identity.ClassUnknownCA, `bundle of trust domain "partner.test" refused: federated bundle holds a CA of the local trust domain "mesh.test"`, ""},
		{"federated bundle holding the local CA: partner.test ID signed by the local CA", federating, w.ca.TLSCertificate(t, partnerClient), withLocalCA,
			identity.ClassUnknownCA, "federated bundle holds a CA of the local trust domain", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.bundle == nil {
				w.server.RemoveBundle(partner)
			} else {
				w.server.SetBundle(tc.bundle)
			}
			_, client := dial(t, tc.srv.addr, hostileClient(tc.cert))
			server := tc.srv.next(t)
			if tc.class == "" {
				if server.err != nil || client.err != nil {
					t.Fatalf("refused: server %v, client %v", server.err, client.err)
				}
				if got := identity.DescribeConnection(server.state, true).ClientBundle; got != tc.peerTD {
					t.Errorf("verified by the bundle of %q, want %q", got, tc.peerTD)
				}
				return
			}
			wantRefused(t, "server", server, tc.class, tc.msg)
		})
	}
}

// TestFederatedServer: an outbound client accepts a server of partner.test
// only when it federates with partner.test, and then only the expected ID,
// verified against partner.test's bundle.
func TestFederatedServer(t *testing.T) {
	w := newFederatedWorld(t)
	good := startServer(t, hostileServer(w.partner.TLSCertificate(t, partnerServer)))
	forged := startServer(t, hostileServer(w.third.TLSCertificate(t, partnerServer)))

	_, h := dial(t, good.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(partnerServer), identity.FederatesWith(partner)))
	if h.err != nil {
		t.Fatalf("federated server refused: %v", h.err)
	}
	if got := identity.DescribeConnection(h.state, false).ServerBundle; got != partnerTD {
		t.Errorf("server verified by the bundle of %q, want %q", got, partnerTD)
	}
	good.next(t)

	_, h = dial(t, good.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(partnerServer)))
	wantRefused(t, "client without federation", h, identity.ClassWrongTrustDomain, `trust domain "partner.test" is not the local trust domain`)
	good.next(t)

	_, h = dial(t, forged.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(partnerServer), identity.FederatesWith(partner)))
	wantRefused(t, "server of partner.test signed by another trust domain's CA", h, identity.ClassUnknownCA, `trust bundle of "partner.test"`)
	forged.next(t)
}

// TestFederatedBundleRemovedRefusesResumption: a federated peer's session
// does not outlive its trust domain's bundle: once the bundle is gone, the
// resumed handshake is refused, and once the bundle is refused for holding
// the local CA, the chain verified before (and cached) does not help.
func TestFederatedBundleRemovedRefusesResumption(t *testing.T) {
	w := newFederatedWorld(t)
	partnerSrc := w.partner.Source(t, partnerClient)
	partnerSrc.SetBundle(w.ca.Bundle())
	client := identity.NewTLS(partnerSrc).ClientConfig(identity.Modern(), mustID(serverID), identity.FederatesWith(spiffeid.RequireTrustDomainFromString(trustDomain)))
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(partnerClient), identity.FederatesWith(partner)))

	if _, h := dial(t, srv.addr, client); h.err != nil {
		t.Fatalf("first handshake: %v", h.err)
	}
	srv.next(t)
	_, h := dial(t, srv.addr, client)
	if h.err != nil || !h.state.DidResume {
		t.Fatalf("second handshake: %v, resumed %v", h.err, h.state.DidResume)
	}
	srv.next(t)
	if hits := identity.ChainCacheHits(w.serverTL); hits == 0 {
		t.Fatal("the resumed handshake did not use the chain cache; the rest of the test would prove nothing")
	}

	withLocalCA := w.partner.Bundle()
	withLocalCA.AddX509Authority(w.ca.Cert())
	w.server.SetBundle(withLocalCA)
	dial(t, srv.addr, client)
	server := srv.next(t)
	wantRefused(t, "resumed, bundle now holding the local CA", server, identity.ClassUnknownCA, "federated bundle holds a CA of the local trust domain")

	w.server.RemoveBundle(partner)
	dial(t, srv.addr, client)
	server = srv.next(t)
	wantRefused(t, "resumed, bundle removed", server, identity.ClassUnknownCA, `no bundle of trust domain "partner.test"`)
	if !verifyErrorOf(t, server.err).Resumed {
		t.Error("the refusal does not say the session was resumed")
	}
}

// TestChainCacheKeysOnTrustDomain: a chain verified against one trust
// domain's bundle is not taken as verified for another trust domain, even
// when both bundles hold the same authorities.
func TestChainCacheKeysOnTrustDomain(t *testing.T) {
	w := newFederatedWorld(t)
	svid := w.partner.SVID(t, partnerClient)
	auths := w.partner.Bundle().X509Authorities()
	chain := append(svid.Certificates[:1:1], w.partner.Cert())
	now := time.Now()
	identity.ChainCacheAdd(w.serverTL, svid.Certificates, partner, auths, chain)
	if !identity.ChainCacheVerified(w.serverTL, svid.Certificates, partner, auths, now) {
		t.Fatal("the chain just added is not found")
	}
	if identity.ChainCacheVerified(w.serverTL, svid.Certificates, spiffeid.RequireTrustDomainFromString("third.test"), auths, now) {
		t.Error("a chain verified for partner.test counts as verified for third.test, whose bundle holds the same CA")
	}
}

// TestTrustDomainUsable is what the proxy asks after a bundle change.
func TestTrustDomainUsable(t *testing.T) {
	w := newFederatedWorld(t)
	for _, td := range []string{trustDomain, partnerTD, "third.test"} {
		if err := w.serverTL.TrustDomainUsable(spiffeid.RequireTrustDomainFromString(td)); err != nil {
			t.Errorf("%s: %v", td, err)
		}
	}
	withLocalCA := w.partner.Bundle()
	withLocalCA.AddX509Authority(w.ca.Cert())
	w.server.SetBundle(withLocalCA)
	if err := w.serverTL.TrustDomainUsable(partner); !errors.Is(err, identity.ErrFederatedBundleHoldsLocalCA) {
		t.Errorf("bundle holding the local CA: %v", err)
	}
	w.server.RemoveBundle(partner)
	if err := w.serverTL.TrustDomainUsable(partner); err == nil {
		t.Error("removed bundle still usable")
	}
	// The local trust domain needs no federated bundle.
	if err := w.serverTL.TrustDomainUsable(spiffeid.RequireTrustDomainFromString(trustDomain)); err != nil {
		t.Errorf("local trust domain: %v", err)
	}
}

// TestCheckFederatedBundle compares keys, not certificates: the local CA
// re-issued (same key, new certificate) in a federated bundle is refused too.
func TestCheckFederatedBundle(t *testing.T) {
	w := newFederatedWorld(t)
	if err := identity.CheckFederatedBundle(w.partner.Bundle(), w.ca.Bundle()); err != nil {
		t.Fatalf("a foreign bundle of its own CAs: %v", err)
	}
	reissued := *w.ca.Cert()
	reissued.Raw = append([]byte(nil), reissued.Raw...)
	reissued.Raw[len(reissued.Raw)-1] ^= 0xff // another certificate, same key
	b := w.partner.Bundle()
	b.AddX509Authority(&reissued)
	if err := identity.CheckFederatedBundle(b, w.ca.Bundle()); !errors.Is(err, identity.ErrFederatedBundleHoldsLocalCA) {
		t.Errorf("local CA's key in a federated bundle: %v", err)
	}
}
