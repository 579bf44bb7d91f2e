package identity

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Source yields the workload's current X.509-SVID and the trust bundles to
// verify peers with. *WorkloadSource satisfies it; so do *workloadapi.X509Source and
// identitytest.Source.
type Source interface {
	x509svid.Source
	x509bundle.Source
}

// clientSessionCacheSize bounds the TLS 1.3 tickets a sidecar keeps for
// resuming connections to upstreams: one per upstream address is enough, and
// the LRU evicts the rest.
const clientSessionCacheSize = 1024

// TLS builds the tls.Configs of every latch connection from one Source. The
// certificate is looked up per handshake and the peer is verified against the
// bundle current at that handshake, so SVID rotation and CA rollover need no
// new configuration and leave live connections alone.
//
// Peers are verified and authorized in tls.Config.VerifyConnection, which Go
// calls on every handshake, resumed ones included (the peer's certificates
// then come from the session ticket). Session resumption therefore stays on:
// a resumed session is held to the current bundle, clock and policy exactly
// like a full handshake. What makes that cheap is the chain cache: a chain
// that verified against the same bundle authorities, and is still inside its
// validity, is not checked for signatures again (see chainCache).
type TLS struct {
	src      Source
	sessions tls.ClientSessionCache
	now      func() time.Time
	cert     atomic.Pointer[servedCert]
	chains   chainCache
}

// servedCert caches the tls.Certificate built from one SVID, so handshakes do
// not rebuild it until the Source hands out a new SVID.
type servedCert struct {
	svid *x509svid.SVID
	cert *tls.Certificate
}

// NewTLS returns a TLS serving certificates and bundles from src. All client
// configurations it builds share one session cache.
func NewTLS(src Source) *TLS {
	return &TLS{
		src:      src,
		sessions: tls.NewLRUClientSessionCache(clientSessionCacheSize),
		now:      time.Now,
	}
}

// PeerOption widens what a configuration accepts of the other side beyond
// the local trust domain. Without options, only peers of the local trust
// domain are verified and everything else is refused.
type PeerOption func(*peerPolicy)

type peerPolicy struct {
	// federated returns, at each handshake, the foreign trust domains whose
	// peers are accepted, each verified against its own bundle.
	federated func() []spiffeid.TrustDomain
}

func newPeerPolicy(opts []PeerOption) peerPolicy {
	var p peerPolicy
	for _, o := range opts {
		o(&p)
	}
	return p
}

// accepts reports whether peers of td may be verified: the local trust
// domain always, a foreign one when the configuration federates with it.
func (p peerPolicy) accepts(td, local spiffeid.TrustDomain) bool {
	if td == local {
		return true
	}
	return p.federated != nil && slices.Contains(p.federated(), td)
}

// FederatesWith accepts peers of the foreign trust domains tds besides the
// local one. A peer of one of them is verified against that trust domain's
// bundle from the Source (a federated bundle of the Workload API), never
// against another's; authorization still decides which of its IDs may
// connect.
func FederatesWith(tds ...spiffeid.TrustDomain) PeerOption {
	tds = slices.Clone(tds)
	return FederatesWithFunc(func() []spiffeid.TrustDomain { return tds })
}

// FederatesWithFunc is FederatesWith with the list asked for at every
// handshake, so it can follow configuration changes the way an authorize
// function does.
func FederatesWithFunc(federated func() []spiffeid.TrustDomain) PeerOption {
	return func(p *peerPolicy) { p.federated = federated }
}

// ServerConfig returns the configuration of an mTLS server: it presents the
// current SVID, requires a client certificate, verifies it as an X.509-SVID of
// the local trust domain (or of a trust domain it federates with, see
// PeerOption), and lets authorize decide on the verified peer ID. A nil
// authorize refuses everyone. Errors returned by authorize are reported
// wrapping ErrNotAllowed.
func (t *TLS) ServerConfig(p Profile, authorize func(peer spiffeid.ID) error, opts ...PeerOption) *tls.Config {
	pol := newPeerPolicy(opts)
	c := &tls.Config{
		// Go only checks that a certificate was sent and proves possession of
		// its key; verification is VerifyConnection's, against the SPIFFE
		// bundle, never a CA pool of Go's.
		ClientAuth:     tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return t.certificate() },
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := t.verifyPeer(cs, x509.ExtKeyUsageClientAuth, pol)
			if err != nil {
				return err
			}
			return authorizePeer(id, cs.DidResume, authorize)
		},
	}
	safeProfile(p).Apply(c)
	return c
}

// ClientConfig returns the configuration of an mTLS client: it presents the
// current SVID and accepts only a server that proves serverID with an
// X.509-SVID of the local trust domain, or of a trust domain it federates
// with (see PeerOption). A zero serverID refuses every server.
func (t *TLS) ClientConfig(p Profile, serverID spiffeid.ID, opts ...PeerOption) *tls.Config {
	pol := newPeerPolicy(opts)
	c := &tls.Config{
		// InsecureSkipVerify turns off Go's web-PKI checks (system roots,
		// DNS names), which mean nothing for SPIFFE IDs. It does not turn off
		// VerifyConnection, which Go runs on every handshake regardless and
		// which does the SPIFFE verification below.
		InsecureSkipVerify:   true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return t.certificate() },
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := t.verifyPeer(cs, x509.ExtKeyUsageServerAuth, pol)
			if err != nil {
				return err
			}
			return checkServerID(id, serverID, cs.DidResume)
		},
		ClientSessionCache: t.sessions,
	}
	safeProfile(p).Apply(c)
	return c
}

// LocalTrustDomain is the trust domain of the current SVID: the one whose
// peers every configuration accepts.
func (t *TLS) LocalTrustDomain() (spiffeid.TrustDomain, error) {
	svid, err := t.src.GetX509SVID()
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("getting the local X.509-SVID: %w", err)
	}
	return svid.ID.TrustDomain(), nil
}

// TrustDomainUsable reports whether peers of td can be verified now: td is
// the local trust domain, or the Source holds a bundle for it that passes
// CheckFederatedBundle. The proxy asks it after every change of the bundles,
// to cut the live connections of peers whose trust domain's bundle is gone.
func (t *TLS) TrustDomainUsable(td spiffeid.TrustDomain) error {
	local, err := t.src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("getting the local X.509-SVID: %w", err)
	}
	if td == local.ID.TrustDomain() {
		return nil
	}
	_, err = t.federatedBundle(td, local.ID.TrustDomain())
	return err
}

// federatedBundle returns the bundle of foreign trust domain td, unless the
// Source has none or it fails CheckFederatedBundle.
func (t *TLS) federatedBundle(td, local spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := t.src.GetX509BundleForTrustDomain(td)
	if err != nil {
		return nil, fmt.Errorf("no bundle of trust domain %q from the Workload API (not federated with this workload, or its bundle was removed): %w", td.Name(), err)
	}
	lb, err := t.src.GetX509BundleForTrustDomain(local)
	if err != nil {
		return nil, fmt.Errorf("getting the bundle of the local trust domain %q: %w", local.Name(), err)
	}
	if err := CheckFederatedBundle(b, lb); err != nil {
		return nil, err
	}
	return b, nil
}

// ErrFederatedBundleHoldsLocalCA is wrapped by CheckFederatedBundle's
// refusal.
var ErrFederatedBundleHoldsLocalCA = errors.New("federated bundle holds a CA of the local trust domain")

// CheckFederatedBundle refuses the bundle of a foreign trust domain that
// holds a CA of the local bundle (the same public key, whatever certificate
// wraps it). Such a bundle would let the local trust domain's CA vouch for
// the foreign trust domain's identities, which that trust domain never
// granted: it is a copy-paste of the wrong bundle, or a bundle endpoint
// turned against us. The whole bundle is refused, not just the overlapping
// CA: the rest came from the same source. (docs/security.md, "Federation".)
func CheckFederatedBundle(foreign, local *x509bundle.Bundle) error {
	for _, fa := range foreign.X509Authorities() {
		for _, la := range local.X509Authorities() {
			if bytes.Equal(fa.RawSubjectPublicKeyInfo, la.RawSubjectPublicKeyInfo) {
				return fmt.Errorf("bundle of trust domain %q refused: %w %q (CA %q): a trust domain's bundle may hold only its own CAs",
					foreign.TrustDomain().Name(), ErrFederatedBundleHoldsLocalCA, local.TrustDomain().Name(), la.Subject.String())
			}
		}
	}
	return nil
}

// LocalCertificate returns the leaf of the current SVID: what a handshake
// starting now would present. DescribeConnectionLocal uses it for the fields
// a connection state does not hold about its own side.
func (t *TLS) LocalCertificate() (*x509.Certificate, error) {
	svid, err := t.src.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("getting the local X.509-SVID: %w", err)
	}
	if len(svid.Certificates) == 0 {
		return nil, errors.New("getting the local X.509-SVID: it holds no certificate")
	}
	return svid.Certificates[0], nil
}

func (t *TLS) certificate() (*tls.Certificate, error) {
	svid, err := t.src.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("getting the local X.509-SVID: %w", err)
	}
	if sc := t.cert.Load(); sc != nil && sc.svid == svid {
		return sc.cert, nil
	}
	if len(svid.Certificates) == 0 {
		return nil, errors.New("local X.509-SVID holds no certificate")
	}
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	t.cert.Store(&servedCert{svid: svid, cert: cert})
	return cert, nil
}

// verifyPeer checks that cs's peer presented an X.509-SVID of the local trust
// domain or of a trust domain pol federates with, valid now, that chains to
// the current bundle of the trust domain its own ID names and is fit for the
// role named by eku. It returns the peer's SPIFFE ID, whose trust domain is
// therefore the one whose bundle verified it.
//
// The bundle is chosen by the peer's ID and by nothing else: a certificate
// claiming trust domain A is checked against A's bundle only, so a CA of B
// can never vouch for an identity of A.
func (t *TLS) verifyPeer(cs tls.ConnectionState, eku x509.ExtKeyUsage, pol peerPolicy) (spiffeid.ID, error) {
	fail := func(class Class, peer spiffeid.ID, format string, args ...any) error {
		return &VerifyError{Class: class, Peer: peer, Resumed: cs.DidResume, Err: fmt.Errorf(format, args...)}
	}

	local, err := t.src.GetX509SVID()
	if err != nil {
		return spiffeid.ID{}, fail(ClassOther, spiffeid.ID{}, "verifying peer: getting the local X.509-SVID: %w", err)
	}
	td := local.ID.TrustDomain()
	if td.IsZero() {
		return spiffeid.ID{}, fail(ClassOther, spiffeid.ID{}, "verifying peer: local X.509-SVID has no SPIFFE ID")
	}

	certs := cs.PeerCertificates
	if len(certs) == 0 {
		return spiffeid.ID{}, fail(ClassBadSVID, spiffeid.ID{}, "peer presented no certificate")
	}
	leaf := certs[0]

	// Identity: exactly one URI SAN, a SPIFFE ID naming a workload.
	switch n := len(leaf.URIs); {
	case n == 0:
		return spiffeid.ID{}, fail(ClassBadSVID, spiffeid.ID{}, "peer certificate: no URI SAN, so no SPIFFE ID (subject %q)", leaf.Subject.String())
	case n > 1:
		return spiffeid.ID{}, fail(ClassBadSVID, spiffeid.ID{}, "peer certificate: %d URI SANs (%s), an X.509-SVID has exactly one", n, joinURIs(leaf))
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return spiffeid.ID{}, fail(ClassBadSVID, spiffeid.ID{}, "peer certificate: URI SAN %q is not a SPIFFE ID: %w", leaf.URIs[0].String(), err)
	}
	if err := checkSANSpelling(leaf, id); err != nil {
		return spiffeid.ID{}, fail(ClassBadSVID, spiffeid.ID{}, "peer certificate: %w", err)
	}
	if id.Path() == "" {
		return id, fail(ClassBadSVID, id, "peer %s: the ID of a trust domain, not of a workload", id)
	}

	peerTD := id.TrustDomain()
	if !pol.accepts(peerTD, td) {
		if pol.federated == nil {
			return id, fail(ClassWrongTrustDomain, id, "peer %s: trust domain %q is not the local trust domain %q", id, peerTD.Name(), td.Name())
		}
		return id, fail(ClassWrongTrustDomain, id, "peer %s: trust domain %q is neither the local trust domain %q nor one this configuration federates with (%s)",
			id, peerTD.Name(), td.Name(), joinTrustDomains(pol.federated()))
	}

	// Shape of a leaf fit for the role.
	if leaf.IsCA {
		return id, fail(ClassBadSVID, id, "peer %s: certificate is a CA certificate (basicConstraints CA:TRUE), not a leaf", id)
	}
	if err := checkKeyUsage(leaf, eku); err != nil {
		return id, fail(ClassBadKeyUsage, id, "peer %s: %w", id, err)
	}

	// The rest of the chain: signing certificates only (X509-SVID spec 4.3).
	// Go's verifier would skip a misfit one and report an unknown CA; saying
	// what is wrong with it is kinder to whoever has to fix the issuer.
	for _, c := range certs[1:] {
		if !c.IsCA {
			return id, fail(ClassBadSVID, id, "peer %s: chain certificate %q is not a CA certificate", id, c.Subject.String())
		}
		if c.KeyUsage&x509.KeyUsageCertSign == 0 {
			return id, fail(ClassBadKeyUsage, id, "peer %s: issuing CA %q: key usage lacks keyCertSign", id, c.Subject.String())
		}
	}

	// Chain to the current bundle of the peer's own trust domain, at the
	// current time. A federated bundle is checked before the chain cache is
	// asked, so a bundle refused now is refused for every chain.
	var bundle *x509bundle.Bundle
	if peerTD == td {
		if bundle, err = t.src.GetX509BundleForTrustDomain(td); err != nil {
			return id, fail(ClassOther, id, "verifying peer %s: getting the bundle of %q: %w", id, td.Name(), err)
		}
	} else if bundle, err = t.federatedBundle(peerTD, td); err != nil {
		return id, fail(ClassUnknownCA, id, "peer %s: %w", id, err)
	}
	now := t.now()
	authorities := bundle.X509Authorities()
	if t.chains.verified(certs, peerTD, authorities, now) {
		return id, nil
	}
	// x509svid.Verify looks the bundle up by the leaf's trust domain itself;
	// given this one bundle, it can use no other.
	_, chains, err := x509svid.Verify(certs, bundle, x509svid.WithTime(now))
	if err != nil {
		return id, chainError(fail, id, peerTD, certs, bundle, now, err)
	}
	t.chains.add(certs, peerTD, authorities, chains[0])
	return id, nil
}

func joinTrustDomains(tds []spiffeid.TrustDomain) string {
	if len(tds) == 0 {
		return "none"
	}
	s := make([]string, len(tds))
	for i, td := range tds {
		s[i] = td.Name()
	}
	return strings.Join(s, ", ")
}

// chainError turns a chain verification failure into the class that explains
// it best. A time failure in a chain that would not verify at any time is
// reported as unknown_ca: the missing trust is the real problem.
func chainError(fail func(Class, spiffeid.ID, string, ...any) error, id spiffeid.ID, td spiffeid.TrustDomain,
	certs []*x509.Certificate, bundle *x509bundle.Bundle, now time.Time, err error) error {
	unknownCA := func() error {
		return fail(ClassUnknownCA, id, "peer %s: certificate not signed by a CA of the trust bundle of %q (issuer %q)", id, td.Name(), certs[0].Issuer.String())
	}
	if ci, ok := errors.AsType[x509.CertificateInvalidError](err); ok && ci.Reason == x509.Expired && ci.Cert != nil {
		c := ci.Cert
		at := c.NotAfter
		if now.Before(c.NotBefore) {
			at = c.NotBefore
		}
		if _, _, err2 := x509svid.Verify(certs, bundle, x509svid.WithTime(at)); err2 != nil {
			if _, ok := errors.AsType[x509.UnknownAuthorityError](err2); ok {
				return unknownCA()
			}
		}
		what := "certificate"
		if c != certs[0] {
			what = fmt.Sprintf("issuing CA %q", c.Subject.String())
		}
		if now.Before(c.NotBefore) {
			return fail(ClassNotYetValid, id, "peer %s: %s not valid before %s (now %s)", id, what, rfc3339(c.NotBefore), rfc3339(now))
		}
		return fail(ClassExpired, id, "peer %s: %s expired at %s (now %s)", id, what, rfc3339(c.NotAfter), rfc3339(now))
	}
	if _, ok := errors.AsType[x509.UnknownAuthorityError](err); ok {
		return unknownCA()
	}
	return fail(ClassBadSVID, id, "peer %s: chain does not verify: %w", id, err)
}

// checkKeyUsage holds the leaf to the X.509-SVID profile: digitalSignature,
// neither keyCertSign nor cRLSign, and an extended key usage for the role.
//
// An SVID without the extended key usage extension is refused, although the
// X.509-SVID specification only says SHOULD: every SPIFFE issuer we know of
// (SPIRE, Istio, cert-manager) sets serverAuth and clientAuth, and requiring
// the role keeps a certificate issued for another purpose out. anyExtendedKeyUsage
// is not accepted in their place for the same reason.
func checkKeyUsage(leaf *x509.Certificate, eku x509.ExtKeyUsage) error {
	switch {
	case leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0:
		return errors.New("key usage lacks digitalSignature")
	case leaf.KeyUsage&x509.KeyUsageCertSign != 0:
		return errors.New("key usage has keyCertSign, which a leaf must not have")
	case leaf.KeyUsage&x509.KeyUsageCRLSign != 0:
		return errors.New("key usage has cRLSign, which a leaf must not have")
	}
	if len(leaf.ExtKeyUsage) == 0 && len(leaf.UnknownExtKeyUsage) == 0 {
		return fmt.Errorf("no extended key usage; %s is required", ekuName(eku))
	}
	if !slices.Contains(leaf.ExtKeyUsage, eku) {
		return fmt.Errorf("extended key usage lacks %s", ekuName(eku))
	}
	return nil
}

func ekuName(eku x509.ExtKeyUsage) string {
	switch eku {
	case x509.ExtKeyUsageServerAuth:
		return "serverAuth"
	case x509.ExtKeyUsageClientAuth:
		return "clientAuth"
	}
	return fmt.Sprintf("ExtKeyUsage(%d)", int(eku))
}

func authorizePeer(id spiffeid.ID, resumed bool, authorize func(spiffeid.ID) error) error {
	var err error
	if authorize == nil {
		err = fmt.Errorf("peer %s: %w (no authorization policy: deny all)", id, ErrNotAllowed)
	} else if err = authorize(id); err != nil && !errors.Is(err, ErrNotAllowed) {
		err = fmt.Errorf("peer %s: %w: %w", id, ErrNotAllowed, err)
	}
	if err != nil {
		return &VerifyError{Class: ClassNotAllowed, Peer: id, Resumed: resumed, Err: err}
	}
	return nil
}

func checkServerID(id, want spiffeid.ID, resumed bool) error {
	if want.IsZero() {
		return &VerifyError{Class: ClassWrongServerID, Peer: id, Resumed: resumed,
			Err: fmt.Errorf("server %s: no expected server ID configured: refusing every server", id)}
	}
	if id != want {
		return &VerifyError{Class: ClassWrongServerID, Peer: id, Resumed: resumed,
			Err: fmt.Errorf("server %s: expected %s", id, want)}
	}
	return nil
}

// PeerID returns the SPIFFE ID of the peer of a connection whose handshake one
// of latch's configurations completed, and so verified. It does not verify
// anything itself.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if !cs.HandshakeComplete {
		return spiffeid.ID{}, errors.New("peer ID: handshake not complete")
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer ID: peer presented no certificate")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer ID: %w", err)
	}
	return id, nil
}

// safeProfile guards the one place a Profile becomes a tls.Config: the zero
// Profile means modern, and whatever a hand-built Profile asks for, nothing
// below TLS 1.2 and no suite outside the intermediate profile's is applied.
func safeProfile(p Profile) Profile {
	if p.MinVersion == 0 && p.MaxVersion == 0 {
		return Modern()
	}
	p = p.clone()
	if p.MinVersion < tls.VersionTLS12 {
		p.MinVersion = tls.VersionTLS12
	}
	if p.MaxVersion != 0 && p.MaxVersion < p.MinVersion {
		p.MaxVersion = p.MinVersion
	}
	allowed := Intermediate().CipherSuites
	p.CipherSuites = slices.DeleteFunc(p.CipherSuites, func(s uint16) bool { return !slices.Contains(allowed, s) })
	if p.MinVersion <= tls.VersionTLS12 && len(p.CipherSuites) == 0 {
		// Nothing acceptable left for TLS 1.2: narrow rather than widen.
		p.MinVersion = tls.VersionTLS13
		if p.MaxVersion < p.MinVersion {
			p.MaxVersion = p.MinVersion
		}
	}
	return p
}

func joinURIs(c *x509.Certificate) string {
	s := make([]string, len(c.URIs))
	for i, u := range c.URIs {
		s[i] = u.String()
	}
	return strings.Join(s, ", ")
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339) }
