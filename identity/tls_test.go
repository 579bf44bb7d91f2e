package identity_test

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

func tls12Only(t *testing.T) identity.Profile {
	t.Helper()
	p, err := identity.Intermediate().Narrow(identity.Params{MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func mustConnect(t *testing.T, side string, h handshake) tls.ConnectionState {
	t.Helper()
	if h.err != nil {
		t.Fatalf("%s: handshake failed: %v", side, h.err)
	}
	return h.state
}

func TestModernNegotiatesPostQuantumKeyExchange(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	_, client := dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	server := srv.next(t)
	for side, cs := range map[string]tls.ConnectionState{"client": mustConnect(t, "client", client), "server": mustConnect(t, "server", server)} {
		if cs.Version != tls.VersionTLS13 {
			t.Errorf("%s: version %s, want TLS 1.3", side, identity.VersionName(cs.Version))
		}
		if cs.CurveID != tls.X25519MLKEM768 {
			t.Errorf("%s: key exchange %s, want X25519MLKEM768", side, cs.CurveID)
		}
	}
	if got := peerOf(t, server.state); got != clientID {
		t.Errorf("server sees %s, want %s", got, clientID)
	}
}

func TestIntermediateAcceptsTLS12WithECDHEAndAEAD(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Intermediate(), allowOnly(clientID)))

	_, client := dial(t, srv.addr, w.clientTL.ClientConfig(tls12Only(t), mustID(serverID)))
	cs := mustConnect(t, "TLS 1.2 client", client)
	mustConnect(t, "server", srv.next(t))
	if cs.Version != tls.VersionTLS12 {
		t.Errorf("version %s, want TLS 1.2", identity.VersionName(cs.Version))
	}
	if got := tls.CipherSuiteName(cs.CipherSuite); got != "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" && got != "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" && got != "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" {
		t.Errorf("suite %s, want an ECDHE AEAD suite", got)
	}

	// A modern client still gets TLS 1.3 from an intermediate server.
	_, client = dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	if cs := mustConnect(t, "modern client", client); cs.Version != tls.VersionTLS13 {
		t.Errorf("modern client against intermediate server: %s", identity.VersionName(cs.Version))
	}
	mustConnect(t, "server", srv.next(t))
}

// Clients that want something weaker than the profile are refused by Go's TLS
// stack itself, and both sides classify the refusal.
func TestWeakClientsAreRefused(t *testing.T) {
	w := newWorld(t)
	modern := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	intermediate := startServer(t, w.serverTL.ServerConfig(identity.Intermediate(), allowOnly(clientID)))
	cert := w.ca.TLSCertificate(t, clientID)

	weak := func(maxVersion uint16, suites []uint16, curves []tls.CurveID) *tls.Config {
		c := hostileClient(cert)
		c.MinVersion, c.MaxVersion = tls.VersionTLS10, maxVersion
		c.CipherSuites = suites
		c.CurvePreferences = curves
		return c
	}
	tests := []struct {
		name   string
		server *tlsServer
		client *tls.Config
		class  identity.Class
	}{
		{"TLS 1.2-only client vs modern", modern, weak(tls.VersionTLS12, nil, nil), identity.ClassProtocolVersion},
		{"TLS 1.0-only client vs intermediate", intermediate, weak(tls.VersionTLS10, nil, nil), identity.ClassProtocolVersion},
		{"CBC-only client vs intermediate", intermediate, weak(tls.VersionTLS12, []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA, tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,
		}, nil), identity.ClassNoSharedCipher},
		{"RSA key exchange-only client vs intermediate", intermediate, weak(tls.VersionTLS12, []uint16{
			tls.TLS_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_RSA_WITH_AES_256_GCM_SHA384, tls.TLS_RSA_WITH_AES_128_CBC_SHA,
		}, nil), identity.ClassNoSharedCipher},
		{"P-384-only client vs modern", modern, weak(tls.VersionTLS13, nil, []tls.CurveID{tls.CurveP384}), identity.ClassNoSharedCipher},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, client := dial(t, tt.server.addr, tt.client)
			server := tt.server.next(t)
			t.Logf("server: %v; client: %v", server.err, client.err)
			wantRefused(t, "server", server, tt.class, "")
			wantRefused(t, "client", client, tt.class, "")
		})
	}
}

// A modern latch client refuses a server that offers only TLS 1.2.
func TestModernClientRefusesTLS12Server(t *testing.T) {
	w := newWorld(t)
	cfg := hostileServer(w.ca.TLSCertificate(t, serverID))
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	srv := startServer(t, cfg)
	_, client := dial(t, srv.addr, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	wantRefused(t, "client", client, identity.ClassProtocolVersion, "")
	wantRefused(t, "server", srv.next(t), identity.ClassProtocolVersion, "")
}

func TestPlaintextIsNotTLS(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	c, err := net.Dial("tcp", srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	wantRefused(t, "server", srv.next(t), identity.ClassNotTLS, "does not look like a TLS handshake")

	// And a latch client talking to a plaintext server.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
		_, _ = io.WriteString(c, "HTTP/1.0 400 Bad Request\r\n\r\n")
	}()
	_, client := dial(t, ln.Addr().String(), w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	wantRefused(t, "client", client, identity.ClassNotTLS, "")
	if c := <-accepted; c != nil {
		c.Close()
	}
}

func TestStalledHandshakeIsTimeout(t *testing.T) {
	w := newWorld(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	res := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			res <- err
			return
		}
		defer c.Close()
		tc := tls.Server(c, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
		_ = tc.SetDeadline(time.Now().Add(100 * time.Millisecond))
		res <- tc.Handshake()
	}()
	// A client that connects and says nothing (slowloris).
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if got := identity.ClassOf(<-res); got != identity.ClassTimeout {
		t.Errorf("server: class %q, want timeout", got)
	}

	// A client whose server says nothing.
	silent := make(chan struct{})
	go func() {
		defer close(silent)
		c, err := ln.Accept()
		if err == nil {
			defer c.Close()
			_, _ = io.Copy(io.Discard, c)
		}
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raw, w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)))
	_ = tc.SetDeadline(time.Now().Add(100 * time.Millisecond))
	if err := tc.Handshake(); identity.ClassOf(err) != identity.ClassTimeout {
		t.Errorf("client: %v classified %q, want timeout", err, identity.ClassOf(err))
	}
	raw.Close()
	<-silent
}

// The point of verifying in VerifyConnection: a resumed session (whose peer
// certificate comes out of the ticket, with no new certificate exchange) is
// authorized again, against the policy of now.
func TestResumedSessionIsAuthorizedAgain(t *testing.T) {
	for _, p := range []identity.Profile{identity.Modern(), tls12Only(t)} {
		t.Run(identity.VersionName(p.MaxVersion), func(t *testing.T) {
			w := newWorld(t)
			var deny atomic.Bool
			authorize := func(id spiffeid.ID) error {
				if deny.Load() {
					return fmt.Errorf("peer %s: %w", id, identity.ErrNotAllowed)
				}
				return allowOnly(clientID)(id)
			}
			srv := startServer(t, w.serverTL.ServerConfig(p, authorize))
			cfg := w.clientTL.ClientConfig(p, mustID(serverID))

			_, h := dial(t, srv.addr, cfg)
			if mustConnect(t, "first", h).DidResume {
				t.Fatal("first handshake resumed")
			}
			mustConnect(t, "first (server)", srv.next(t))

			_, h = dial(t, srv.addr, cfg)
			server := srv.next(t)
			if !mustConnect(t, "second", h).DidResume || !mustConnect(t, "second (server)", server).DidResume {
				t.Fatal("second handshake did not resume: the test would prove nothing")
			}
			if got := peerOf(t, server.state); got != clientID {
				t.Errorf("resumed session: server sees %s", got)
			}

			deny.Store(true)
			_, h = dial(t, srv.addr, cfg)
			server = srv.next(t)
			wantRefused(t, "server", server, identity.ClassNotAllowed, "peer "+clientID+": not in allow-list (resumed session)")
			if h.err == nil {
				t.Error("client connected although the server refused it")
			}
			if ve := verifyErrorOf(t, server.err); !ve.Resumed {
				t.Error("refusal did not happen on a resumed session")
			}
		})
	}
}

// A client's shared session cache must not carry a session over to a
// configuration expecting another server.
func TestResumedSessionIsCheckedAgainstExpectedServer(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
	for range 2 {
		_, h := dial(t, srv.addr, cfg)
		mustConnect(t, "client", h)
		srv.next(t)
	}
	other := w.clientTL.ClientConfig(identity.Modern(), mustID("spiffe://mesh.test/ns/elsewhere"))
	_, h := dial(t, srv.addr, other)
	wantRefused(t, "client", h, identity.ClassWrongServerID, "expected spiffe://mesh.test/ns/elsewhere (resumed session)")
	if !verifyErrorOf(t, h.err).Resumed {
		t.Error("refusal did not happen on a resumed session")
	}
}

// Removing a CA from the bundle ends resumption of the sessions it vouched
// for, on both sides: the chain is verified again against the bundle of now.
func TestResumedSessionOfRemovedCAIsRefused(t *testing.T) {
	for _, side := range []string{"server", "client"} {
		t.Run("by the "+side, func(t *testing.T) {
			w := newWorld(t)
			retired, _ := w.secondCA(t)
			// The peer of the refusing side holds a certificate of the CA to be removed.
			verifier := w.server
			if side == "server" {
				w.client.SetSVID(retired.SVID(t, clientID))
			} else {
				w.server.SetSVID(retired.SVID(t, serverID))
				verifier = w.client
			}
			srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
			cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
			for i := range 2 {
				_, h := dial(t, srv.addr, cfg)
				cs := mustConnect(t, "client", h)
				mustConnect(t, "server", srv.next(t))
				if resumed := cs.DidResume; resumed != (i == 1) {
					t.Fatalf("handshake %d: DidResume = %v", i, resumed)
				}
			}

			verifier.SetBundle(w.ca.Bundle())
			_, client := dial(t, srv.addr, cfg)
			server := srv.next(t)
			refused := server
			if side == "client" {
				refused = client
			}
			wantRefused(t, side, refused, identity.ClassUnknownCA, "(resumed session)")
			if !verifyErrorOf(t, refused.err).Resumed {
				t.Error("refusal did not happen on a resumed session")
			}
		})
	}
}

// Rotation: the next handshake serves the new SVID; a live connection made
// with the old one keeps working.
func TestRotationTakesEffectPerHandshake(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), func(id spiffeid.ID) error { return allowOnly(clientID)(id) }))
	cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)).Clone()
	cfg.ClientSessionCache = nil // every handshake full, so every one shows the certificate of the moment

	old, h := dial(t, srv.addr, cfg)
	first := mustConnect(t, "first", h).PeerCertificates[0]
	firstClient := mustConnect(t, "first (server)", srv.next(t)).PeerCertificates[0]

	newServer, newClient := w.ca.SVID(t, serverID), w.ca.SVID(t, clientID)
	w.server.SetSVID(newServer)
	w.client.SetSVID(newClient)

	fresh, h := dial(t, srv.addr, cfg)
	second := mustConnect(t, "second", h).PeerCertificates[0]
	secondClient := mustConnect(t, "second (server)", srv.next(t)).PeerCertificates[0]
	if first.Equal(second) || !second.Equal(newServer.Certificates[0]) {
		t.Error("server still serves the old SVID after rotation")
	}
	if firstClient.Equal(secondClient) || !secondClient.Equal(newClient.Certificates[0]) {
		t.Error("client still presents the old SVID after rotation")
	}
	echo(t, old, "established before rotation")
	echo(t, fresh, "established after rotation")
}

// CA rollover: while the bundle holds the old and the new CA, peers signed by
// either are accepted in both directions; once the old CA leaves the bundle,
// its certificates are refused.
func TestCARolloverWithOverlap(t *testing.T) {
	w := newWorld(t)
	next, _ := w.secondCA(t)

	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)).Clone()
	cfg.ClientSessionCache = nil
	for _, c := range []struct {
		name           string
		server, client *identitytest.CA
	}{
		{"old server, old client", w.ca, w.ca},
		{"new server, old client", next, w.ca},
		{"old server, new client", w.ca, next},
		{"new server, new client", next, next},
	} {
		w.server.SetSVID(c.server.SVID(t, serverID))
		w.client.SetSVID(c.client.SVID(t, clientID))
		_, h := dial(t, srv.addr, cfg)
		mustConnect(t, c.name+": client", h)
		mustConnect(t, c.name+": server", srv.next(t))
	}

	// The old CA retires while a client still holds one of its SVIDs.
	w.client.SetSVID(w.ca.SVID(t, clientID))
	w.server.SetBundle(next.Bundle())
	_, _ = dial(t, srv.addr, cfg)
	wantRefused(t, "server after the old CA left its bundle", srv.next(t), identity.ClassUnknownCA, "not signed by a CA")
}

func TestDescribeConnection(t *testing.T) {
	w := newWorld(t)
	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID)).Clone()
	cfg.ServerName = "server.mesh.test"
	_, h := dial(t, srv.addr, cfg)
	clientState := mustConnect(t, "client", h)
	serverState := mustConnect(t, "server", srv.next(t))

	svid, err := w.server.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	leaf := svid.Certificates[0]
	sum := sha256.Sum256(leaf.Raw)
	want := identity.ConnectionInfo{
		Version:          "TLS 1.3",
		CipherSuite:      tls.CipherSuiteName(clientState.CipherSuite),
		KeyExchangeGroup: "X25519MLKEM768",
		SNI:              "server.mesh.test",
		ServerSPIFFEID:   serverID,
		ClientSPIFFEID:   clientID,
		ServerCertSHA256: hex.EncodeToString(sum[:]),
		ServerCertSerial: leaf.SerialNumber.Text(16),
		Issuer:           w.ca.Cert().Subject.String(),
		NotBefore:        leaf.NotBefore.UTC().Format(time.RFC3339),
		NotAfter:         leaf.NotAfter.UTC().Format(time.RFC3339),
		NotAfterASN1:     leaf.NotAfter.UTC().Format("060102150405Z"),
	}

	clientLocal, err := w.clientTL.LocalCertificate()
	if err != nil {
		t.Fatal(err)
	}
	serverLocal, err := w.serverTL.LocalCertificate()
	if err != nil {
		t.Fatal(err)
	}
	// Each side names the bundle that verified its peer.
	wantClient, wantServer := want, want
	wantClient.ServerBundle, wantServer.ClientBundle = "mesh.test", "mesh.test"
	if got := identity.DescribeConnectionLocal(clientState, false, clientLocal); got != wantClient {
		t.Errorf("client side:\n got %+v\nwant %+v", got, wantClient)
	}
	if got := identity.DescribeConnectionLocal(serverState, true, serverLocal); got != wantServer {
		t.Errorf("server side:\n got %+v\nwant %+v", got, wantServer)
	}

	// Without the local certificate, each side knows only its peer.
	partial := identity.DescribeConnection(clientState, false)
	if partial.ClientSPIFFEID != "" || partial.ServerSPIFFEID != serverID || partial.ServerCertSHA256 != want.ServerCertSHA256 {
		t.Errorf("client side without local: %+v", partial)
	}
	partial = identity.DescribeConnection(serverState, true)
	if partial.ClientSPIFFEID != clientID || partial.ServerSPIFFEID != "" || partial.ServerCertSHA256 != "" {
		t.Errorf("server side without local: %+v", partial)
	}

	b, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(b, &fields); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"version", "cipher_suite", "key_exchange_group", "resumed", "sni", "server_spiffe_id", "client_spiffe_id",
		"server_cert_sha256", "server_cert_serial", "issuer", "not_before", "not_after", "not_after_asn1"} {
		if _, ok := fields[k]; !ok {
			t.Errorf("JSON lacks %q: %s", k, b)
		}
	}
}

func TestPeerID(t *testing.T) {
	if _, err := identity.PeerID(tls.ConnectionState{}); err == nil {
		t.Error("PeerID of an incomplete handshake succeeded")
	}
	if _, err := identity.PeerID(tls.ConnectionState{HandshakeComplete: true}); err == nil {
		t.Error("PeerID without certificates succeeded")
	}
}

// SPIRE may issue RSA SVIDs: they work under both profiles, and under
// intermediate's TLS 1.2 with an ECDHE_RSA AEAD suite.
func TestRSASVIDs(t *testing.T) {
	w := newWorld(t)
	w.server.SetSVID(w.ca.SVID(t, serverID, identitytest.RSAKey(2048)))
	w.client.SetSVID(w.ca.SVID(t, clientID, identitytest.RSAKey(2048)))
	srv := startServer(t, w.serverTL.ServerConfig(identity.Intermediate(), allowOnly(clientID)))
	for _, tt := range []struct {
		profile identity.Profile
		version uint16
	}{
		{identity.Modern(), tls.VersionTLS13},
		{tls12Only(t), tls.VersionTLS12},
	} {
		_, h := dial(t, srv.addr, w.clientTL.ClientConfig(tt.profile, mustID(serverID)))
		cs := mustConnect(t, "client", h)
		mustConnect(t, "server", srv.next(t))
		if cs.Version != tt.version {
			t.Errorf("version %s, want %s", identity.VersionName(cs.Version), identity.VersionName(tt.version))
		}
		if name := tls.CipherSuiteName(cs.CipherSuite); tt.version == tls.VersionTLS12 && !strings.HasPrefix(name, "TLS_ECDHE_RSA_WITH_") {
			t.Errorf("suite %s, want ECDHE_RSA", name)
		}
	}
}

// Handshakes racing with rotations of both SVIDs and with bundle updates never
// fail (and the race detector sees the certificate cache shared safely).
func TestConcurrentHandshakesDuringRotation(t *testing.T) {
	w := newWorld(t)
	next, both := w.secondCA(t)
	var serverSVIDs, clientSVIDs []*x509svid.SVID
	for _, ca := range []*identitytest.CA{w.ca, next, w.ca, next} {
		serverSVIDs = append(serverSVIDs, ca.SVID(t, serverID))
		clientSVIDs = append(clientSVIDs, ca.SVID(t, clientID))
	}

	srv := startServer(t, w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID)))
	stop := make(chan struct{})
	rotated := make(chan int)
	go func() {
		n := 0
		defer func() { rotated <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			w.server.SetSVID(serverSVIDs[n%len(serverSVIDs)])
			w.client.SetSVID(clientSVIDs[(n+1)%len(clientSVIDs)])
			w.server.SetBundle(both)
			n++
		}
	}()

	cfg := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
	var failures atomic.Int64
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			for range 15 {
				c, h := dial(t, srv.addr, cfg)
				if h.err != nil {
					failures.Add(1)
					t.Errorf("handshake during rotation: %v", h.err)
					continue
				}
				c.Close()
			}
		})
	}
	wg.Wait()
	close(stop)
	if n := <-rotated; n == 0 {
		t.Error("no rotation happened during the handshakes")
	}
	if f := failures.Load(); f > 0 {
		t.Errorf("%d of 45 handshakes failed", f)
	}
}

// The shape that keeps Go's web-PKI verification (and so the system roots) out
// of every handshake while latch's own verification stays in.
func TestConfigsNeverConsultSystemRoots(t *testing.T) {
	w := newWorld(t)
	server := w.serverTL.ServerConfig(identity.Modern(), allowOnly(clientID))
	if server.ClientCAs != nil || server.ClientAuth != tls.RequireAnyClientCert || server.VerifyConnection == nil || server.GetCertificate == nil {
		t.Errorf("server config: ClientCAs %v, ClientAuth %v, VerifyConnection set %v", server.ClientCAs, server.ClientAuth, server.VerifyConnection != nil)
	}
	client := w.clientTL.ClientConfig(identity.Modern(), mustID(serverID))
	if client.RootCAs != nil || !client.InsecureSkipVerify || client.VerifyConnection == nil || client.VerifyPeerCertificate != nil || client.GetClientCertificate == nil {
		t.Errorf("client config: RootCAs %v, InsecureSkipVerify %v, VerifyConnection set %v", client.RootCAs, client.InsecureSkipVerify, client.VerifyConnection != nil)
	}
	if client.ClientSessionCache == nil || client.SessionTicketsDisabled || server.SessionTicketsDisabled {
		t.Error("session resumption is off")
	}
}
