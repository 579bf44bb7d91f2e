package identitytest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// CA is an in-memory certificate authority for one trust domain. A CA made by
// NewCA is a self-signed root; one made by NewIntermediate is signed by its
// parent, and the leaves it issues carry it in their chain.
type CA struct {
	td    spiffeid.TrustDomain
	cert  *x509.Certificate
	key   crypto.Signer
	root  *CA                 // the root at the top of this CA's chain (itself for a root)
	chain []*x509.Certificate // this CA and its intermediate parents, up to but excluding the root
}

// NewCA returns a fresh self-signed ECDSA P-256 root CA for trustDomain (a
// bare name such as "mesh.test"), valid from an hour ago for a day.
func NewCA(t testing.TB, trustDomain string) *CA {
	t.Helper()
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		t.Fatalf("identitytest: trust domain %q: %v", trustDomain, err)
	}
	key := newKey(t)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(t),
		Subject:               pkix.Name{Organization: []string{"latch identitytest"}, CommonName: "root CA " + td.Name()},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	cert := sign(t, tmpl, tmpl, key.Public(), key)
	ca := &CA{td: td, cert: cert, key: key}
	ca.root = ca
	return ca
}

// NewIntermediate returns a CA signed by ca in the same trust domain. Leaves
// issued by the intermediate present [leaf, intermediate, ...] as their chain;
// the bundle stays the root's. Of the options, the validity ones (NotBefore,
// NotAfter, Expired, NotYetValid) and KeyUsage apply to the intermediate's
// certificate (default: valid from an hour ago for 23 hours, keyCertSign,
// cRLSign and digitalSignature).
func (ca *CA) NewIntermediate(t testing.TB, opts ...LeafOption) *CA {
	t.Helper()
	now := time.Now()
	l := &leaf{
		notBefore: now.Add(-time.Hour),
		notAfter:  now.Add(23 * time.Hour),
		keyUsage:  x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	for _, o := range opts {
		o(l)
	}
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(t),
		Subject:               pkix.Name{Organization: []string{"latch identitytest"}, CommonName: "intermediate CA " + ca.td.Name()},
		URIs:                  []*url.URL{ca.td.ID().URL()},
		NotBefore:             l.notBefore,
		NotAfter:              l.notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              l.keyUsage,
	}
	cert := sign(t, tmpl, ca.cert, key.Public(), ca.key)
	return &CA{
		td:    ca.td,
		cert:  cert,
		key:   key,
		root:  ca.root,
		chain: append([]*x509.Certificate{cert}, ca.chain...),
	}
}

// TrustDomain is the trust domain the CA was made for.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// Cert is the CA's own certificate.
func (ca *CA) Cert() *x509.Certificate { return ca.cert }

// Bundle returns a new bundle for the CA's trust domain holding the root
// certificate. Each call returns a fresh bundle the caller may change.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.root.cert})
}

// BundleFor returns a bundle that claims trustDomain but holds this CA's root:
// the trust a peer would place in a foreign CA it federates with.
func (ca *CA) BundleFor(trustDomain spiffeid.TrustDomain) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(trustDomain, []*x509.Certificate{ca.root.cert})
}

// Source returns a Source serving a fresh SVID for id and the CA's bundle.
func (ca *CA) Source(t testing.TB, id string, opts ...LeafOption) *Source {
	t.Helper()
	return NewSource(ca.SVID(t, id, opts...), ca.Bundle())
}

// SVID issues a leaf for id ("" for none) with the SPIFFE defaults, changed by
// opts. The result is built directly, not through x509svid.Parse, so it may
// be as broken as the options ask; its ID is the first URI SAN that parses as
// a SPIFFE ID, or zero.
func (ca *CA) SVID(t testing.TB, id string, opts ...LeafOption) *x509svid.SVID {
	t.Helper()
	certs, key := ca.issue(t, id, opts)
	svid := &x509svid.SVID{Certificates: certs, PrivateKey: key}
	for _, u := range certs[0].URIs {
		if sid, err := spiffeid.FromURI(u); err == nil {
			svid.ID = sid
			break
		}
	}
	return svid
}

// TLSCertificate issues a leaf like SVID and returns it as a tls.Certificate
// with the chain in Certificate and the parsed leaf in Leaf.
func (ca *CA) TLSCertificate(t testing.TB, id string, opts ...LeafOption) tls.Certificate {
	t.Helper()
	certs, key := ca.issue(t, id, opts)
	out := tls.Certificate{PrivateKey: key, Leaf: certs[0]}
	for _, c := range certs {
		out.Certificate = append(out.Certificate, c.Raw)
	}
	return out
}

func (ca *CA) issue(t testing.TB, id string, opts []LeafOption) ([]*x509.Certificate, crypto.Signer) {
	t.Helper()
	now := time.Now()
	l := &leaf{
		notBefore: now.Add(-time.Minute),
		notAfter:  now.Add(time.Hour),
		keyUsage:  x509.KeyUsageDigitalSignature,
		extKeyUsage: []x509.ExtKeyUsage{
			x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth,
		},
	}
	if id != "" {
		l.uris = []string{id}
	}
	for _, o := range opts {
		o(l)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(t),
		Subject:               pkix.Name{Organization: []string{"latch identitytest"}},
		NotBefore:             l.notBefore,
		NotAfter:              l.notAfter,
		KeyUsage:              l.keyUsage,
		ExtKeyUsage:           l.extKeyUsage,
		DNSNames:              l.dnsNames,
		BasicConstraintsValid: true,
		IsCA:                  l.isCA,
	}
	for _, s := range l.uris {
		// Written into the certificate byte for byte: url.Parse and String
		// would lower-case the scheme and undo percent-encoding in the host,
		// and a test of how a peer's SAN is read needs the spelling it gave.
		scheme, rest, ok := strings.Cut(s, ":")
		if !ok || scheme == "" {
			t.Fatalf("identitytest: URI SAN %q: no scheme", s)
		}
		tmpl.URIs = append(tmpl.URIs, &url.URL{Scheme: scheme, Opaque: rest})
	}
	var key crypto.Signer = newKey(t)
	if l.rsaBits > 0 {
		rk, err := rsa.GenerateKey(rand.Reader, l.rsaBits)
		if err != nil {
			t.Fatalf("identitytest: generate RSA key: %v", err)
		}
		key = rk
	}
	cert := sign(t, tmpl, ca.cert, key.Public(), ca.key)
	certs := []*x509.Certificate{cert}
	if !l.omitChain {
		certs = append(certs, ca.chain...)
	}
	return certs, key
}

// LeafOption changes one property of an issued leaf.
type LeafOption func(*leaf)

type leaf struct {
	notBefore, notAfter time.Time
	uris                []string
	dnsNames            []string
	isCA                bool
	keyUsage            x509.KeyUsage
	extKeyUsage         []x509.ExtKeyUsage
	omitChain           bool
	rsaBits             int
}

// NotBefore sets the start of the validity period (default: a minute ago).
func NotBefore(t time.Time) LeafOption { return func(l *leaf) { l.notBefore = t } }

// NotAfter sets the end of the validity period (default: in an hour).
func NotAfter(t time.Time) LeafOption { return func(l *leaf) { l.notAfter = t } }

// Expired makes a leaf whose validity ended a minute ago.
func Expired() LeafOption {
	return func(l *leaf) {
		now := time.Now()
		l.notBefore, l.notAfter = now.Add(-2*time.Hour), now.Add(-time.Minute)
	}
}

// NotYetValid makes a leaf whose validity starts in an hour.
func NotYetValid() LeafOption {
	return func(l *leaf) {
		now := time.Now()
		l.notBefore, l.notAfter = now.Add(time.Hour), now.Add(2*time.Hour)
	}
}

// URIs replaces the URI SANs (default: the id given to SVID). URIs() with no
// argument leaves the leaf without any URI SAN; non-SPIFFE URIs such as
// "https://x" are allowed. Each is written exactly as given, upper-case
// scheme or percent-encoding included.
func URIs(uris ...string) LeafOption {
	return func(l *leaf) { l.uris = append([]string(nil), uris...) }
}

// DNSNames sets DNS SANs (default: none).
func DNSNames(names ...string) LeafOption {
	return func(l *leaf) { l.dnsNames = append([]string(nil), names...) }
}

// AsCA marks the leaf as a CA certificate (basicConstraints CA:TRUE) and
// gives it the key usages of one, as a CA certificate misused as a leaf
// would have.
func AsCA() LeafOption {
	return func(l *leaf) {
		l.isCA = true
		l.keyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	}
}

// KeyUsage replaces the key usage (default: digitalSignature). KeyUsage(0)
// omits the extension.
func KeyUsage(ku x509.KeyUsage) LeafOption { return func(l *leaf) { l.keyUsage = ku } }

// ExtKeyUsage replaces the extended key usages (default: serverAuth and
// clientAuth). ExtKeyUsage() with no argument omits the extension.
func ExtKeyUsage(eku ...x509.ExtKeyUsage) LeafOption {
	return func(l *leaf) { l.extKeyUsage = append([]x509.ExtKeyUsage(nil), eku...) }
}

// RSAKey gives the leaf an RSA key of the given size instead of the default
// ECDSA P-256 key (SPIRE can issue either).
func RSAKey(bits int) LeafOption { return func(l *leaf) { l.rsaBits = bits } }

// OmitChain leaves the issuing intermediates out of the presented chain, so
// a peer cannot build a path to the root.
func OmitChain() LeafOption { return func(l *leaf) { l.omitChain = true } }

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("identitytest: generate key: %v", err)
	}
	return key
}

func newSerial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatalf("identitytest: serial number: %v", err)
	}
	return n.Add(n, big.NewInt(1))
}

func sign(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatalf("identitytest: create certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("identitytest: parse certificate: %v", err)
	}
	return cert
}
