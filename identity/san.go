package identity

import (
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// oidSubjectAltName is the subjectAltName extension (RFC 5280 4.2.1.6).
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// checkSANSpelling holds a peer's URI SAN to the spelling of the SPIFFE ID it
// was read as, byte for byte.
//
// crypto/x509 hands the SAN over as a *url.URL, and net/url normalizes:
// "SPIFFE://td/x" comes back with the scheme "spiffe", "spiffe://td/x#" with
// the empty fragment gone. spiffeid.FromURI then accepts an ID that
// spiffeid.FromString refuses, and that byte-wise SAN matchers (Envoy's RBAC
// and SAN matchers, an issuance policy allowing or reserving "spiffe://…"
// URIs) read as something else or as no SPIFFE ID at all. The X509-SVID
// specification (5.2) has the validator ensure the scheme is spiffe, and no
// SPIFFE issuer writes anything but the canonical form, so latch refuses any
// other spelling rather than agree with one reader and not another
// (docs/security.md, "How a peer's SPIFFE ID is read").
func checkSANSpelling(leaf *x509.Certificate, id spiffeid.ID) error {
	raw, err := rawURISAN(leaf)
	if err != nil {
		return err
	}
	if string(raw) == id.String() {
		return nil
	}
	if scheme, _, _ := strings.Cut(string(raw), ":"); scheme != "spiffe" {
		return fmt.Errorf("URI SAN %q is not a SPIFFE ID: the scheme must be spiffe in lower case, as issuers write it", raw)
	}
	return fmt.Errorf("URI SAN %q is not a SPIFFE ID: it is not written as the ID it would be read as (%s)", raw, id)
}

// rawURISAN returns the one URI SAN of c as the certificate spells it. The
// caller has already seen exactly one in c.URIs, and crypto/x509 has parsed
// the extension, so it is well-formed DER. cryptobyte reads it in place: this
// runs on every handshake, resumed ones included.
func rawURISAN(c *x509.Certificate) ([]byte, error) {
	for _, ext := range c.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		in := cryptobyte.String(ext.Value)
		var names cryptobyte.String
		if !in.ReadASN1(&names, cbasn1.SEQUENCE) || !in.Empty() {
			return nil, errors.New("subjectAltName extension is not a sequence of names")
		}
		var uri []byte
		n := 0
		for !names.Empty() {
			var name cryptobyte.String
			var tag cbasn1.Tag
			if !names.ReadAnyASN1(&name, &tag) {
				return nil, errors.New("subjectAltName extension: malformed name")
			}
			// GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String.
			if tag == cbasn1.Tag(6).ContextSpecific() {
				uri, n = name, n+1
			}
		}
		if n != 1 {
			return nil, fmt.Errorf("subjectAltName extension holds %d URIs, an X.509-SVID exactly one", n)
		}
		return uri, nil
	}
	return nil, errors.New("no subjectAltName extension")
}
