package devca

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Federation: a development CA can serve the bundles of other trust domains
// next to its own, as SPIRE serves the bundles of the trust domains it
// federates with: in every X.509-SVID response's federated_bundles and in the
// X.509 bundles stream. A second CA for the foreign trust domain issues the
// SVIDs of its workloads (New with that trust domain), so tests and
// `latch demo` can show a federated peer verified and admitted.

// SetFederatedBundle serves b as the federated bundle of b's trust domain,
// replacing any it served before, and pushes it to every connected stream.
// The CA does not look inside: a federated bundle holding this CA's own
// certificate is served as given, so the consumers' refusal of it can be
// tested.
func (ca *CA) SetFederatedBundle(b *x509bundle.Bundle) error {
	if b.TrustDomain() == ca.td {
		return fmt.Errorf("devca: %q is this CA's own trust domain, not a federated one", ca.td.Name())
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return ErrClosed
	}
	ca.setFederatedLocked(b)
	return nil
}

func (ca *CA) setFederatedLocked(b *x509bundle.Bundle) {
	if prev, ok := ca.federated[b.TrustDomain()]; ok && bytes.Equal(bundleDER(prev), bundleDER(b)) {
		return
	}
	ca.federated[b.TrustDomain()] = b.Clone()
	ca.bundleGen++
	ca.log.Info("serving federated bundle", "federated_trust_domain", b.TrustDomain().Name(), "cas", len(b.X509Authorities()))
	ca.notifyLocked()
}

// RemoveFederatedBundle stops serving the federated bundle of td (and stops
// following the CA it came from, see FederateWith). Workloads see the bundle
// gone from their next X.509 context on.
func (ca *CA) RemoveFederatedBundle(td spiffeid.TrustDomain) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if stop, ok := ca.following[td]; ok {
		close(stop)
		delete(ca.following, td)
	}
	if _, ok := ca.federated[td]; !ok {
		return
	}
	delete(ca.federated, td)
	ca.bundleGen++
	ca.log.Warn("federated bundle removed", "federated_trust_domain", td.Name(), "warning", Warning)
	ca.notifyLocked()
}

// FederatedTrustDomains lists the trust domains whose bundles the CA serves
// as federated, by name.
func (ca *CA) FederatedTrustDomains() []spiffeid.TrustDomain {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	return slices.SortedFunc(maps.Keys(ca.federated), func(a, b spiffeid.TrustDomain) int { return strings.Compare(a.Name(), b.Name()) })
}

// FederateWith serves other's bundle as federated and follows it through
// other's rollovers (a new CA published, an old one dropped), until
// RemoveFederatedBundle(other.TrustDomain()) or either CA closes. Federation
// is one-way: other's workloads trust this CA's only after
// other.FederateWith(ca).
func (ca *CA) FederateWith(other *CA) error {
	if other.td == ca.td {
		return fmt.Errorf("devca: cannot federate trust domain %q with itself", ca.td.Name())
	}
	events, unsubscribe := other.Subscribe(16)
	stop := make(chan struct{})
	ca.mu.Lock()
	if ca.closed {
		ca.mu.Unlock()
		unsubscribe()
		return ErrClosed
	}
	if prev, ok := ca.following[other.td]; ok {
		close(prev)
	}
	ca.following[other.td] = stop
	ca.mu.Unlock()
	// Set after the subscription: a change between the two arrives as an
	// event and is set again.
	if err := ca.SetFederatedBundle(other.Bundle()); err != nil {
		unsubscribe()
		return err
	}
	ca.wg.Go(func() {
		defer unsubscribe()
		for {
			select {
			case _, ok := <-events:
				if !ok {
					return // other closed: keep serving its last bundle
				}
				// Events can be dropped under load; the bundle read now is
				// current whatever was missed. It is read before taking
				// ca.mu: two CAs federating both ways would otherwise each
				// hold its own lock waiting for the other's.
				b := other.Bundle()
				ca.mu.Lock()
				if ca.following[other.td] == stop && !ca.closed {
					ca.setFederatedLocked(b)
				}
				ca.mu.Unlock()
			case <-stop:
				return
			case <-ca.done:
				return
			}
		}
	})
	return nil
}

// SetFederatedBundleEntry serves b in the federated bundles of every
// response under key exactly as given, in place of what SetFederatedBundle
// serves under the same key: key may name this CA's own trust domain, or
// another in another spelling ("spiffe://example.org" or "example.org"). No
// SPIRE agent sends such an entry; a broken or compromised one could, and
// this lets the consumers' refusal be tested. A nil b stops serving key.
func (ca *CA) SetFederatedBundleEntry(key string, b *x509bundle.Bundle) error {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return ErrClosed
	}
	if b == nil {
		delete(ca.entries, key)
	} else {
		ca.entries[key] = bundleDER(b)
	}
	ca.bundleGen++
	ca.log.Warn("serving a federated bundle entry as given", "key", key, "warning", Warning)
	ca.notifyLocked()
	return nil
}

// federatedDERLocked is every federated bundle as the Workload API carries
// it, keyed by the trust domain's SPIFFE ID.
func (ca *CA) federatedDERLocked() map[string][]byte {
	if len(ca.federated) == 0 && len(ca.entries) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(ca.federated)+len(ca.entries))
	for td, b := range ca.federated {
		out[td.IDString()] = bundleDER(b)
	}
	maps.Copy(out, ca.entries)
	return out
}

func bundleDER(b *x509bundle.Bundle) []byte {
	var der []byte
	for _, c := range b.X509Authorities() {
		der = append(der, c.Raw...)
	}
	return der
}
