package identity

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ConnectionInfo describes a completed handshake for people and scripts: what
// latch check and latch demo print and what the TLS test endpoint answers.
// The server certificate fields follow the fields of the TLS test endpoint
// that clients use to check a certificate change before it happens.
type ConnectionInfo struct {
	Version          string `json:"version"`            // "TLS 1.3"
	CipherSuite      string `json:"cipher_suite"`       // IANA name, "TLS_AES_128_GCM_SHA256"
	KeyExchangeGroup string `json:"key_exchange_group"` // "X25519MLKEM768"
	Resumed          bool   `json:"resumed"`
	SNI              string `json:"sni,omitempty"`
	ServerSPIFFEID   string `json:"server_spiffe_id"`
	ClientSPIFFEID   string `json:"client_spiffe_id"`
	ServerCertSHA256 string `json:"server_cert_sha256"` // lowercase hex of the SHA-256 of the leaf's DER
	ServerCertSerial string `json:"server_cert_serial"` // lowercase hex
	Issuer           string `json:"issuer"`             // subject of the CA that signed the server's leaf
	NotBefore        string `json:"not_before"`         // RFC 3339, UTC
	NotAfter         string `json:"not_after"`          // RFC 3339, UTC
	NotAfterASN1     string `json:"not_after_asn1"`     // YYMMDDhhmmssZ (ASN.1 UTCTime), UTC
	// ServerBundle and ClientBundle name the trust domain whose bundle
	// verified the server's and the client's certificate: that of the
	// peer's own SPIFFE ID, the local trust domain's or a federated one's.
	// Each is filled by the side that verified it, once the handshake
	// completed: ServerBundle by a client, ClientBundle by a server.
	ServerBundle string `json:"server_bundle,omitempty"`
	ClientBundle string `json:"client_bundle,omitempty"`
}

// DescribeConnection describes cs as seen by the server (isServer) or the
// client. A connection state holds only the peer's certificates, so the side
// of the local workload stays empty: the server fields on a server, the
// client ID on a client. DescribeConnectionLocal fills them too.
func DescribeConnection(cs tls.ConnectionState, isServer bool) ConnectionInfo {
	return DescribeConnectionLocal(cs, isServer, nil)
}

// DescribeConnectionLocal is DescribeConnection with the local workload's leaf
// certificate, so that every field is filled on both sides. TLS.LocalCertificate
// gives the certificate a handshake starting now presents; for a resumed
// session or one that straddled a rotation, it may be newer than the one the
// session was authenticated with.
func DescribeConnectionLocal(cs tls.ConnectionState, isServer bool, local *x509.Certificate) ConnectionInfo {
	info := ConnectionInfo{
		Version:          VersionName(cs.Version),
		CipherSuite:      tls.CipherSuiteName(cs.CipherSuite),
		KeyExchangeGroup: GroupName(cs.CurveID),
		Resumed:          cs.DidResume,
		SNI:              cs.ServerName,
	}
	var peer *x509.Certificate
	if len(cs.PeerCertificates) > 0 {
		peer = cs.PeerCertificates[0]
	}
	server, client := peer, local
	if isServer {
		server, client = local, peer
	}
	info.ClientSPIFFEID = spiffeIDOf(client)
	info.ServerSPIFFEID = spiffeIDOf(server)
	// latch verifies a peer against the bundle of its own ID's trust domain
	// and no other, so a completed handshake names that bundle.
	if peer != nil && cs.HandshakeComplete {
		if id, err := x509svid.IDFromCert(peer); err == nil {
			if isServer {
				info.ClientBundle = id.TrustDomain().Name()
			} else {
				info.ServerBundle = id.TrustDomain().Name()
			}
		}
	}
	if server != nil {
		sum := sha256.Sum256(server.Raw)
		info.ServerCertSHA256 = hex.EncodeToString(sum[:])
		if server.SerialNumber != nil {
			info.ServerCertSerial = server.SerialNumber.Text(16)
		}
		info.Issuer = server.Issuer.String()
		info.NotBefore = rfc3339(server.NotBefore)
		info.NotAfter = rfc3339(server.NotAfter)
		info.NotAfterASN1 = asn1Time(server.NotAfter)
	}
	return info
}

// asn1Time formats t as an ASN.1 UTCTime (YYMMDDhhmmssZ), the form of the
// "expire" field of TLS test endpoints. RFC 5280 uses GeneralizedTime from
// 2050 on; so does this, to stay unambiguous.
func asn1Time(t time.Time) string {
	t = t.UTC()
	if t.Year() >= 2050 {
		return t.Format("20060102150405Z")
	}
	return t.Format("060102150405Z")
}

func spiffeIDOf(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	id, err := x509svid.IDFromCert(c)
	if err != nil {
		return ""
	}
	return id.String()
}

// GroupName is the name of a TLS key exchange group as latch's configuration
// spells it ("X25519MLKEM768", "X25519", "P-256"); "" for none (a TLS 1.2
// session resumed without a new key exchange).
func GroupName(c tls.CurveID) string {
	switch c {
	case 0:
		return ""
	case tls.CurveP256:
		return "P-256"
	case tls.CurveP384:
		return "P-384"
	case tls.CurveP521:
		return "P-521"
	}
	return c.String()
}
