package proxy

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// TLV types latch adds to the PROXY protocol v2 header it sends an app, from
// the range the PROXY protocol specification (section 2.2.8) reserves for
// applications, 0xE0 to 0xEF. docs/configuration.md lists them for app
// authors; the xDS translation names the same types.
const (
	// TLVSPIFFEID holds the peer's SPIFFE ID as its certificate spells it
	// (US-ASCII, "spiffe://trust.domain/path"): the identity latch verified,
	// against the bundle of the trust domain the ID names.
	TLVSPIFFEID byte = 0xE0
	// TLVPeerCertSHA256 holds the SHA-256 of the DER of the peer's leaf
	// certificate as 64 lowercase hexadecimal characters, the form of
	// Envoy's %DOWNSTREAM_PEER_FINGERPRINT_256%.
	TLVPeerCertSHA256 byte = 0xE1
)

// proxyHeader is the PROXY protocol v2 header that tells the app who is on
// the other side of an inbound connection: the peer's address (source) and
// the address it connected to (destination), then the TLVs: PP2_TYPE_SSL
// with the TLS version, cipher suite and key exchange group, the peer's
// SPIFFE ID and the fingerprint of its leaf certificate.
//
// The encoding is go-proxyproto's, not hand-written bytes: the format has
// corners (address families, sub-TLV lengths) that a library used by the
// parsers on the other side gets right.
func proxyHeader(remote, local net.Addr, cs tls.ConnectionState, peer spiffeid.ID) ([]byte, error) {
	if len(cs.PeerCertificates) == 0 {
		return nil, errors.New("PROXY protocol header: the peer presented no certificate")
	}
	h := proxyproto.HeaderProxyFromAddrs(2, remote, local)
	if h.Command != proxyproto.PROXY {
		// A TCP connection always has two TCP addresses; anything else
		// would send the app a header without the peer's address.
		return nil, fmt.Errorf("PROXY protocol header: addresses %v and %v are not TCP", remote, local)
	}
	// PP2_CLIENT_CERT_CONN says the certificate came in this connection's
	// handshake, PP2_CLIENT_CERT_SESS that the session has one: a resumed
	// session's came in the handshake that created it. verify 0: verified.
	client := tlvparse.PP2_BITFIELD_CLIENT_SSL | tlvparse.PP2_BITFIELD_CLIENT_CERT_SESS
	if !cs.DidResume {
		client |= tlvparse.PP2_BITFIELD_CLIENT_CERT_CONN
	}
	sub := []proxyproto.TLV{
		{Type: proxyproto.PP2_SUBTYPE_SSL_VERSION, Value: []byte(sslVersion(cs.Version))},
		{Type: proxyproto.PP2_SUBTYPE_SSL_CIPHER, Value: []byte(tls.CipherSuiteName(cs.CipherSuite))},
	}
	if g := identity.GroupName(cs.CurveID); g != "" {
		sub = append(sub, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_GROUP, Value: []byte(g)})
	}
	ssl, err := tlvparse.PP2SSL{Client: client, Verify: 0, TLV: sub}.Marshal()
	if err != nil {
		return nil, fmt.Errorf("PROXY protocol header: PP2_TYPE_SSL: %w", err)
	}
	sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
	fp := make([]byte, hex.EncodedLen(len(sum)))
	hex.Encode(fp, sum[:])
	if err := h.SetTLVs([]proxyproto.TLV{
		ssl,
		{Type: proxyproto.PP2Type(TLVSPIFFEID), Value: []byte(peer.String())},
		{Type: proxyproto.PP2Type(TLVPeerCertSHA256), Value: fp},
	}); err != nil {
		return nil, fmt.Errorf("PROXY protocol header: %w", err)
	}
	b, err := h.Format()
	if err != nil {
		return nil, fmt.Errorf("PROXY protocol header: %w", err)
	}
	return b, nil
}

// sslVersion names a TLS version the way PP2_SUBTYPE_SSL_VERSION does in
// the headers HAProxy and OpenSSL-based proxies send ("TLSv1.3"), so an app
// behind either reads the same string.
func sslVersion(v uint16) string {
	switch v {
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return identity.VersionName(v)
}
