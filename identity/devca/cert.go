package devca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// organization marks every certificate this package makes, so one found in the
// wild explains itself.
const organization = "latch devca - NOT FOR PRODUCTION"

// authority is one CA: its self-signed certificate and its in-memory key.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey

	// activateAt is when a pending authority starts signing.
	activateAt time.Time
	// lastSVIDExpiry is the latest NotAfter of any SVID this authority signed;
	// a retired authority leaves the bundle only after it.
	lastSVIDExpiry time.Time
}

// serialNumber returns a random positive 128-bit serial, as RFC 5280 allows
// (at most 20 octets) and as SPIRE does, so serials never repeat across CAs.
func serialNumber() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

// newAuthority makes a self-signed root CA for td valid from now for ttl.
// X.509 encodes times to the second, so the validity is computed in whole
// seconds up front; what the certificate says is what the scheduler uses.
func newAuthority(td spiffeid.TrustDomain, now time.Time, ttl time.Duration) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating CA key: %w", err)
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, err
	}
	notBefore := now.Truncate(time.Second)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{organization},
			// The serial prefix tells two CAs of one trust domain apart in logs
			// and in `openssl x509 -text`.
			CommonName: fmt.Sprintf("latch devca %s %x", td.Name(), serial.Bytes()[:4]),
		},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             notBefore,
		NotAfter:              ceilSecond(now.Add(ttl)),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// SVIDs are signed directly by the root; nothing below it may sign.
		MaxPathLen:     0,
		MaxPathLenZero: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("self-signing CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing CA certificate: %w", err)
	}
	return &authority{cert: cert, key: key}, nil
}

// sign issues an X.509-SVID for id valid from now for ttl, but never beyond the
// authority's own expiry. The result follows the SPIFFE X509-SVID spec: exactly
// one URI SAN, not a CA, key usage digitalSignature only, and both TLS extended
// key usages so the same SVID serves as client and server certificate.
func (a *authority) sign(id spiffeid.ID, now time.Time, ttl time.Duration) (*x509svid.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating SVID key for %s: %w", id, err)
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, err
	}
	notAfter := ceilSecond(now.Add(ttl))
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{organization},
		},
		URIs:                  []*url.URL{id.URL()},
		NotBefore:             now.Truncate(time.Second),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		return nil, fmt.Errorf("signing SVID for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing SVID for %s: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}, nil
}

// ceilSecond rounds t up to a whole second: certificates carry whole seconds,
// and rounding up means an SVID never lives shorter than asked.
func ceilSecond(t time.Time) time.Time {
	if tt := t.Truncate(time.Second); !tt.Equal(t) {
		return tt.Add(time.Second)
	}
	return t
}
