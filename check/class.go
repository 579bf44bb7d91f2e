package check

import (
	"fmt"
	"strings"

	"latch.dev/latch/identity"
)

// Class names why a check failed. Each class has its own exit code and fix.
type Class string

// Failure classes. The exit codes are grouped by where to look: 1x the
// network, 2x trust (the chain), 3x protocol negotiation, 4x identity and
// authorization, 5x validity period, 6x the local workload.
const (
	ClassUnreachable      Class = "unreachable"        // connection refused, no route, unknown host
	ClassTimeout          Class = "timeout"            // no TCP connection or no handshake in time
	ClassNotTLS           Class = "not_tls"            // the server does not speak TLS (plaintext)
	ClassClosed           Class = "closed"             // the server closed the connection during the handshake without an alert
	ClassUnknownCA        Class = "unknown_ca"         // server chain does not verify against the local trust bundle
	ClassWrongTrustDomain Class = "wrong_trust_domain" // server SPIFFE ID is in another trust domain
	ClassBadSVID          Class = "bad_svid"           // server certificate is not a valid X.509-SVID
	ClassBadKeyUsage      Class = "bad_key_usage"      // server certificate lacks serverAuth / digitalSignature
	ClassProtocolVersion  Class = "protocol_version"   // no TLS version in common
	ClassNoSharedCipher   Class = "no_shared_cipher"   // no cipher suite or key exchange group in common
	ClassWrongServerID    Class = "wrong_server_id"    // server proved another SPIFFE ID than expected
	ClassClientRefused    Class = "client_refused"     // the server refused our identity (authorization or trust)
	ClassExpired          Class = "expired"            // a server certificate has expired
	ClassNotYetValid      Class = "not_yet_valid"      // a server certificate is not valid yet
	ClassNoLocalIdentity  Class = "no_local_identity"  // no usable SVID from the Workload API
	ClassOther            Class = "other"              // anything else
)

// ExitUsage is the exit code of a command line latch check cannot run.
const ExitUsage = 2

type classInfo struct {
	exit    int
	summary string
	fix     string
}

var classes = map[Class]classInfo{
	ClassUnreachable: {10, "connection refused or host unreachable",
		"Check the address and port, that the server (or its latch sidecar) is running and listening there, and that no network policy or firewall blocks the port."},
	ClassTimeout: {11, "timed out",
		"The server accepted nothing or answered nothing in time: check network policies and firewalls that drop rather than refuse, that the server is not overloaded (latch applies a per-listener connection limit), and that the port is a TLS port. Raise --timeout if the path is slow."},
	ClassNotTLS: {12, "the server does not speak TLS",
		"The port answered in plaintext (for example HTTP). Point the check at the server's mTLS port (the latch sidecar's inbound listener or its TLS test endpoint), not at the application port behind it."},
	ClassClosed: {13, "the server closed the connection during the handshake",
		"The server hung up without a TLS alert: it may not speak TLS, may require something else first (a proxy protocol header), or may be at its connection limit. Check the server's log for this connection."},
	ClassUnknownCA: {20, "the server certificate does not chain to our trust bundle (unknown CA)",
		"The server's CA is not in the trust bundle of its trust domain. If a CA rollover is under way, the new CA must be in every workload's bundle before any server presents certificates from it: check the bundle the Workload API serves (latch /status lists every bundle CA) and the issuer named above. For a server of a federated trust domain: the Workload API must hand out that trust domain's bundle (SPIRE federation), and latch refuses a federated bundle that holds a CA of the local trust domain (/status shows it as refused)."},
	ClassWrongTrustDomain: {21, "the server is in another trust domain",
		"The server's SPIFFE ID belongs to another trust domain, which this check does not federate with. If it is a federated trust domain, name the server with --server-id (its trust domain is then accepted and verified against its federated bundle); otherwise check that both sides get their SVIDs from the same SPIRE deployment, or that you are checking the endpoint you meant."},
	ClassBadSVID: {22, "the server certificate is not a valid X.509-SVID",
		"The server presented a certificate without exactly one SPIFFE URI SAN, or a CA certificate as its leaf. It is not a SPIFFE workload certificate: fix the server's certificate source (it should come from the Workload API)."},
	ClassBadKeyUsage: {23, "the server certificate has the wrong key usage",
		"The server's certificate lacks digitalSignature or the serverAuth extended key usage, or carries CA key usages. Fix the issuing template (SPIRE's X.509-SVIDs have the right ones)."},
	ClassProtocolVersion: {30, "no TLS version in common",
		"Client and server share no TLS version. latch's modern profile is TLS 1.3 only; use --profile intermediate to also try TLS 1.2, and run with --scan to list what the server accepts. Upgrade servers that stop at TLS 1.2 or below."},
	ClassNoSharedCipher: {31, "no cipher suite or key exchange group in common",
		"The server accepted none of the offered cipher suites or key exchange groups. Run with --scan to list what it accepts; latch offers only AEAD suites with ECDHE and the groups X25519MLKEM768, X25519 and P-256."},
	ClassWrongServerID: {40, "the server has another SPIFFE ID than expected",
		"The server proved a valid identity, but not the expected one. Check --server-id (or the upstream's expected server ID in the policy) against the ID above, and that the address points at the service you meant."},
	ClassClientRefused: {41, "the server refused our identity",
		"The server did not accept our certificate: its allow-list may not include our SPIFFE ID (add it to the server's inbound allow rules or ServicePolicy), it may not trust our CA (a CA rollover whose new CA has not reached the server's bundle yet), or our SVID may be expired. A latch server logs the precise reason with our peer_id."},
	ClassExpired: {50, "a server certificate has expired",
		"The server presents an expired certificate: its SVID is not being rotated. Check the server's Workload API connection (latch logs SVID rotations and warns before expiry) and the clocks of both hosts."},
	ClassNotYetValid: {51, "a server certificate is not valid yet",
		"The server presents a certificate whose validity starts in the future: one of the two clocks is wrong. Check NTP on both hosts."},
	ClassNoLocalIdentity: {60, "no local identity",
		"latch check could not get an X.509-SVID from the Workload API. Check --workload-api (or $SPIFFE_ENDPOINT_SOCKET), that the SPIRE agent runs, and that this workload is registered."},
	ClassOther: {1, "the check failed",
		"See the error above; run with --scan for the server's protocol parameters."},
}

// Classes lists every class in exit-code order.
func Classes() []Class {
	return []Class{
		ClassUnreachable, ClassTimeout, ClassNotTLS, ClassClosed,
		ClassUnknownCA, ClassWrongTrustDomain, ClassBadSVID, ClassBadKeyUsage,
		ClassProtocolVersion, ClassNoSharedCipher,
		ClassWrongServerID, ClassClientRefused,
		ClassExpired, ClassNotYetValid,
		ClassNoLocalIdentity, ClassOther,
	}
}

// ExitCode is the exit status of latch check for a failure of class c.
func (c Class) ExitCode() int {
	if ci, ok := classes[c]; ok {
		return ci.exit
	}
	return 1
}

// Summary is a short description of the class.
func (c Class) Summary() string { return classes[c].summary }

// Fix says what to do about a failure of class c.
func (c Class) Fix() string { return classes[c].fix }

// ExitCodeTable is the exit codes as text, for latch check -h and the docs.
func ExitCodeTable() string {
	var b strings.Builder
	fmt.Fprintf(&b, "  %3d  %-20s %s\n", 0, "ok", "the handshake succeeded and the server accepted us")
	for _, c := range Classes() {
		fmt.Fprintf(&b, "  %3d  %-20s %s\n", c.ExitCode(), c, c.Summary())
	}
	fmt.Fprintf(&b, "  %3d  %-20s %s\n", ExitUsage, "usage", "bad command line")
	return b.String()
}

// Error is a failed check: the class, what happened, and what the server
// presented as far as the handshake got.
type Error struct {
	Class Class
	Addr  string
	// Stage is where it failed: "identity", "dial", "handshake" or
	// "first read" (TLS 1.3 servers refuse a client certificate after the
	// client has finished its handshake; the alert arrives on the first read).
	Stage string
	Err   error
	// Seen describes the connection as far as it was negotiated (empty
	// fields for what never happened).
	Seen *identity.ConnectionInfo
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s (%s) at %s: %v", e.Addr, e.Class.Summary(), e.Class, e.Stage, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ExitCode is the class's exit code.
func (e *Error) ExitCode() int { return e.Class.ExitCode() }

// Fix says what to do.
func (e *Error) Fix() string { return e.Class.Fix() }

// fromIdentityClass maps a class of our own verification of the server.
func fromIdentityClass(c identity.Class) Class {
	switch c {
	case identity.ClassUnknownCA:
		return ClassUnknownCA
	case identity.ClassWrongTrustDomain:
		return ClassWrongTrustDomain
	case identity.ClassExpired:
		return ClassExpired
	case identity.ClassNotYetValid:
		return ClassNotYetValid
	case identity.ClassBadSVID:
		return ClassBadSVID
	case identity.ClassBadKeyUsage:
		return ClassBadKeyUsage
	case identity.ClassWrongServerID:
		return ClassWrongServerID
	case identity.ClassProtocolVersion:
		return ClassProtocolVersion
	case identity.ClassNoSharedCipher:
		return ClassNoSharedCipher
	case identity.ClassNotTLS:
		return ClassNotTLS
	case identity.ClassTimeout:
		return ClassTimeout
	case identity.ClassNotAllowed:
		return ClassClientRefused
	}
	return ClassOther
}
