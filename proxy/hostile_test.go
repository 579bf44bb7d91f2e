package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// TestHostilePeers connects to an inbound listener in every way a peer
// should be refused, and checks for each that the app saw no connection and
// no byte, and that the refusal was logged with its class and reason.
func TestHostilePeers(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	otherCA := identitytest.NewCA(t, trustDomain) // same name, different key
	foreignCA := identitytest.NewCA(t, "evil.test")
	backend := identity.NewTLS(ca.Source(t, backendID))
	frontend := identity.NewTLS(ca.Source(t, frontendID))
	const handshakeTimeout = 500 * time.Millisecond
	limits := func(in *Inbound) { in.HandshakeTimeout = handshakeTimeout }
	modern := newMeshWith(t, echo, meshOptions{inbound: limits, metrics: NewMetrics(nil)}, backend, frontend, ca)
	intermediate := newMeshWith(t, echo, meshOptions{inbound: limits, metrics: NewMetrics(nil), profile: identity.Intermediate()}, backend, frontend, ca)

	cert := func(c *identitytest.CA, id string, opts ...identitytest.LeafOption) func(t *testing.T) []tls.Certificate {
		return func(t *testing.T) []tls.Certificate { return []tls.Certificate{c.TLSCertificate(t, id, opts...)} }
	}
	tls12Only := func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12 }

	for _, tc := range []struct {
		name string
		// Exactly one of cert (a TLS client with that certificate) or raw
		// (bytes written on a plain TCP connection, which then stalls).
		cert         func(t *testing.T) []tls.Certificate
		tweak        func(*tls.Config)
		raw          []byte
		intermediate bool
		class        identity.Class
		peerID       string
	}{
		{name: "cert from another CA", cert: cert(otherCA, frontendID), class: identity.ClassUnknownCA},
		{name: "another trust domain", cert: cert(foreignCA, "spiffe://evil.test/ns/default/sa/frontend"), class: identity.ClassWrongTrustDomain},
		{name: "expired", cert: cert(ca, frontendID, identitytest.Expired()), class: identity.ClassExpired},
		{name: "not yet valid", cert: cert(ca, frontendID, identitytest.NotYetValid()), class: identity.ClassNotYetValid},
		{name: "no URI SAN", cert: cert(ca, "", identitytest.DNSNames("frontend.default.svc")), class: identity.ClassBadSVID},
		{name: "two URI SANs", cert: cert(ca, frontendID, identitytest.URIs(frontendID, otherID)), class: identity.ClassBadSVID},
		{name: "non-SPIFFE URI", cert: cert(ca, "", identitytest.URIs("https://frontend.example")), class: identity.ClassBadSVID},
		{name: "CA certificate as leaf", cert: cert(ca, frontendID, identitytest.AsCA()), class: identity.ClassBadSVID},
		{name: "wrong key usage", cert: cert(ca, frontendID, identitytest.KeyUsage(x509.KeyUsageKeyEncipherment)), class: identity.ClassBadKeyUsage},
		{name: "no client-auth EKU", cert: cert(ca, frontendID, identitytest.ExtKeyUsage(x509.ExtKeyUsageServerAuth)), class: identity.ClassBadKeyUsage},
		{name: "no certificate", cert: func(*testing.T) []tls.Certificate { return nil }, class: identity.ClassBadSVID},
		{name: "SPIFFE ID not in allow-list", cert: cert(ca, intruderID), class: identity.ClassNotAllowed, peerID: intruderID},
		{name: "TLS 1.2-only client against modern", cert: cert(ca, frontendID), tweak: tls12Only, class: identity.ClassProtocolVersion},
		{
			name: "CBC and RSA key exchange only against intermediate", cert: cert(ca, frontendID), intermediate: true,
			tweak: func(c *tls.Config) {
				tls12Only(c)
				c.CipherSuites = []uint16{
					tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
					tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, tls.TLS_RSA_WITH_AES_128_GCM_SHA256,
					tls.TLS_RSA_WITH_AES_128_CBC_SHA,
				}
			},
			class: identity.ClassNoSharedCipher,
		},
		{name: "plaintext bytes", raw: []byte("GET / HTTP/1.1\r\nHost: web\r\n\r\n"), class: identity.ClassNotTLS},
		// A TLS record header announcing a ClientHello that never comes.
		{name: "slowloris handshake", raw: []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}, class: identity.ClassTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := modern
			if tc.intermediate {
				m = intermediate
			}
			mark := m.logs.mark()
			accepted, read := m.app.accepted.Load(), m.app.read.Load()
			failures := m.inbound.metrics.handshakeFailures.WithLabelValues("web", "inbound", string(tc.class))
			denials := m.inbound.metrics.denials.WithLabelValues("web")
			failuresBefore, denialsBefore := metricValue(t, failures), metricValue(t, denials)
			start := time.Now()

			raw, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			raw.SetDeadline(time.Now().Add(waitFor))
			var peer net.Conn = raw
			if tc.raw != nil {
				if _, err := raw.Write(tc.raw); err != nil {
					t.Fatal(err)
				}
			} else {
				cfg := &tls.Config{
					// A hostile client does not care who the server is.
					InsecureSkipVerify: true,
					Certificates:       tc.cert(t),
				}
				if tc.tweak != nil {
					tc.tweak(cfg)
				}
				tc := tls.Client(raw, cfg)
				// In TLS 1.3 the client's handshake ends before the server
				// has judged its certificate: the refusal arrives on the
				// first read. Either way, the application data written
				// here must never reach the app.
				if err := tc.Handshake(); err == nil {
					tc.Write([]byte("secret request"))
				}
				peer = tc
			}
			if _, err := io.Copy(io.Discard, peer); isTimeout(err) {
				t.Fatal("the inbound listener did not close the connection")
			}

			want := map[string]string{"listener": "web", "class": string(tc.class)}
			if tc.peerID != "" {
				want["peer_id"] = tc.peerID
			}
			r := m.logs.wait(t, mark, "handshake refused", want)
			if r.attrs["reason"] == "" || r.attrs["remote_addr"] == "" {
				t.Errorf("refusal logged without reason or remote_addr: %v", r)
			}
			if tc.class == identity.ClassTimeout {
				if el := time.Since(start); el < handshakeTimeout*9/10 {
					t.Errorf("slow handshake cut after %v, before the %v deadline", el, handshakeTimeout)
				}
			}
			if n := metricValue(t, failures) - failuresBefore; n != 1 {
				t.Errorf("latch_handshake_failures_total{class=%q} grew by %v, want 1", tc.class, n)
			}
			wantDenials := 0.0
			if tc.class == identity.ClassNotAllowed {
				wantDenials = 1
			}
			if n := metricValue(t, denials) - denialsBefore; n != wantDenials {
				t.Errorf("latch_authorization_denials_total grew by %v, want %v", n, wantDenials)
			}
			if a, n := m.app.accepted.Load()-accepted, m.app.read.Load()-read; a != 0 || n != 0 {
				t.Fatalf("app saw %d connections and %d bytes from a refused peer", a, n)
			}
		})
	}

	// A well-behaved peer still gets through both listeners afterwards.
	for _, m := range []*mesh{modern, intermediate} {
		c := m.dial(t)
		if err := roundTrip(c, "legit"); err != nil {
			t.Fatalf("legitimate traffic after the hostile peers: %v", err)
		}
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestOutboundRefusesWrongServer: an upstream that proves another SPIFFE ID
// than the outbound listener's serverID is refused, and the app's bytes never
// reach it.
func TestOutboundRefusesWrongServer(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	impostor := identity.NewTLS(ca.Source(t, "spiffe://mesh.test/ns/default/sa/impostor"))
	ln, err := tls.Listen("tcp", "127.0.0.1:0", impostor.ServerConfig(identity.Modern(), func(spiffeid.ID) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	received := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- -1
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(waitFor))
		n, _ := io.Copy(io.Discard, c)
		received <- n
	}()

	logs := newLogs()
	s := startServer(t, identity.NewTLS(ca.Source(t, frontendID)), &Config{Outbound: []Outbound{{
		Name: "backend", Listen: "127.0.0.1:0", Upstreams: []string{ln.Addr().String()}, ServerID: mustID(t, backendID),
	}}}, Options{Logger: logs.logger()})

	c, err := net.Dial("tcp", addrOf(t, s, "backend"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("secret request"))
	expectClosed(t, c)
	r := logs.wait(t, 0, "handshake refused", map[string]string{
		"listener": "backend", "direction": "outbound", "class": string(identity.ClassWrongServerID),
		"peer_id": "spiffe://mesh.test/ns/default/sa/impostor", "remote_addr": ln.Addr().String(),
	})
	t.Logf("logged: %v", r)
	if n := <-received; n != 0 {
		t.Fatalf("impostor upstream received %d bytes of the app's data", n)
	}
}

// TestProbesAreNotRefusals: a TCP connect and close on an inbound listener,
// what kubelet TCP probes, load-balancer health checks and port scanners do,
// is counted under class no_handshake and logged at debug level, never as a
// refused handshake; the same with a reset instead of a FIN. A peer that
// sent even one byte before closing is a failed TLS client and still is a
// warning.
func TestProbesAreNotRefusals(t *testing.T) {
	m := newMesh(t, echo, meshOptions{metrics: NewMetrics(nil)})
	class := func(c identity.Class) prometheus.Counter {
		return m.inbound.metrics.handshakeFailures.WithLabelValues("web", "inbound", string(c))
	}
	for _, tc := range []struct {
		name  string
		send  []byte
		reset bool
		class identity.Class
		msg   string
		level slog.Level
	}{
		{name: "connect and close", class: identity.ClassNoHandshake, msg: "closed before the handshake", level: slog.LevelDebug},
		{name: "connect and reset", reset: true, class: identity.ClassNoHandshake, msg: "closed before the handshake", level: slog.LevelDebug},
		{name: "one byte then close", send: []byte{0x16}, class: identity.ClassOther, msg: "handshake refused", level: slog.LevelWarn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mark := m.logs.mark()
			accepted := m.app.accepted.Load()
			counter := class(tc.class)
			before := metricValue(t, counter)
			c, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
			if err != nil {
				t.Fatal(err)
			}
			if tc.send != nil {
				if _, err := c.Write(tc.send); err != nil {
					t.Fatal(err)
				}
			}
			if tc.reset {
				c.(*net.TCPConn).SetLinger(0)
			}
			c.Close()

			r := m.logs.wait(t, mark, tc.msg, map[string]string{"listener": "web", "class": string(tc.class)})
			if r.level != tc.level || r.attrs["remote_addr"] == "" {
				t.Errorf("logged %v, want level %v with the remote address", r, tc.level)
			}
			if n := metricValue(t, counter) - before; n != 1 {
				t.Errorf("latch_handshake_failures_total{class=%q} grew by %v, want 1", tc.class, n)
			}
			m.logs.mu.Lock()
			for _, r := range m.logs.records[mark:] {
				if r.level >= slog.LevelWarn && tc.level < slog.LevelWarn {
					t.Errorf("a probe logged %v", r)
				}
			}
			m.logs.mu.Unlock()
			if n := m.app.accepted.Load() - accepted; n != 0 {
				t.Errorf("the app saw %d connections", n)
			}
		})
	}
}
