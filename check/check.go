package check

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"latch.dev/latch/admin"
	"latch.dev/latch/identity"
)

// ClientTLS builds the client side of an mTLS connection; *identity.TLS
// implements it.
type ClientTLS interface {
	ClientConfig(p identity.Profile, serverID spiffeid.ID, opts ...identity.PeerOption) *tls.Config
	LocalCertificate() (*x509.Certificate, error)
}

// Options configure a check.
type Options struct {
	// Addr is the host:port to connect to.
	Addr string
	// TLS supplies the local SVID and the verifier.
	TLS ClientTLS
	// ServerID is the SPIFFE ID the server must prove. Zero accepts any
	// workload of the local trust domain (the trust domain of our SVID) and
	// of FederatesWith.
	ServerID spiffeid.ID
	// FederatesWith are foreign trust domains whose servers are accepted,
	// each verified against its own federated bundle from the Workload API.
	// A ServerID in a foreign trust domain adds that one.
	FederatesWith []spiffeid.TrustDomain
	// Profile is the TLS profile to offer; the zero Profile means modern.
	Profile identity.Profile
	// Timeout bounds the whole check (dial, handshake, first read); zero
	// means 5s.
	Timeout time.Duration
	// ReadWait is how long to wait after the handshake for the server's
	// first bytes: the test endpoint's reply, or a TLS 1.3 server's refusal
	// of our certificate. Zero means one second (capped by what is left of
	// Timeout). A server that sends nothing in that time has accepted us.
	ReadWait time.Duration
	// ServerName is sent as SNI; "" sends none.
	ServerName string
}

// Result is a successful check.
type Result struct {
	Addr string `json:"addr"`
	// Source is "test_endpoint" when Connection is the server's own
	// description (a latch TLS test endpoint answered), and "client" when it
	// is what the client saw.
	Source     string                  `json:"source"`
	Connection identity.ConnectionInfo `json:"connection"`
	// ClientView is what the client saw, always.
	ClientView identity.ConnectionInfo `json:"client_view"`
	// Notes say what else was observed (a server that sent nothing, a
	// fingerprint the two sides disagree on).
	Notes []string `json:"notes,omitempty"`
}

// Source values of Result.
const (
	SourceTestEndpoint = "test_endpoint"
	SourceClient       = "client"
)

func (o *Options) defaults() {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.ReadWait <= 0 {
		o.ReadWait = time.Second
	}
	if o.Profile.MinVersion == 0 && o.Profile.MaxVersion == 0 {
		o.Profile = identity.Modern()
	}
}

// Run connects to opts.Addr and checks the connection. It returns an *Error
// on every failure it can diagnose.
func Run(ctx context.Context, opts Options) (*Result, error) {
	opts.defaults()
	fail := func(c Class, stage string, err error, seen *identity.ConnectionInfo) (*Result, error) {
		return nil, &Error{Class: c, Addr: opts.Addr, Stage: stage, Err: err, Seen: seen}
	}
	local, err := opts.TLS.LocalCertificate()
	if err != nil {
		return fail(ClassNoLocalIdentity, "identity", err, nil)
	}
	localID, err := x509svid.IDFromCert(local)
	if err != nil {
		return fail(ClassNoLocalIdentity, "identity", fmt.Errorf("local certificate: %w", err), nil)
	}
	td := localID.TrustDomain()

	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", opts.Addr)
	if err != nil {
		return fail(dialClass(err), "dial", err, nil)
	}
	defer raw.Close()
	deadline, _ := ctx.Deadline()
	_ = raw.SetDeadline(deadline)

	cfg, seen := clientConfig(opts, td)
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		return fail(handshakeClass(err), "handshake", err, seen.info())
	}
	view := identity.DescribeConnectionLocal(conn.ConnectionState(), false, local)
	res := &Result{Addr: opts.Addr, Source: SourceClient, Connection: view, ClientView: view}
	if view.ServerBundle != "" && view.ServerBundle != td.Name() {
		res.Notes = append(res.Notes, fmt.Sprintf("the server is of trust domain %s, verified against its federated bundle (the local trust domain is %s)", view.ServerBundle, td.Name()))
	}

	// A TLS 1.3 client finishes its handshake before the server has looked
	// at the client certificate; a refusal arrives as an alert on the first
	// read. So read once, briefly.
	wait := time.Now().Add(opts.ReadWait)
	if wait.After(deadline) {
		wait = deadline
	}
	_ = conn.SetReadDeadline(wait)
	body, rerr := readReply(conn)
	switch {
	case len(body) > 0:
		var reply admin.TestEndpointReply
		if err := json.Unmarshal(bytes.TrimSpace(body), &reply); err == nil && reply.Kind == admin.TestEndpointKind {
			res.Source = SourceTestEndpoint
			res.Connection = reply.Connection
			// The server says which bundle verified us; we say which
			// verified it.
			res.Connection.ServerBundle = view.ServerBundle
			if reply.Connection.ServerCertSHA256 != view.ServerCertSHA256 {
				res.Notes = append(res.Notes, fmt.Sprintf(
					"the server reports certificate %s but we received %s: something between us re-encrypts the connection",
					reply.Connection.ServerCertSHA256, view.ServerCertSHA256))
			}
		} else {
			res.Notes = append(res.Notes, fmt.Sprintf("the server sent %d bytes that are not a latch TLS test endpoint reply; fields are from our side", len(body)))
		}
	case rerr == nil || errors.Is(rerr, io.EOF):
		res.Notes = append(res.Notes, "the server closed the connection without sending anything; fields are from our side")
	case isTimeout(rerr):
		res.Notes = append(res.Notes, fmt.Sprintf("the server sent nothing within %s and did not refuse us (not a latch TLS test endpoint); fields are from our side", opts.ReadWait))
	default:
		c := handshakeClass(rerr)
		if c == ClassClosed {
			// A reset after a completed handshake is a server hanging up,
			// not a refusal TLS would have announced.
			res.Notes = append(res.Notes, "the server reset the connection after the handshake without an alert; fields are from our side")
			break
		}
		return fail(c, "first read", rerr, &view)
	}
	return res, nil
}

// readReply reads until EOF, an error, or 64 KiB: a test endpoint reply is
// one short JSON document followed by close_notify.
func readReply(conn *tls.Conn) ([]byte, error) {
	buf := make([]byte, 0, 4096)
	for len(buf) < 64<<10 {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if len(buf) > 0 && (errors.Is(err, io.EOF) || isTimeout(err)) {
				return buf, nil
			}
			return buf, err
		}
	}
	return buf, nil
}

// seenState keeps the connection state the verifier saw, so a refused
// handshake can still say what the server presented.
type seenState struct {
	mu sync.Mutex
	cs *tls.ConnectionState
}

func (s *seenState) set(cs tls.ConnectionState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cs = &cs
}

func (s *seenState) info() *identity.ConnectionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cs == nil {
		return nil
	}
	info := identity.DescribeConnection(*s.cs, false)
	return &info
}

// clientConfig is identity's client configuration, with two changes for a
// diagnostic client: the state the verifier saw is kept, and with no
// expected server ID any verified workload of the local trust domain is
// accepted. identity reports a wrong server ID only after the chain, the
// trust domain and the key usage have been verified, so accepting that one
// error, for a peer of td, accepts exactly a verified member of td.
func clientConfig(opts Options, td spiffeid.TrustDomain) (*tls.Config, *seenState) {
	fed := slices.Clone(opts.FederatesWith)
	if std := opts.ServerID.TrustDomain(); !opts.ServerID.IsZero() && std != td && !slices.Contains(fed, std) {
		fed = append(fed, std)
	}
	cfg := opts.TLS.ClientConfig(opts.Profile, opts.ServerID, identity.FederatesWith(fed...)).Clone()
	// Each check is one full handshake: a resumed session would describe
	// an earlier one.
	cfg.ClientSessionCache = nil
	cfg.ServerName = opts.ServerName
	seen := &seenState{}
	verify := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		seen.set(cs)
		err := verify(cs)
		if err != nil && opts.ServerID.IsZero() {
			if ve, ok := errors.AsType[*identity.VerifyError](err); ok &&
				ve.Class == identity.ClassWrongServerID && (ve.Peer.MemberOf(td) || slices.Contains(fed, ve.Peer.TrustDomain())) {
				return nil
			}
		}
		return err
	}
	return cfg, seen
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	ne, ok := errors.AsType[net.Error](err)
	return ok && ne.Timeout()
}

func dialClass(err error) Class {
	if isTimeout(err) {
		return ClassTimeout
	}
	return ClassUnreachable
}

// handshakeClass classifies an error of the handshake or of the first read.
func handshakeClass(err error) Class {
	// Our own verification of the server.
	if ve, ok := errors.AsType[*identity.VerifyError](err); ok {
		return fromIdentityClass(ve.Class)
	}
	// An alert from the server: it refused something of ours.
	if a, ok := remoteAlert(err); ok {
		switch a {
		case 40, 71: // handshake_failure, insufficient_security
			return ClassNoSharedCipher
		case 70: // protocol_version
			return ClassProtocolVersion
		case 42, 43, 44, 45, 46, 48, 49, 116:
			// bad_certificate, unsupported_certificate, certificate_revoked,
			// certificate_expired, certificate_unknown, unknown_ca,
			// access_denied, certificate_required: our certificate.
			return ClassClientRefused
		}
		return ClassOther
	}
	if isTimeout(err) {
		return ClassTimeout
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return ClassClosed
	}
	return fromIdentityClass(identity.ClassOf(err))
}

// remoteAlert returns the alert a peer sent. crypto/tls returns it as a
// net.OpError{Op: "remote error"} around an unexported type whose text is
// that of the tls.AlertError of the same number.
func remoteAlert(err error) (tls.AlertError, bool) {
	op, ok := errors.AsType[*net.OpError](err)
	if !ok || op.Op != "remote error" || op.Err == nil {
		return 0, false
	}
	text := op.Err.Error()
	for a := range 256 {
		if tls.AlertError(a).Error() == text {
			return tls.AlertError(a), true
		}
	}
	return 0, false
}
