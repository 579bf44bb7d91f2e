package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Class names why a handshake failed, in a small fixed set fit for a metric
// label, a log field and the diagnosis of latch check.
type Class string

// Handshake failure classes.
const (
	ClassUnknownCA        Class = "unknown_ca"         // chain does not verify against the bundle of the peer's trust domain, or there is no usable bundle of it
	ClassWrongTrustDomain Class = "wrong_trust_domain" // the peer's SPIFFE ID is in a trust domain the configuration does not accept
	ClassExpired          Class = "expired"            // a certificate of the chain has expired
	ClassNotYetValid      Class = "not_yet_valid"      // a certificate of the chain is not valid yet
	ClassBadSVID          Class = "bad_svid"           // not an X.509-SVID: no certificate, no/two/non-SPIFFE URI SANs, a CA certificate as leaf
	ClassBadKeyUsage      Class = "bad_key_usage"      // key usage or extended key usage unfit for the peer's role
	ClassNotAllowed       Class = "not_allowed"        // a valid peer the policy does not allow
	ClassWrongServerID    Class = "wrong_server_id"    // the server proved another SPIFFE ID than the one expected
	ClassProtocolVersion  Class = "protocol_version"   // no TLS version in common
	ClassNoSharedCipher   Class = "no_shared_cipher"   // no cipher suite or key exchange in common
	ClassNotTLS           Class = "not_tls"            // the other side does not speak TLS
	ClassTimeout          Class = "timeout"            // the handshake did not complete in time
	ClassNoHandshake      Class = "no_handshake"       // the peer closed before sending a byte: a TCP health check or a port scan, not a TLS client
	ClassClientRefused    Class = "client_refused"     // a client's view: the server refused its certificate or its identity (see RefusedCertificate)
	ClassOther            Class = "other"              // anything else
)

// Classes lists every class, for pre-declaring metric label values.
func Classes() []Class {
	return []Class{
		ClassUnknownCA, ClassWrongTrustDomain, ClassExpired, ClassNotYetValid,
		ClassBadSVID, ClassBadKeyUsage, ClassNotAllowed, ClassWrongServerID,
		ClassProtocolVersion, ClassNoSharedCipher, ClassNotTLS, ClassTimeout, ClassNoHandshake, ClassClientRefused, ClassOther,
	}
}

// VerifyError is the error latch's TLS configurations return from a handshake
// whose peer was refused. Its message names the peer and the reason; Class
// says which kind of refusal it was.
type VerifyError struct {
	Class Class
	// Peer is the SPIFFE ID the peer claimed, zero when it presented none
	// that could be read. It is a claim, not an identity, unless Class is
	// ClassNotAllowed or ClassWrongServerID (refused after verification).
	Peer spiffeid.ID
	// Resumed is set when the refused handshake resumed an earlier session:
	// the peer's certificate then came from the session ticket.
	Resumed bool
	Err     error
}

func (e *VerifyError) Error() string {
	if e.Err == nil {
		return "peer refused: " + string(e.Class)
	}
	if e.Resumed {
		return e.Err.Error() + " (resumed session)"
	}
	return e.Err.Error()
}

func (e *VerifyError) Unwrap() error { return e.Err }

// ClassOf classifies a handshake error as seen from either side: latch's own
// refusals (*VerifyError), the errors Go's TLS stack returns on the refusing
// side (no common version or suite, plaintext on a TLS port), the TLS alerts
// that tell the refused side what happened, x509 verification errors, and
// timeouts. It returns "" for nil.
//
// A latch peer refuses every certificate problem and every policy denial with
// the same bad_certificate alert (Go's TLS stack chooses the alert), so the
// refused side sees ClassBadSVID where the refusing side logged the precise
// class; latch check says so in its diagnosis.
func ClassOf(err error) Class {
	if err == nil {
		return ""
	}
	if ve, ok := errors.AsType[*VerifyError](err); ok {
		return ve.Class
	}
	if _, ok := errors.AsType[tls.RecordHeaderError](err); ok {
		return ClassNotTLS
	}
	if a, ok := alertOf(err); ok {
		return classOfAlert(a)
	}
	if errors.Is(err, ErrNotAllowed) {
		return ClassNotAllowed
	}
	if _, ok := errors.AsType[x509.UnknownAuthorityError](err); ok {
		return ClassUnknownCA
	}
	if ci, ok := errors.AsType[x509.CertificateInvalidError](err); ok && ci.Reason == x509.Expired {
		if ci.Cert != nil && time.Now().Before(ci.Cert.NotBefore) {
			return ClassNotYetValid
		}
		return ClassExpired
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return ClassTimeout
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return ClassTimeout
	}
	// Go's TLS stack reports these only as text; they are stable across
	// releases and each is the refusing side's view of an alert above.
	msg := err.Error()
	for _, m := range []struct {
		text  string
		class Class
	}{
		{"offered only unsupported versions", ClassProtocolVersion},
		{"offered TLS version older than", ClassProtocolVersion},
		{"selected unsupported protocol version", ClassProtocolVersion},
		{"no mutually supported protocol versions", ClassProtocolVersion},
		{"no cipher suite supported by both", ClassNoSharedCipher},
		{"no key exchanges supported by both", ClassNoSharedCipher},
		{"no ECDHE curve supported by both", ClassNoSharedCipher},
		{"didn't provide a certificate", ClassBadSVID},
	} {
		if strings.Contains(msg, m.text) {
			return m.class
		}
	}
	return ClassOther
}

// RefusedCertificate reports whether err carries an alert by which the other
// side refused the certificate this side presented: bad_certificate,
// unsupported_certificate, certificate_revoked, certificate_expired,
// certificate_unknown, unknown_ca, access_denied or certificate_required.
// A latch server sends bad_certificate for every refusal of a client, from
// an unknown CA to a SPIFFE ID its allow-list does not name. In TLS 1.3 the
// client's handshake completes before the server has judged its
// certificate, so the client reads the alert on its first read.
func RefusedCertificate(err error) bool {
	a, ok := alertOf(err)
	if !ok {
		return false
	}
	switch a {
	case alertBadCertificate, alertUnsupportedCertificate, alertCertificateRevoked, alertCertificateExpired,
		alertCertificateUnknown, alertUnknownCA, alertAccessDenied, alertCertificateRequired:
		return true
	}
	return false
}

// alertOf finds the TLS alert in err: tls.AlertError as QUIC returns it, or
// the unexported alert type inside the net.OpError{Op: "remote error"} a
// tls.Conn returns when the peer sent one. The latter is matched by its text,
// which is by construction the text of the AlertError of the same value.
func alertOf(err error) (tls.AlertError, bool) {
	if a, ok := errors.AsType[tls.AlertError](err); ok {
		return a, true
	}
	op, ok := errors.AsType[*net.OpError](err)
	if !ok || op.Op != "remote error" || op.Err == nil {
		return 0, false
	}
	text := op.Err.Error()
	for _, a := range knownAlerts {
		if a.Error() == text {
			return a, true
		}
	}
	return 0, false
}

// TLS alert numbers (RFC 8446 section 6) that ClassOf gives a class.
const (
	alertHandshakeFailure       tls.AlertError = 40
	alertBadCertificate         tls.AlertError = 42
	alertUnsupportedCertificate tls.AlertError = 43
	alertCertificateRevoked     tls.AlertError = 44
	alertCertificateExpired     tls.AlertError = 45
	alertCertificateUnknown     tls.AlertError = 46
	alertUnknownCA              tls.AlertError = 48
	alertAccessDenied           tls.AlertError = 49
	alertProtocolVersion        tls.AlertError = 70
	alertInsufficientSecurity   tls.AlertError = 71
	alertCertificateRequired    tls.AlertError = 116
)

var knownAlerts = []tls.AlertError{
	alertHandshakeFailure, alertBadCertificate, alertUnsupportedCertificate,
	alertCertificateRevoked, alertCertificateExpired, alertCertificateUnknown,
	alertUnknownCA, alertAccessDenied, alertProtocolVersion,
	alertInsufficientSecurity, alertCertificateRequired,
}

func classOfAlert(a tls.AlertError) Class {
	switch a {
	case alertHandshakeFailure, alertInsufficientSecurity:
		// Go sends handshake_failure when no suite or group is shared.
		return ClassNoSharedCipher
	case alertBadCertificate, alertUnsupportedCertificate, alertCertificateRevoked,
		alertCertificateUnknown, alertCertificateRequired:
		return ClassBadSVID
	case alertCertificateExpired:
		return ClassExpired
	case alertUnknownCA:
		return ClassUnknownCA
	case alertAccessDenied:
		return ClassNotAllowed
	case alertProtocolVersion:
		return ClassProtocolVersion
	}
	return ClassOther
}
