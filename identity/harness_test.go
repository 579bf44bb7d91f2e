package identity_test

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	trustDomain = "mesh.test"
	serverID    = "spiffe://mesh.test/ns/server"
	clientID    = "spiffe://mesh.test/ns/client"
	ioTimeout   = 5 * time.Second
)

// handshake is what one side saw of one connection.
type handshake struct {
	state tls.ConnectionState
	err   error
}

// tlsServer is a loopback TLS server: it handshakes every connection with its
// config, reports the result, and on success writes one byte ('k') and then
// echoes until the client closes.
type tlsServer struct {
	addr    string
	results chan handshake

	mu    sync.Mutex
	conns []net.Conn
}

func startServer(t testing.TB, cfg *tls.Config) *tlsServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsServer{addr: ln.Addr().String(), results: make(chan handshake, 16)}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			wg.Go(func() { s.handle(c, cfg) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		wg.Wait()
	})
	return s
}

func (s *tlsServer) handle(c net.Conn, cfg *tls.Config) {
	defer c.Close()
	tc := tls.Server(c, cfg)
	_ = tc.SetDeadline(time.Now().Add(ioTimeout))
	err := tc.Handshake()
	select {
	case s.results <- handshake{tc.ConnectionState(), err}:
	default: // nobody is looking (benchmarks)
	}
	if err != nil {
		return
	}
	_ = tc.SetDeadline(time.Time{})
	if _, err := tc.Write([]byte{'k'}); err != nil {
		return
	}
	_, _ = io.Copy(tc, tc)
}

// next returns the result of the server's next handshake.
func (s *tlsServer) next(t testing.TB) handshake {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case <-time.After(ioTimeout):
		t.Fatal("server saw no handshake")
		return handshake{}
	}
}

// dial connects to addr with cfg and reads the server's first byte, which in
// TLS 1.3 is where a client learns that the server refused its certificate,
// and which makes the client take in the session tickets sent before it. The
// connection stays open until the test ends.
func dial(t testing.TB, addr string, cfg *tls.Config) (*tls.Conn, handshake) {
	t.Helper()
	raw, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	tc := tls.Client(raw, cfg)
	_ = tc.SetDeadline(time.Now().Add(ioTimeout))
	if err := tc.Handshake(); err != nil {
		return nil, handshake{tc.ConnectionState(), err}
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(tc, b); err != nil {
		return nil, handshake{tc.ConnectionState(), err}
	}
	if b[0] != 'k' {
		t.Fatalf("server sent %q, want 'k'", b)
	}
	_ = tc.SetDeadline(time.Time{})
	return tc, handshake{tc.ConnectionState(), nil}
}

// hostileClient presents cert whatever the server asks, and checks nothing.
func hostileClient(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		InsecureSkipVerify:   true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	}
}

// hostileServer presents cert and asks nothing of the client.
func hostileServer(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil },
	}
}

// echo writes msg on c and reads it back.
func echo(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("echo write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("echo read: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

func peerOf(t testing.TB, cs tls.ConnectionState) string {
	t.Helper()
	id, err := identity.PeerID(cs)
	if err != nil {
		t.Fatalf("PeerID: %v", err)
	}
	return id.String()
}

func mustID(s string) spiffeid.ID { return spiffeid.RequireFromString(s) }

// allowOnly authorizes exactly the given IDs.
func allowOnly(ids ...string) func(spiffeid.ID) error {
	var rules []identity.Rule
	for _, id := range ids {
		rules = append(rules, identity.AllowID(mustID(id)))
	}
	return identity.NewAllowList(rules...).Authorize
}

// wantRefused checks that a handshake failed with class, naming the reason.
func wantRefused(t testing.TB, side string, h handshake, class identity.Class, msg string) {
	t.Helper()
	if h.err == nil {
		t.Fatalf("%s: handshake succeeded, want refusal (%s)", side, class)
	}
	if got := identity.ClassOf(h.err); got != class {
		t.Errorf("%s: ClassOf(%v) = %q, want %q", side, h.err, got, class)
	}
	if !strings.Contains(h.err.Error(), msg) {
		t.Errorf("%s: error %q does not mention %q", side, h.err, msg)
	}
}

func verifyErrorOf(t testing.TB, err error) *identity.VerifyError {
	t.Helper()
	var ve *identity.VerifyError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v (%T) is not a *identity.VerifyError", err, err)
	}
	return ve
}

// world is a trust domain with a server and a client workload.
type world struct {
	ca       *identitytest.CA
	server   *identitytest.Source
	client   *identitytest.Source
	serverTL *identity.TLS
	clientTL *identity.TLS
}

func newWorld(t testing.TB) *world {
	t.Helper()
	ca := identitytest.NewCA(t, trustDomain)
	w := &world{ca: ca, server: ca.Source(t, serverID), client: ca.Source(t, clientID)}
	w.serverTL = identity.NewTLS(w.server)
	w.clientTL = identity.NewTLS(w.client)
	return w
}

// secondCA adds a new CA to the trust domain and makes both sides trust it
// next to the first, as during a CA rollover. It returns the new CA and the
// bundle holding both.
func (w *world) secondCA(t testing.TB) (*identitytest.CA, *x509bundle.Bundle) {
	t.Helper()
	next := identitytest.NewCA(t, trustDomain)
	both := w.ca.Bundle()
	both.AddX509Authority(next.Cert())
	w.server.SetBundle(both)
	w.client.SetBundle(both)
	return next, both
}
