package identitytest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Source is an x509svid.Source and x509bundle.Source whose SVID and bundles can
// be replaced at any time, concurrently with handshakes that read them: it
// stands in for a Workload API X509Source in rotation and rollover tests.
type Source struct {
	mu      sync.RWMutex
	svid    *x509svid.SVID
	bundles map[spiffeid.TrustDomain]*x509bundle.Bundle
}

var (
	_ x509svid.Source   = (*Source)(nil)
	_ x509bundle.Source = (*Source)(nil)
)

// NewSource returns a Source serving svid (which may be nil: GetX509SVID then
// fails) and the given bundles, one per trust domain.
func NewSource(svid *x509svid.SVID, bundles ...*x509bundle.Bundle) *Source {
	s := &Source{svid: svid, bundles: make(map[spiffeid.TrustDomain]*x509bundle.Bundle)}
	for _, b := range bundles {
		s.bundles[b.TrustDomain()] = b.Clone()
	}
	return s
}

// SetSVID replaces the SVID served from the next GetX509SVID on.
func (s *Source) SetSVID(svid *x509svid.SVID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.svid = svid
}

// SetBundle replaces the bundle of b's trust domain (adding it if absent). The
// Source keeps a copy, so the caller may go on changing b.
func (s *Source) SetBundle(b *x509bundle.Bundle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bundles[b.TrustDomain()] = b.Clone()
}

// RemoveBundle drops the bundle of td: verification against td fails from then
// on.
func (s *Source) RemoveBundle(td spiffeid.TrustDomain) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.bundles, td)
}

// GetX509SVID returns the current SVID.
func (s *Source) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.svid == nil {
		return nil, errors.New("identitytest: no SVID set")
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain returns a copy of the current bundle of td.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	b, ok := s.bundles[td]
	if !ok {
		return nil, fmt.Errorf("identitytest: no bundle for trust domain %q", td)
	}
	return b.Clone(), nil
}

// X509Bundles returns a copy of every bundle held, ordered by trust domain
// name, as identity.WorkloadSource lists the local and federated bundles.
func (s *Source) X509Bundles() []*x509bundle.Bundle {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*x509bundle.Bundle, 0, len(s.bundles))
	for _, b := range s.bundles {
		out = append(out, b.Clone())
	}
	slices.SortFunc(out, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	return out
}
