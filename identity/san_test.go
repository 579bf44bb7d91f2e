package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FuzzSANSpelling: whatever URI SAN a certificate carries, rawURISAN returns
// it byte for byte, and checkSANSpelling accepts exactly the SANs that are
// already the SPIFFE ID they are read as.
func FuzzSANSpelling(f *testing.F) {
	for _, s := range []string{
		"spiffe://mesh.test/ns/a", "SPIFFE://mesh.test/ns/a", "Spiffe://mesh.test/ns/a", "spiffe://mesh.test/ns/a#",
		"spiffe://mesh.test/ns/a?", "spiffe://MESH.test/ns/a", "spiffe://mesh.test/n%73/a", "https://mesh.test/a", "spiffe:mesh.test/a",
	} {
		f.Add(s)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		scheme, rest, ok := strings.Cut(raw, ":")
		if !ok || scheme == "" {
			return
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), URIs: []*url.URL{{Scheme: scheme, Opaque: rest}}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			return // not an IA5String
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil || len(cert.URIs) != 1 {
			return // crypto/x509 refuses it before latch sees it
		}
		got, err := rawURISAN(cert)
		if err != nil || string(got) != raw {
			t.Fatalf("rawURISAN = %q, %v; want %q", got, err, raw)
		}
		id, err := spiffeid.FromURI(cert.URIs[0])
		if err != nil {
			return
		}
		err = checkSANSpelling(cert, id)
		if (err == nil) != (raw == id.String()) {
			t.Fatalf("SAN %q read as %s: checkSANSpelling = %v", raw, id, err)
		}
		if err == nil {
			if again, err := spiffeid.FromString(raw); err != nil || again != id {
				t.Fatalf("SAN %q accepted as %s, which spiffeid.FromString reads as %s, %v", raw, id, again, err)
			}
		}
	})
}
