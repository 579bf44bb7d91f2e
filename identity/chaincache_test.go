package identity_test

import (
	"crypto/tls"
	"sync/atomic"
	"testing"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// The chain cache saves the signature checks of a peer seen before, on full
// and resumed handshakes alike, and answers for nothing else: a bundle that
// lost the CA, a clock past the chain's validity, or another chain is
// verified afresh and refused with its class.
func TestVerifiedChainCache(t *testing.T) {
	w := newWorld(t)
	var now atomic.Pointer[time.Time] // nil: the wall clock
	identity.SetClock(w.serverTL, func() time.Time {
		if at := now.Load(); at != nil {
			return *at
		}
		return time.Now()
	})
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	connect := func(cfg *tls.Config) handshake {
		t.Helper()
		dial(t, srv.addr, cfg)
		return srv.next(t)
	}

	full := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
	full.SessionTicketsDisabled = true
	resumed := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
	for i, cfg := range []*tls.Config{full, full, resumed, resumed} {
		if h := connect(cfg); h.err != nil {
			t.Fatalf("handshake %d: %v", i, h.err)
		}
	}
	// The first full handshake verifies; the three after it are hits on
	// the server, whether resumed or not.
	if got := identity.ChainCacheHits(w.serverTL); got != 3 {
		t.Fatalf("server cache hits = %d, want 3", got)
	}
	if got := identity.ChainCacheHits(w.clientTL); got < 2 {
		t.Fatalf("client cache hits = %d, want at least 2", got)
	}

	// Past the leaf's NotAfter: refused as expired, cache or not.
	leaf, err := w.client.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	expired := leaf.Certificates[0].NotAfter.Add(time.Second)
	now.Store(&expired)
	wantRefused(t, "server", connect(full), identity.ClassExpired, "expired at")
	wantRefused(t, "server", connect(resumed), identity.ClassExpired, "expired at")
	now.Store(nil)

	// The client's CA leaves the server's bundle: refused as unknown CA.
	other := identitytest.NewCA(t, trustDomain)
	w.server.SetBundle(other.Bundle())
	before := identity.ChainCacheHits(w.serverTL)
	wantRefused(t, "server", connect(full), identity.ClassUnknownCA, "not signed by a CA of the trust bundle")
	if got := identity.ChainCacheHits(w.serverTL); got != before {
		t.Fatalf("cache answered for a bundle without the CA (%d hits, was %d)", got, before)
	}

	// Back to the original bundle (a new value with the same CA): a hit,
	// the authorities compare by content.
	w.server.SetBundle(w.ca.Bundle())
	if h := connect(full); h.err != nil {
		t.Fatalf("after restoring the bundle: %v", h.err)
	}
	if identity.ChainCacheHits(w.serverTL) != before+1 {
		t.Fatal("a bundle with the same authorities missed the cache")
	}

	// A client with a chain through an intermediate: the leaf's signature
	// is checked afresh, and a hostile chain naming the same leaf but a
	// foreign intermediate is refused.
	inter := w.ca.NewIntermediate(t)
	w.client.SetSVID(inter.SVID(t, clientID))
	if h := connect(full); h.err != nil {
		t.Fatalf("intermediate chain: %v", h.err)
	}
	svid, _ := w.client.GetX509SVID()
	stranger := identitytest.NewCA(t, trustDomain).NewIntermediate(t)
	forged := *svid
	forged.Certificates = append(forged.Certificates[:1:1], stranger.Cert())
	w.client.SetSVID(&forged)
	before = identity.ChainCacheHits(w.serverTL)
	wantRefused(t, "server", connect(full), identity.ClassUnknownCA, "not signed by a CA of the trust bundle")
	if identity.ChainCacheHits(w.serverTL) != before {
		t.Fatal("cache answered for a leaf presented with another chain")
	}
}
