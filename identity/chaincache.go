package identity

import (
	"bytes"
	"crypto/x509"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// chainCacheSize bounds the verified chains a TLS remembers. A sidecar sees
// one leaf per peer workload and SVID generation; when the map is full it is
// emptied, which costs one signature check per peer and needs no bookkeeping.
const chainCacheSize = 4096

// chainCache remembers peer chains that verified against a bundle, so that
// the next handshake presenting the same chain (a resumed session, whose
// certificates come from the ticket, or the peer's next full handshake) skips
// the signature checks. Those are the costliest step of a resumed handshake
// after the key exchange (≈9% of a sidecar's CPU at a high connection rate).
//
// An entry answers only for the exact certificates (DER) it was made from,
// against a bundle holding exactly the same authorities, at a time inside
// the validity of every certificate of the chain that verified. Anything else
// is a miss and goes through x509svid.Verify, which also produces the error
// class of a refusal. Only successes are cached: a refused peer costs a full
// verification every time, as before.
type chainCache struct {
	mu      sync.Mutex
	entries map[string]*chainEntry // key: the leaf's DER
	hits    atomic.Uint64
}

type chainEntry struct {
	trustDomain   spiffeid.TrustDomain // whose bundle verified the chain
	intermediates [][]byte             // DER of the certificates after the leaf, as presented
	authorities   []*x509.Certificate  // the bundle's authorities when the chain verified
	notBefore     time.Time            // latest NotBefore of the verified chain
	notAfter      time.Time            // earliest NotAfter of the verified chain
}

// verified reports whether certs verified before against the bundle of td
// with the same authorities and is still inside its validity window at now.
//
// The trust domain is part of the answer, not only the authorities: two
// trust domains' bundles may hold the same CA (CheckFederatedBundle refuses
// a foreign bundle holding a local CA, but two foreign bundles may share
// one), and a chain verified for one trust domain proves nothing for the
// other. Today the leaf's own ID fixes the trust domain, so the two can
// only differ if a caller passes another: the check keeps that so.
func (c *chainCache) verified(certs []*x509.Certificate, td spiffeid.TrustDomain, authorities []*x509.Certificate, now time.Time) bool {
	c.mu.Lock()
	e := c.entries[string(certs[0].Raw)]
	c.mu.Unlock()
	if e == nil || e.trustDomain != td || now.Before(e.notBefore) || now.After(e.notAfter) || len(e.intermediates) != len(certs)-1 {
		return false
	}
	for i, der := range e.intermediates {
		if !bytes.Equal(der, certs[i+1].Raw) {
			return false
		}
	}
	if !sameAuthorities(e.authorities, authorities) {
		return false
	}
	c.hits.Add(1)
	return true
}

// add records that certs verified as chain (leaf first, root last) against
// the bundle of td holding authorities.
func (c *chainCache) add(certs []*x509.Certificate, td spiffeid.TrustDomain, authorities []*x509.Certificate, chain []*x509.Certificate) {
	if len(chain) == 0 {
		return
	}
	e := &chainEntry{trustDomain: td, authorities: authorities, notBefore: chain[0].NotBefore, notAfter: chain[0].NotAfter}
	for _, cert := range chain[1:] {
		if cert.NotBefore.After(e.notBefore) {
			e.notBefore = cert.NotBefore
		}
		if cert.NotAfter.Before(e.notAfter) {
			e.notAfter = cert.NotAfter
		}
	}
	for _, cert := range certs[1:] {
		e.intermediates = append(e.intermediates, cert.Raw)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil || len(c.entries) >= chainCacheSize {
		c.entries = make(map[string]*chainEntry)
	}
	c.entries[string(certs[0].Raw)] = e
}

// sameAuthorities compares two bundles' authorities in order. Sources hand
// out the same certificate values until the bundle changes, so the pointer
// test settles almost every comparison; the DER comparison covers sources
// that copy.
func sameAuthorities(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] && !bytes.Equal(a[i].Raw, b[i].Raw) {
			return false
		}
	}
	return true
}
