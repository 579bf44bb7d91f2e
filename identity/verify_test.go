package identity_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// peerCase is one certificate a peer presents, and how latch must take it.
type peerCase struct {
	name  string
	cert  tls.Certificate
	class identity.Class // "" = accepted
	msg   string         // part of the refusal's message
}

// hostilePeers lists, for a peer that should be id, every certificate latch
// must refuse, plus the valid ones as controls. role is the extended key usage
// the peer's role needs; other is the one it does not.
func hostilePeers(t *testing.T, w *world, id string, role, other x509.ExtKeyUsage, roleName string) []peerCase {
	t.Helper()
	ca := w.ca
	stranger := identitytest.NewCA(t, trustDomain) // same trust domain name, not in our bundle
	foreign := identitytest.NewCA(t, "other.test") // another trust domain, whose bundle we also hold
	inter := ca.NewIntermediate(t)
	now := time.Now()
	withRoot := ca.TLSCertificate(t, id)
	withRoot.Certificate = append(withRoot.Certificate, ca.Cert().Raw)
	withLeafInChain := ca.TLSCertificate(t, id)
	withLeafInChain.Certificate = append(withLeafInChain.Certificate, ca.TLSCertificate(t, "spiffe://mesh.test/ns/x").Certificate[0])
	return []peerCase{
		{name: "valid", cert: ca.TLSCertificate(t, id)},
		{name: "valid through an intermediate CA", cert: inter.TLSCertificate(t, id)},
		{name: "valid with only the role's EKU", cert: ca.TLSCertificate(t, id, identitytest.ExtKeyUsage(role))},
		{name: "valid with the root sent along", cert: withRoot},

		{"other CA, same trust domain name", stranger.TLSCertificate(t, id), identity.ClassUnknownCA, "not signed by a CA of the trust bundle of \"mesh.test\""},
		{"other trust domain", foreign.TLSCertificate(t, "spiffe://other.test/ns/x"), identity.ClassWrongTrustDomain, `peer spiffe://other.test/ns/x: trust domain "other.test" is not the local trust domain "mesh.test"`},
		{"local ID signed by another trust domain's CA", foreign.TLSCertificate(t, id), identity.ClassUnknownCA, "not signed by a CA of the trust bundle"},
		{"intermediate CA left out of the chain", inter.TLSCertificate(t, id, identitytest.OmitChain()), identity.ClassUnknownCA, "not signed by a CA"},
		{"expired intermediate CA", ca.NewIntermediate(t, identitytest.Expired()).TLSCertificate(t, id), identity.ClassExpired, `issuing CA "CN=intermediate CA mesh.test,O=latch identitytest" expired at`},
		{"intermediate CA not yet valid", ca.NewIntermediate(t, identitytest.NotYetValid()).TLSCertificate(t, id), identity.ClassNotYetValid, `issuing CA "CN=intermediate CA mesh.test,O=latch identitytest" not valid before`},
		{"intermediate CA without keyCertSign", ca.NewIntermediate(t, identitytest.KeyUsage(x509.KeyUsageDigitalSignature)).TLSCertificate(t, id), identity.ClassBadKeyUsage, "lacks keyCertSign"},
		{"leaf certificate in the chain", withLeafInChain, identity.ClassBadSVID, "is not a CA certificate"},
		{"intermediate of another CA, with its chain", identitytest.NewCA(t, trustDomain).NewIntermediate(t).TLSCertificate(t, id), identity.ClassUnknownCA, "not signed by a CA"},
		{"expired", ca.TLSCertificate(t, id, identitytest.NotBefore(now.Add(-2*time.Hour)), identitytest.NotAfter(now.Add(-time.Hour))), identity.ClassExpired, "peer " + id + ": certificate expired at " + now.Add(-time.Hour).UTC().Format(time.RFC3339)},
		{"not yet valid", ca.TLSCertificate(t, id, identitytest.NotYetValid()), identity.ClassNotYetValid, "certificate not valid before"},
		{"expired and from another CA", stranger.TLSCertificate(t, id, identitytest.Expired()), identity.ClassUnknownCA, "not signed by a CA"},
		{"no URI SAN", ca.TLSCertificate(t, "", identitytest.DNSNames("server.mesh.test")), identity.ClassBadSVID, "no URI SAN"},
		{"two URI SANs", ca.TLSCertificate(t, id, identitytest.URIs(id, "spiffe://mesh.test/ns/admin")), identity.ClassBadSVID, "2 URI SANs"},
		{"non-SPIFFE URI SAN", ca.TLSCertificate(t, "", identitytest.URIs("https://x")), identity.ClassBadSVID, `URI SAN "https://x" is not a SPIFFE ID`},
		// A URI SAN counts only as spelt by an issuer: byte for byte the
		// SPIFFE ID it parses to (docs/security.md, "How a peer's SPIFFE
		// ID is read"). Each of these parses, through net/url, to id.
		{"upper-case scheme", ca.TLSCertificate(t, "", identitytest.URIs("SPIFFE"+strings.TrimPrefix(id, "spiffe"))), identity.ClassBadSVID, `URI SAN "SPIFFE://mesh.test/`},
		{"mixed-case scheme", ca.TLSCertificate(t, "", identitytest.URIs("Spiffe"+strings.TrimPrefix(id, "spiffe"))), identity.ClassBadSVID, "scheme must be spiffe in lower case"},
		{"empty fragment", ca.TLSCertificate(t, "", identitytest.URIs(id+"#")), identity.ClassBadSVID, `URI SAN "` + id + `#" is not a SPIFFE ID`},
		{"upper-case trust domain", ca.TLSCertificate(t, "", identitytest.URIs(strings.Replace(id, "mesh.test", "MESH.test", 1))), identity.ClassBadSVID, "is not a SPIFFE ID"},
		{"percent-encoded path", ca.TLSCertificate(t, "", identitytest.URIs(strings.Replace(id, "/ns/", "/n%73/", 1))), identity.ClassBadSVID, "is not a SPIFFE ID"},
		{"trust domain ID, no workload path", ca.TLSCertificate(t, "spiffe://mesh.test"), identity.ClassBadSVID, "not of a workload"},
		{"CA certificate used as leaf", ca.TLSCertificate(t, id, identitytest.AsCA()), identity.ClassBadSVID, "CA certificate"},
		{"no digitalSignature", ca.TLSCertificate(t, id, identitytest.KeyUsage(x509.KeyUsageKeyEncipherment)), identity.ClassBadKeyUsage, "lacks digitalSignature"},
		{"keyCertSign on a leaf", ca.TLSCertificate(t, id, identitytest.KeyUsage(x509.KeyUsageDigitalSignature|x509.KeyUsageCertSign)), identity.ClassBadKeyUsage, "keyCertSign"},
		{"cRLSign on a leaf", ca.TLSCertificate(t, id, identitytest.KeyUsage(x509.KeyUsageDigitalSignature|x509.KeyUsageCRLSign)), identity.ClassBadKeyUsage, "cRLSign"},
		{"no extended key usage", ca.TLSCertificate(t, id, identitytest.ExtKeyUsage()), identity.ClassBadKeyUsage, "no extended key usage"},
		{"EKU of the other role only", ca.TLSCertificate(t, id, identitytest.ExtKeyUsage(other)), identity.ClassBadKeyUsage, "lacks " + roleName},
		{"anyExtendedKeyUsage only", ca.TLSCertificate(t, id, identitytest.ExtKeyUsage(x509.ExtKeyUsageAny)), identity.ClassBadKeyUsage, "lacks " + roleName},
	}
}

func TestServerRefusesHostileClients(t *testing.T) {
	w := newWorld(t)
	w.server.SetBundle(identitytest.NewCA(t, "other.test").Bundle()) // held, never used: no federation
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))

	cases := hostilePeers(t, w, clientID, x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth, "clientAuth")
	cases = append(cases,
		peerCase{"valid but not in allow-list", w.ca.TLSCertificate(t, "spiffe://mesh.test/ns/intruder"), identity.ClassNotAllowed, "peer spiffe://mesh.test/ns/intruder: not in allow-list"},
		peerCase{"no client certificate", tls.Certificate{}, identity.ClassBadSVID, "didn't provide a certificate"},
	)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, client := dial(t, srv.addr, hostileClient(tc.cert))
			server := srv.next(t)
			if tc.class == "" {
				if server.err != nil || client.err != nil {
					t.Fatalf("refused a valid client: server %v, client %v", server.err, client.err)
				}
				if got := peerOf(t, server.state); got != clientID {
					t.Errorf("PeerID = %s, want %s", got, clientID)
				}
				return
			}
			t.Logf("server: %v", server.err)
			wantRefused(t, "server", server, tc.class, tc.msg)
			// The refused client learns only the alert.
			alert := "bad certificate"
			if tc.cert.Certificate == nil {
				alert = "certificate required"
			}
			wantRefused(t, "client", client, identity.ClassBadSVID, alert)
			if tc.class == identity.ClassNotAllowed && !errors.Is(server.err, identity.ErrNotAllowed) {
				t.Errorf("policy refusal %v does not wrap ErrNotAllowed", server.err)
			}
			if tc.class != identity.ClassNotAllowed && errors.Is(server.err, identity.ErrNotAllowed) {
				t.Errorf("verification failure %v wraps ErrNotAllowed", server.err)
			}
		})
	}
}

func TestClientRefusesHostileServers(t *testing.T) {
	w := newWorld(t)
	w.client.SetBundle(identitytest.NewCA(t, "other.test").Bundle()) // held, never used: no federation
	cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))

	cases := hostilePeers(t, w, serverID, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth, "serverAuth")
	cases = append(cases,
		peerCase{"valid but another server ID", w.ca.TLSCertificate(t, "spiffe://mesh.test/ns/impostor"), identity.ClassWrongServerID, "server spiffe://mesh.test/ns/impostor: expected " + serverID},
	)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := startServer(t, hostileServer(tc.cert))
			_, client := dial(t, srv.addr, cfg)
			server := srv.next(t)
			if tc.class == "" {
				if server.err != nil || client.err != nil {
					t.Fatalf("refused a valid server: client %v, server %v", client.err, server.err)
				}
				if got := peerOf(t, client.state); got != serverID {
					t.Errorf("PeerID = %s, want %s", got, serverID)
				}
				return
			}
			t.Logf("client: %v", client.err)
			wantRefused(t, "client", client, tc.class, tc.msg)
			wantRefused(t, "server", server, identity.ClassBadSVID, "bad certificate")
			if errors.Is(client.err, identity.ErrNotAllowed) {
				t.Errorf("verification failure %v wraps ErrNotAllowed", client.err)
			}
		})
	}
}

// A zero expected server ID and a nil authorizer fail closed.
func TestMissingPolicyRefusesEveryone(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), nil))
	_, _ = dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	wantRefused(t, "server with nil authorizer", srv.next(t), identity.ClassNotAllowed, "deny all")

	srv = startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	_, client := dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID).TrustDomain().ID()))
	wantRefused(t, "client expecting a trust domain ID", client, identity.ClassWrongServerID, "expected spiffe://mesh.test")

	var zero identity.Profile
	srv = startServer(t, w.serverTL.ServerConfig(zero, allowOnly(clientID)))
	_, client = dial(t, srv.addr, w.clientTL.ClientConfig(zero, spiffeid.ID{}))
	wantRefused(t, "client with zero server ID", client, identity.ClassWrongServerID, "no expected server ID")
}

// The empty AllowList denies everyone, through ServerConfig too.
func TestEmptyAllowListDeniesAll(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), identity.NewAllowList().Authorize))
	_, _ = dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	r := srv.next(t)
	wantRefused(t, "server", r, identity.ClassNotAllowed, "allow-list is empty")
	if ve := verifyErrorOf(t, r.err); ve.Peer.String() != clientID {
		t.Errorf("VerifyError.Peer = %s, want %s", ve.Peer, clientID)
	}
}

// An authorizer's own error is reported as a policy refusal all the same.
func TestCustomAuthorizerErrorWrapsErrNotAllowed(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), func(spiffeid.ID) error {
		return errors.New("maintenance window")
	}))
	_, _ = dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	r := srv.next(t)
	wantRefused(t, "server", r, identity.ClassNotAllowed, "peer "+clientID+": not in allow-list: maintenance window")
	if !errors.Is(r.err, identity.ErrNotAllowed) {
		t.Errorf("%v does not wrap ErrNotAllowed", r.err)
	}
}

// Without a local SVID or bundle nothing is accepted, and the error says which
// local piece is missing.
func TestMissingLocalIdentityFailsClosed(t *testing.T) {
	w := newWorld(t)
	empty := identitytest.NewSource(nil, w.ca.Bundle())
	srv := startServer(t, identity.NewTLS(empty).ServerConfig(identity.Modern(), allowOnly(clientID)))
	_, client := dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	if client.err == nil {
		t.Error("client connected to a server without an SVID")
	}
	wantRefused(t, "server without SVID", srv.next(t), identity.ClassOther, "getting the local X.509-SVID")

	noBundle := identitytest.NewSource(w.ca.SVID(t, serverID))
	srv = startServer(t, identity.NewTLS(noBundle).ServerConfig(identity.Modern(), allowOnly(clientID)))
	_, client = dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	if client.err == nil {
		t.Error("client accepted by a server without a bundle")
	}
	wantRefused(t, "server without bundle", srv.next(t), identity.ClassOther, `getting the bundle of "mesh.test"`)
}

// A copied certificate is worthless without its private key: the handshake
// signature proves possession, on both sides.
func TestCertificateWithoutItsKeyIsRefused(t *testing.T) {
	w := newWorld(t)
	stolen := func(id string) tls.Certificate {
		c := w.ca.TLSCertificate(t, id)
		c.PrivateKey = w.ca.TLSCertificate(t, id).PrivateKey // a key of its own, not the certificate's
		return c
	}

	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	_, client := dial(t, srv.addr, hostileClient(stolen(clientID)))
	if client.err == nil {
		t.Error("client with a stolen certificate connected")
	}
	wantRefused(t, "server", srv.next(t), identity.ClassOther, "invalid signature by the client certificate")

	srv = startServer(t, hostileServer(stolen(serverID)))
	_, client = dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	wantRefused(t, "client", client, identity.ClassOther, "invalid signature by the server certificate")
	srv.next(t)
}
