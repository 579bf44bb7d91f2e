package identity_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

func TestClassOf(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	expired := ca.TLSCertificate(t, clientID, identitytest.Expired()).Leaf
	future := ca.TLSCertificate(t, clientID, identitytest.NotYetValid()).Leaf
	tests := []struct {
		err  error
		want identity.Class
	}{
		{nil, ""},
		{&identity.VerifyError{Class: identity.ClassWrongTrustDomain, Err: errors.New("x")}, identity.ClassWrongTrustDomain},
		{fmt.Errorf("listener %q: %w", "in", &identity.VerifyError{Class: identity.ClassExpired, Err: errors.New("x")}), identity.ClassExpired},
		{tls.RecordHeaderError{Msg: "first record does not look like a TLS handshake"}, identity.ClassNotTLS},
		{fmt.Errorf("handshake: %w", tls.AlertError(48)), identity.ClassUnknownCA},
		{tls.AlertError(45), identity.ClassExpired},
		{tls.AlertError(42), identity.ClassBadSVID},
		{tls.AlertError(116), identity.ClassBadSVID},
		{tls.AlertError(49), identity.ClassNotAllowed},
		{tls.AlertError(70), identity.ClassProtocolVersion},
		{tls.AlertError(40), identity.ClassNoSharedCipher},
		{tls.AlertError(71), identity.ClassNoSharedCipher},
		{tls.AlertError(80), identity.ClassOther},
		{fmt.Errorf("peer x: %w", identity.ErrNotAllowed), identity.ClassNotAllowed},
		{x509.UnknownAuthorityError{}, identity.ClassUnknownCA},
		{&tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, identity.ClassUnknownCA},
		{x509.CertificateInvalidError{Cert: expired, Reason: x509.Expired}, identity.ClassExpired},
		{x509.CertificateInvalidError{Cert: future, Reason: x509.Expired}, identity.ClassNotYetValid},
		{context.DeadlineExceeded, identity.ClassTimeout},
		{fmt.Errorf("read: %w", os.ErrDeadlineExceeded), identity.ClassTimeout},
		{errors.New("tls: client offered only unsupported versions: [303]"), identity.ClassProtocolVersion},
		{errors.New("tls: no cipher suite supported by both client and server; client offered: [2f]"), identity.ClassNoSharedCipher},
		{errors.New("tls: client didn't provide a certificate"), identity.ClassBadSVID},
		{errors.New("EOF"), identity.ClassOther},
	}
	for _, tt := range tests {
		if got := identity.ClassOf(tt.err); got != tt.want {
			t.Errorf("ClassOf(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

func TestClassesAreDistinctAndComplete(t *testing.T) {
	seen := map[identity.Class]bool{}
	for _, c := range identity.Classes() {
		if c == "" || seen[c] {
			t.Errorf("class %q empty or listed twice", c)
		}
		seen[c] = true
	}
	if len(seen) != 15 {
		t.Errorf("%d classes, want 15", len(seen))
	}
}

// A stock Go TLS server (verifying with its own CA pool, as a non-latch
// peer would) tells a refused latch client why with a specific alert; ClassOf
// reads it.
func TestClassOfAlertsFromStockServer(t *testing.T) {
	w := newWorld(t)
	tests := []struct {
		name       string
		clientCert *identitytest.CA
		opts       []identitytest.LeafOption
		trust      *identitytest.CA
		want       identity.Class
	}{
		{"unknown CA", w.ca, nil, identitytest.NewCA(t, trustDomain), identity.ClassUnknownCA},
		{"expired", w.ca, []identitytest.LeafOption{identitytest.NotBefore(time.Now().Add(-2 * time.Hour)), identitytest.NotAfter(time.Now().Add(-time.Hour))}, w.ca, identity.ClassExpired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pool := x509.NewCertPool()
			pool.AddCert(tt.trust.Cert())
			cfg := hostileServer(w.ca.TLSCertificate(t, serverID))
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
			cfg.ClientCAs = pool
			srv := startServer(t, cfg)
			w.client.SetSVID(tt.clientCert.SVID(t, clientID, tt.opts...))
			_, client := dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
			srv.next(t)
			wantRefused(t, "client", client, tt.want, "remote error")
		})
	}
}

func TestRefusedCertificate(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want bool
	}{
		{tls.AlertError(42), true},                             // bad_certificate: what a latch server sends
		{tls.AlertError(48), true},                             // unknown_ca
		{tls.AlertError(49), true},                             // access_denied
		{fmt.Errorf("reading: %w", tls.AlertError(116)), true}, // certificate_required
		{tls.AlertError(40), false},                            // handshake_failure: nothing in common, not a refusal of us
		{tls.AlertError(70), false},                            // protocol_version
		{io.EOF, false},
		{nil, false},
	} {
		if got := identity.RefusedCertificate(tt.err); got != tt.want {
			t.Errorf("RefusedCertificate(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
