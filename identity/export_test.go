package identity

import (
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ChainCacheHits is how many peer chains were accepted from the cache.
func ChainCacheHits(t *TLS) uint64 { return t.chains.hits.Load() }

// SetClock replaces the clock peers are verified at. Call it before any
// handshake.
func SetClock(t *TLS, now func() time.Time) { t.now = now }

// ChainCacheVerified and ChainCacheAdd reach the verified-chain cache of t.
func ChainCacheVerified(t *TLS, certs []*x509.Certificate, td spiffeid.TrustDomain, authorities []*x509.Certificate, now time.Time) bool {
	return t.chains.verified(certs, td, authorities, now)
}

func ChainCacheAdd(t *TLS, certs []*x509.Certificate, td spiffeid.TrustDomain, authorities, chain []*x509.Certificate) {
	t.chains.add(certs, td, authorities, chain)
}
