package identity_test

import (
	"crypto/tls"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// BenchmarkHandshakeWithAuthorization measures a whole mTLS connection setup
// over loopback TCP between two latch configurations (modern profile,
// X25519MLKEM768, ECDSA P-256 SVIDs): TCP connect, handshake, verification and
// authorization on both sides, and the first byte from the server. "full"
// runs every handshake from scratch; "resumed" resumes a TLS 1.3 session,
// which still re-verifies and re-authorizes the peer.
func BenchmarkHandshakeWithAuthorization(b *testing.B) {
	for _, mode := range []string{"full", "resumed"} {
		b.Run(mode, func(b *testing.B) {
			w := newWorld(b)
			srv := startServer(b, w.serverTL.ServerConfig(identity.Modern(), identity.NewAllowList(identity.AllowID(mustID(clientID))).Authorize))
			cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
			if mode == "full" {
				cfg = cfg.Clone()
				cfg.ClientSessionCache = nil
			}
			connect := func() bool {
				c, h := dial(b, srv.addr, cfg)
				if h.err != nil {
					b.Fatal(h.err)
				}
				c.Close()
				return h.state.DidResume
			}
			connect() // warm the session cache
			b.ReportAllocs()
			b.ResetTimer()
			resumed := 0
			for b.Loop() {
				if connect() {
					resumed++
				}
			}
			b.StopTimer()
			if want := mode == "resumed"; (resumed == b.N) != want {
				b.Fatalf("%s: %d of %d handshakes resumed", mode, resumed, b.N)
			}
		})
	}
}

// BenchmarkVerifyConnection measures what latch adds to each handshake, resumed
// or not: the SPIFFE verification of the peer's chain against the current
// bundle plus the allow-list decision, as the server runs it.
func BenchmarkVerifyConnection(b *testing.B) {
	w := newWorld(b)
	cfg := w.serverTL.ServerConfig(identity.Modern(), identity.NewAllowList(
		identity.AllowPathPrefix(mustID("spiffe://mesh.test/ns/other")),
		identity.AllowID(mustID(clientID)),
	).Authorize)
	svid, err := w.client.GetX509SVID()
	if err != nil {
		b.Fatal(err)
	}
	cs := tls.ConnectionState{HandshakeComplete: true, DidResume: true, PeerCertificates: svid.Certificates}
	b.ReportAllocs()
	for b.Loop() {
		if err := cfg.VerifyConnection(cs); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFederatedHandshake is BenchmarkHandshakeWithAuthorization with
// federation on: the server federates with partner.test and holds its bundle,
// and the client is either a local workload ("local": what federation adds to
// every handshake of the local trust domain, nothing but the list lookup) or
// a partner.test workload ("federated": the bundle of partner.test looked up
// and checked against the local CAs on every handshake, then its chain).
func BenchmarkFederatedHandshake(b *testing.B) {
	for _, peer := range []string{"local", "federated"} {
		for _, mode := range []string{"full", "resumed"} {
			b.Run(peer+"/"+mode, func(b *testing.B) {
				w := newWorld(b)
				partnerCA := identitytest.NewCA(b, partnerTD)
				w.server.SetBundle(partnerCA.Bundle())
				allow := identity.NewAllowList(identity.AllowID(mustID(clientID)), identity.AllowID(mustID(partnerClient))).Authorize
				srv := startServer(b, w.serverTL.ServerConfig(identity.Modern(), allow, identity.FederatesWith(partner)))
				client := w.clientTL
				if peer == "federated" {
					src := partnerCA.Source(b, partnerClient)
					src.SetBundle(w.ca.Bundle())
					client = identity.NewTLS(src)
				}
				cfg := client.ClientConfig(identity.Modern(), mustID(serverID), identity.FederatesWith(spiffeid.RequireTrustDomainFromString(trustDomain)))
				if mode == "full" {
					cfg = cfg.Clone()
					cfg.ClientSessionCache = nil
				}
				connect := func() bool {
					c, h := dial(b, srv.addr, cfg)
					if h.err != nil {
						b.Fatal(h.err)
					}
					c.Close()
					return h.state.DidResume
				}
				connect()
				b.ReportAllocs()
				b.ResetTimer()
				resumed := 0
				for b.Loop() {
					if connect() {
						resumed++
					}
				}
				b.StopTimer()
				if want := mode == "resumed"; (resumed == b.N) != want {
					b.Fatalf("%s: %d of %d handshakes resumed", mode, resumed, b.N)
				}
			})
		}
	}
}

// BenchmarkVerifyFederated is BenchmarkVerifyConnection for a peer of a
// federated trust domain: the lookup of its bundle, the check that it holds
// no local CA, and the cached chain.
func BenchmarkVerifyFederated(b *testing.B) {
	w := newWorld(b)
	partnerCA := identitytest.NewCA(b, partnerTD)
	w.server.SetBundle(partnerCA.Bundle())
	cfg := w.serverTL.ServerConfig(identity.Modern(), identity.NewAllowList(identity.AllowID(mustID(partnerClient))).Authorize, identity.FederatesWith(partner))
	svid := partnerCA.SVID(b, partnerClient)
	cs := tls.ConnectionState{HandshakeComplete: true, DidResume: true, PeerCertificates: svid.Certificates}
	b.ReportAllocs()
	for b.Loop() {
		if err := cfg.VerifyConnection(cs); err != nil {
			b.Fatal(err)
		}
	}
}
