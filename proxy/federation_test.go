package proxy

import (
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

const (
	partnerTD     = "partner.test"
	partnerPeerID = "spiffe://partner.test/ns/shop/sa/client"
	partnerSrvID  = "spiffe://partner.test/ns/shop/sa/server"
)

var partner = spiffeid.RequireTrustDomainFromString(partnerTD)

// federation is a sidecar of mesh.test whose Workload API source also holds
// partner.test's bundle, and a peer of partner.test that holds mesh.test's.
type federation struct {
	mesh, partner *identitytest.CA
	backendSrc    *identitytest.Source
	backendTLS    *identity.TLS
	partnerTLS    *identity.TLS
	logs          *logs
	app           *app
	srv           *Server
	cfg           *Config
}

func newFederation(t *testing.T) *federation {
	t.Helper()
	f := &federation{mesh: identitytest.NewCA(t, trustDomain), partner: identitytest.NewCA(t, partnerTD), logs: newLogs()}
	f.backendSrc = f.mesh.Source(t, backendID)
	f.backendSrc.SetBundle(f.partner.Bundle())
	f.backendTLS = identity.NewTLS(f.backendSrc)
	partnerSrc := f.partner.Source(t, partnerPeerID)
	partnerSrc.SetBundle(f.mesh.Bundle())
	f.partnerTLS = identity.NewTLS(partnerSrc)
	f.app = newApp(t, echo)
	allow := allowIDs(t, frontendID, partnerPeerID)
	f.cfg = &Config{Version: "1", TLS: identity.Modern(), Inbound: []Inbound{
		{Name: "web", Listen: "127.0.0.1:0", App: f.app.addr(), Allow: allow, FederatesWith: []spiffeid.TrustDomain{partner}},
		{Name: "plain", Listen: "127.0.0.1:0", App: f.app.addr(), Allow: allow},
	}}
	f.srv = startServer(t, f.backendTLS, f.cfg, Options{Logger: f.logs.logger()})
	return f
}

// dialPartner connects to listener as the partner.test peer.
func (f *federation) dialPartner(t *testing.T, listener string) (*tls.Conn, error) {
	t.Helper()
	cfg := f.partnerTLS.ClientConfig(identity.Modern(), mustID(t, backendID), identity.FederatesWith(spiffeid.RequireTrustDomainFromString(trustDomain)))
	cfg = cfg.Clone()
	cfg.ClientSessionCache = nil
	c, err := tls.Dial("tcp", addrOf(t, f.srv, listener), cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	if err := roundTrip(c, "hello from partner.test"); err != nil {
		return nil, err
	}
	return c, nil
}

func (f *federation) apply(t *testing.T, edit func(*Config)) {
	t.Helper()
	next := *f.cfg
	next.Inbound = append([]Inbound(nil), f.cfg.Inbound...)
	next.Version += "+"
	edit(&next)
	if err := f.srv.Apply(&next); err != nil {
		t.Fatal(err)
	}
	f.cfg = &next
}

// TestFederatedPeerAdmitted: a listener that federates with partner.test
// admits its allowed workload, and /status counts the connection under the
// bundle that verified it; a listener that does not federate refuses the same
// peer, class wrong_trust_domain, and nothing reaches its app.
func TestFederatedPeerAdmitted(t *testing.T) {
	f := newFederation(t)
	if _, err := f.dialPartner(t, "web"); err != nil {
		t.Fatalf("federated peer refused: %v", err)
	}
	for _, l := range f.srv.Listeners() {
		switch l.Name {
		case "web":
			if strings.Join(l.FederatesWith, ",") != partnerTD || l.PeersByTrustDomain[partnerTD] != 1 {
				t.Errorf("status of web: federates with %v, peers by trust domain %v", l.FederatesWith, l.PeersByTrustDomain)
			}
		case "plain":
			if len(l.FederatesWith) != 0 {
				t.Errorf("status of plain: federates with %v", l.FederatesWith)
			}
		}
	}

	accepted := f.app.accepted.Load()
	mark := f.logs.mark()
	if _, err := f.dialPartner(t, "plain"); err == nil {
		t.Fatal("a listener that does not federate admitted a partner.test peer")
	}
	f.logs.wait(t, mark, "handshake refused", map[string]string{"listener": "plain", "peer_id": partnerPeerID, "class": "wrong_trust_domain"})
	if n := f.app.accepted.Load(); n != accepted {
		t.Errorf("the app was dialed %d times for a refused peer", n-accepted)
	}
}

// TestFederationRevoked: taking partner.test off a listener's federation
// list closes its live connections like a policy revocation, and so does the
// removal of partner.test's bundle from the Workload API (RecheckTrust),
// or its turning into a bundle that holds the local CA; new handshakes are
// refused after each.
func TestFederationRevoked(t *testing.T) {
	f := newFederation(t)

	live, err := f.dialPartner(t, "web")
	if err != nil {
		t.Fatal(err)
	}
	mark := f.logs.mark()
	f.apply(t, func(c *Config) { c.Inbound[0].FederatesWith = nil })
	expectClosed(t, live)
	f.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "peer_id": partnerPeerID, "reason": "policy_revoked"})
	if _, err := f.dialPartner(t, "web"); err == nil {
		t.Fatal("admitted after the listener stopped federating")
	}
	f.apply(t, func(c *Config) { c.Inbound[0].FederatesWith = []spiffeid.TrustDomain{partner} })

	for _, tc := range []struct {
		name   string
		change func()
		class  string
	}{
		{"bundle removed", func() { f.backendSrc.RemoveBundle(partner) }, "unknown_ca"},
		{"bundle now holding the local CA", func() {
			b := f.partner.Bundle()
			b.AddX509Authority(f.mesh.Cert())
			f.backendSrc.SetBundle(b)
		}, "unknown_ca"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.backendSrc.SetBundle(f.partner.Bundle())
			live, err := f.dialPartner(t, "web")
			if err != nil {
				t.Fatal(err)
			}
			local, err := tls.Dial("tcp", addrOf(t, f.srv, "web"), identity.NewTLS(f.mesh.Source(t, frontendID)).ClientConfig(identity.Modern(), mustID(t, backendID)))
			if err != nil {
				t.Fatal(err)
			}
			defer local.Close()
			if err := roundTrip(local, "local peer"); err != nil {
				t.Fatal(err)
			}
			if n := f.srv.RecheckTrust(); n != 0 {
				t.Fatalf("RecheckTrust closed %d connections with every bundle in place", n)
			}

			mark := f.logs.mark()
			tc.change()
			if n := f.srv.RecheckTrust(); n != 1 {
				t.Errorf("RecheckTrust closed %d connections, want the partner's one", n)
			}
			expectClosed(t, live)
			f.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "peer_id": partnerPeerID, "reason": "trust_revoked"})
			if err := roundTrip(local, "local peer still served"); err != nil {
				t.Errorf("the local peer's connection was cut too: %v", err)
			}
			if _, err := f.dialPartner(t, "web"); err == nil {
				t.Fatal("a new handshake was admitted")
			}
			f.logs.wait(t, mark, "handshake refused", map[string]string{"listener": "web", "peer_id": partnerPeerID, "class": tc.class})
		})
	}
}

// TestFederatedUpstream: an outbound listener reaches a server of
// partner.test when it federates with it; Apply refuses an outbound whose
// server is of a trust domain it does not federate with, and a federation
// list naming the local trust domain.
func TestFederatedUpstream(t *testing.T) {
	f := newFederation(t)
	partnerSrv := startServer(t, identity.NewTLS(func() *identitytest.Source {
		s := f.partner.Source(t, partnerSrvID)
		s.SetBundle(f.mesh.Bundle())
		return s
	}()), &Config{Version: "p", TLS: identity.Modern(), Inbound: []Inbound{{
		Name: "partner-web", Listen: "127.0.0.1:0", App: f.app.addr(), Allow: allowIDs(t, backendID),
		FederatesWith: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString(trustDomain)},
	}}}, Options{})

	out := Outbound{Name: "to-partner", Listen: "127.0.0.1:0", Upstreams: []string{addrOf(t, partnerSrv, "partner-web")},
		ServerID: mustID(t, partnerSrvID), FederatesWith: []spiffeid.TrustDomain{partner}}
	f.apply(t, func(c *Config) { c.Outbound = []Outbound{out} })
	c, err := dialAsApp(addrOf(t, f.srv, "to-partner"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c, "to partner.test"); err != nil {
		t.Fatalf("through a federated upstream: %v", err)
	}

	for _, tc := range []struct {
		name  string
		edit  func(*Config)
		field string
	}{
		{"server of a trust domain not federated with", func(c *Config) {
			o := out
			o.FederatesWith = nil
			c.Outbound = []Outbound{o}
		}, "outbound[0].serverID: spiffe://partner.test/ns/shop/sa/server is in trust domain partner.test, neither the local trust domain mesh.test nor one this listener federates with"},
		{"inbound federating with the local trust domain", func(c *Config) {
			c.Inbound[0].FederatesWith = []spiffeid.TrustDomain{partner, spiffeid.RequireTrustDomainFromString(trustDomain)}
		}, "inbound[0].federatesWith[1]: mesh.test is the local trust domain"},
		{"a trust domain listed twice", func(c *Config) {
			c.Inbound[0].FederatesWith = []spiffeid.TrustDomain{partner, partner}
		}, "inbound[0].federatesWith[1]: partner.test listed twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next := *f.cfg
			next.Inbound = append([]Inbound(nil), f.cfg.Inbound...)
			tc.edit(&next)
			err := f.srv.Apply(&next)
			if err == nil || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Apply: %v, want a refusal naming %q", err, tc.field)
			}
			if _, ok := errors.AsType[*FieldError](err); !ok {
				t.Errorf("error %T is not a *FieldError", err)
			}
		})
	}
}

// dialAsApp connects a plain TCP client, as the local app would.
func dialAsApp(addr string) (net.Conn, error) { return net.DialTimeout("tcp", addr, waitFor) }

// bundleGoesAfterVerification is the sidecar's TLS, whose source loses the
// partner's bundle the moment a handshake has verified a peer against it:
// the Workload API's removal arriving between the handshake and the
// connection's start, the window RecheckTrust cannot see (the connection has
// no peer yet when it runs).
type bundleGoesAfterVerification struct {
	*identity.TLS
	src *identitytest.Source
}

func (b bundleGoesAfterVerification) ServerConfig(p identity.Profile, authorize func(spiffeid.ID) error, opts ...identity.PeerOption) *tls.Config {
	cfg := b.TLS.ServerConfig(p, authorize, opts...)
	verify := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := verify(cs); err != nil {
			return err
		}
		b.src.RemoveBundle(partner)
		return nil
	}
	return cfg
}

// TestFederatedBundleRemovedDuringHandshake: a peer whose trust domain's
// bundle was removed while its handshake completed is refused, not served:
// the connection checks the trust domain is still usable before it starts,
// as it checks the allow-list.
func TestFederatedBundleRemovedDuringHandshake(t *testing.T) {
	f := newFederation(t)
	srv := startServer(t, bundleGoesAfterVerification{f.backendTLS, f.backendSrc}, f.cfg, Options{Logger: f.logs.logger()})
	cfg := f.partnerTLS.ClientConfig(identity.Modern(), mustID(t, backendID), identity.FederatesWith(spiffeid.RequireTrustDomainFromString(trustDomain)))
	c, err := tls.Dial("tcp", addrOf(t, srv, "web"), cfg)
	if err == nil {
		t.Cleanup(func() { c.Close() })
		err = roundTrip(c, "hello from partner.test")
	}
	if err == nil {
		t.Fatal("a peer of a trust domain whose bundle was removed during its handshake was served")
	}
	f.logs.wait(t, 0, "handshake refused", map[string]string{"listener": "web", "class": "unknown_ca", "peer_id": partnerPeerID})
}
