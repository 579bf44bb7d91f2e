package check

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/admin"
	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	td       = "mesh.test"
	clientID = "spiffe://mesh.test/ns/ops/sa/checker"
	serverID = "spiffe://mesh.test/ns/web/sa/backend"
)

// world is one trust domain with a client identity to check from.
type world struct {
	ca     *identitytest.CA
	client *identity.TLS
}

func newWorld(t *testing.T) *world {
	t.Helper()
	ca := identitytest.NewCA(t, td)
	return &world{ca: ca, client: identity.NewTLS(ca.Source(t, clientID))}
}

func (w *world) opts(addr string) Options {
	// ReadWait is generous: a refusal alert must arrive within it even on a
	// loaded machine, or the check would (rightly) pass.
	return Options{Addr: addr, TLS: w.client, Timeout: 5 * time.Second, ReadWait: 3 * time.Second}
}

// serveTLS runs a plain crypto/tls server with cfg on loopback: it completes
// the handshake and then holds the connection open, reading, until the
// client leaves. It is the misconfigured server of most cases.
func serveTLS(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	return serve(t, func(c net.Conn) {
		tc := tls.Server(c, cfg)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if tc.Handshake() != nil {
			return
		}
		_, _ = io.Copy(io.Discard, tc)
	})
}

// serve accepts on a loopback listener and runs handle per connection; the
// listener and every handler are gone when the test ends.
func serve(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { defer c.Close(); handle(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func certConfig(c tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{c}, ClientAuth: tls.RequestClientCert}
}

func TestDiagnosisClasses(t *testing.T) {
	w := newWorld(t)
	good := w.ca.TLSCertificate(t, serverID)

	closedPort := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr
	}

	denyAll := identity.NewTLS(w.ca.Source(t, serverID)).ServerConfig(identity.Modern(),
		func(spiffeid.ID) error { return errors.New("nobody is allowed here") })
	tls12Only := identity.Intermediate()
	tls12Only.MaxVersion = tls.VersionTLS12
	denyAll12 := identity.NewTLS(w.ca.Source(t, serverID)).ServerConfig(tls12Only,
		func(spiffeid.ID) error { return errors.New("nobody is allowed here") })

	tests := []struct {
		name    string
		addr    func() string
		edit    func(*Options)
		want    Class
		stage   string
		seenIss bool // a server certificate was seen and is reported
	}{
		{name: "closed port", addr: closedPort, want: ClassUnreachable, stage: "dial"},
		{name: "black hole", addr: func() string {
			// Accepts TCP and never says a word.
			return serve(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
		}, edit: func(o *Options) { o.Timeout = 500 * time.Millisecond }, want: ClassTimeout, stage: "handshake"},
		{name: "plaintext HTTP server", addr: func() string {
			s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello") }))
			t.Cleanup(s.Close)
			return s.Listener.Addr().String()
		}, want: ClassNotTLS, stage: "handshake"},
		{name: "hangs up at once", addr: func() string {
			return serve(t, func(c net.Conn) {})
		}, want: ClassClosed, stage: "handshake"},
		{name: "another CA of the same trust domain", addr: func() string {
			return serveTLS(t, certConfig(identitytest.NewCA(t, td).TLSCertificate(t, serverID)))
		}, want: ClassUnknownCA, stage: "handshake", seenIss: true},
		{name: "another trust domain", addr: func() string {
			return serveTLS(t, certConfig(identitytest.NewCA(t, "other.test").TLSCertificate(t, "spiffe://other.test/ns/web/sa/backend")))
		}, want: ClassWrongTrustDomain, stage: "handshake", seenIss: true},
		{name: "not an SVID", addr: func() string {
			return serveTLS(t, certConfig(w.ca.TLSCertificate(t, "", identitytest.DNSNames("backend.example"))))
		}, want: ClassBadSVID, stage: "handshake", seenIss: true},
		{name: "client-auth-only certificate", addr: func() string {
			return serveTLS(t, certConfig(w.ca.TLSCertificate(t, serverID, identitytest.ExtKeyUsage(0x2))))
		}, want: ClassBadKeyUsage, stage: "handshake", seenIss: true},
		{name: "TLS 1.2-only server, modern client", addr: func() string {
			cfg := certConfig(good)
			cfg.MaxVersion = tls.VersionTLS12
			return serveTLS(t, cfg)
		}, want: ClassProtocolVersion, stage: "handshake"},
		{name: "no shared group", addr: func() string {
			cfg := certConfig(good)
			cfg.CurvePreferences = []tls.CurveID{tls.CurveP521}
			return serveTLS(t, cfg)
		}, want: ClassNoSharedCipher, stage: "handshake"},
		{name: "no shared TLS 1.2 suite", addr: func() string {
			cfg := certConfig(good)
			cfg.MaxVersion = tls.VersionTLS12
			cfg.CipherSuites = []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}
			return serveTLS(t, cfg)
		}, edit: func(o *Options) { o.Profile = identity.Intermediate() }, want: ClassNoSharedCipher, stage: "handshake"},
		{name: "wrong server ID", addr: func() string {
			return serveTLS(t, certConfig(w.ca.TLSCertificate(t, "spiffe://mesh.test/ns/web/sa/impostor")))
		}, edit: func(o *Options) { o.ServerID = spiffeid.RequireFromString(serverID) }, want: ClassWrongServerID, stage: "handshake", seenIss: true},
		{name: "server refuses our identity (TLS 1.3: on first read)", addr: func() string {
			return serveTLS(t, denyAll)
		}, want: ClassClientRefused, stage: "first read", seenIss: true},
		{name: "server refuses our identity (TLS 1.2: in the handshake)", addr: func() string {
			return serveTLS(t, denyAll12)
		}, edit: func(o *Options) { o.Profile = identity.Intermediate() }, want: ClassClientRefused, stage: "handshake", seenIss: true},
		{name: "expired server certificate", addr: func() string {
			return serveTLS(t, certConfig(w.ca.TLSCertificate(t, serverID, identitytest.Expired())))
		}, want: ClassExpired, stage: "handshake", seenIss: true},
		{name: "server certificate not yet valid", addr: func() string {
			return serveTLS(t, certConfig(w.ca.TLSCertificate(t, serverID, identitytest.NotYetValid())))
		}, want: ClassNotYetValid, stage: "handshake", seenIss: true},
		{name: "no local SVID", addr: func() string { return serveTLS(t, certConfig(good)) },
			edit: func(o *Options) { o.TLS = identity.NewTLS(identitytest.NewSource(nil, w.ca.Bundle())) },
			want: ClassNoLocalIdentity, stage: "identity"},
	}
	seenCodes := map[int]Class{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := w.opts(tt.addr())
			if tt.edit != nil {
				tt.edit(&opts)
			}
			res, err := Run(context.Background(), opts)
			if err == nil {
				t.Fatalf("check passed (%+v), want %s", res, tt.want)
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %T %v is not a *check.Error", err, err)
			}
			if ce.Class != tt.want || ce.Stage != tt.stage {
				t.Fatalf("class %s at %s, want %s at %s; error: %v", ce.Class, ce.Stage, tt.want, tt.stage, err)
			}
			if ce.Fix() == "" || ce.ExitCode() <= 2 {
				t.Errorf("class %s: fix %q, exit %d", ce.Class, ce.Fix(), ce.ExitCode())
			}
			if tt.seenIss && (ce.Seen == nil || ce.Seen.Issuer == "" || ce.Seen.ServerCertSHA256 == "") {
				t.Errorf("the server's certificate is not reported: %+v", ce.Seen)
			}
			t.Logf("%v\n  fix: %s", err, ce.Fix())
		})
		if c, dup := seenCodes[tt.want.ExitCode()]; dup && c != tt.want {
			t.Errorf("classes %s and %s share exit code %d", c, tt.want, tt.want.ExitCode())
		}
		seenCodes[tt.want.ExitCode()] = tt.want
	}
}

// TestTestEndpointReply checks against a real latch TLS test endpoint that
// the reply is decoded, and that its fields are those of the certificate
// actually served: the fingerprint recomputed from the served DER.
func TestTestEndpointReply(t *testing.T) {
	w := newWorld(t)
	serverSrc := w.ca.Source(t, serverID)
	served, err := serverSrc.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	ep, err := admin.ListenTestEndpoint(admin.TestEndpointOptions{
		Addr:        "127.0.0.1:0",
		TLS:         identity.NewTLS(serverSrc),
		TrustDomain: spiffeid.RequireTrustDomainFromString(td),
		Logger:      slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- ep.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	opts := w.opts(ep.Addr().String())
	opts.ServerID = spiffeid.RequireFromString(serverID)
	opts.ServerName = "backend.mesh.test"
	res, err := Run(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Source != SourceTestEndpoint {
		t.Fatalf("source %q, notes %v", res.Source, res.Notes)
	}
	leaf := served.Certificates[0]
	sum := sha256.Sum256(leaf.Raw)
	c := res.Connection
	for _, f := range []struct{ name, got, want string }{
		{"fingerprint", c.ServerCertSHA256, hex.EncodeToString(sum[:])},
		{"client view fingerprint", res.ClientView.ServerCertSHA256, hex.EncodeToString(sum[:])},
		{"version", c.Version, "TLS 1.3"},
		{"group", c.KeyExchangeGroup, "X25519MLKEM768"},
		{"server ID", c.ServerSPIFFEID, serverID},
		{"client ID", c.ClientSPIFFEID, clientID},
		{"SNI", c.SNI, "backend.mesh.test"},
		{"issuer", c.Issuer, leaf.Issuer.String()},
		{"expiry (ASN.1)", c.NotAfterASN1, leaf.NotAfter.UTC().Format("060102150405Z")},
		{"expiry (RFC 3339)", c.NotAfter, leaf.NotAfter.UTC().Format(time.RFC3339)},
		{"cipher suite", c.CipherSuite, res.ClientView.CipherSuite},
	} {
		if f.got != f.want {
			t.Errorf("%s = %q, want %q", f.name, f.got, f.want)
		}
	}
	if len(res.Notes) != 0 {
		t.Errorf("notes on a clean check: %v", res.Notes)
	}
}

// TestOrdinaryServer: a TLS server that is not a test endpoint, accepts us
// and says nothing; the fields come from our side.
func TestOrdinaryServer(t *testing.T) {
	w := newWorld(t)
	srv := identity.NewTLS(w.ca.Source(t, serverID)).ServerConfig(identity.Modern(),
		identity.NewAllowList(identity.AllowTrustDomain(spiffeid.RequireTrustDomainFromString(td))).Authorize)
	opts := w.opts(serveTLS(t, srv))
	opts.ReadWait = 300 * time.Millisecond // the server stays silent: this is how long the test takes
	res, err := Run(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Source != SourceClient || res.Connection.ServerSPIFFEID != serverID || res.Connection.ClientSPIFFEID != clientID || len(res.Notes) != 1 {
		t.Errorf("result %+v", res)
	}
}

// TestRolloverProcedure is the pre-switch test of docs/operations.md: a
// canary serves an SVID from the new CA; a client whose bundle already holds
// both CAs passes, one whose bundle holds only the old CA fails with
// unknown_ca (do not switch yet), and a canary whose own bundle lacks the old
// CA refuses old-CA clients (client_refused).
func TestRolloverProcedure(t *testing.T) {
	oldCA := identitytest.NewCA(t, td)
	newCA := identitytest.NewCA(t, td)
	both := x509bundle.FromX509Authorities(oldCA.TrustDomain(), []*x509.Certificate{oldCA.Cert(), newCA.Cert()})
	canaryID := "spiffe://mesh.test/ns/ops/sa/canary"
	canary := func(bundle *x509bundle.Bundle) string {
		src := identitytest.NewSource(newCA.SVID(t, canaryID), bundle)
		ep, err := admin.ListenTestEndpoint(admin.TestEndpointOptions{
			Addr: "127.0.0.1:0", TLS: identity.NewTLS(src),
			TrustDomain: spiffeid.RequireTrustDomainFromString(td), Logger: slog.New(slog.DiscardHandler),
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- ep.Serve(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		return ep.Addr().String()
	}
	ready := canary(both)
	client := func(bundle *x509bundle.Bundle) Options {
		return Options{
			Addr: ready, TLS: identity.NewTLS(identitytest.NewSource(oldCA.SVID(t, clientID), bundle)),
			ServerID: spiffeid.RequireFromString(canaryID), Timeout: 5 * time.Second, ReadWait: 3 * time.Second,
		}
	}

	res, err := Run(context.Background(), client(both))
	if err != nil {
		t.Fatalf("client with both CAs: %v", err)
	}
	if res.Source != SourceTestEndpoint || res.Connection.Issuer != newCA.Cert().Subject.String() {
		t.Errorf("canary reply %+v", res.Connection)
	}

	_, err = Run(context.Background(), client(oldCA.Bundle()))
	if ce, ok := errors.AsType[*Error](err); !ok || ce.Class != ClassUnknownCA {
		t.Errorf("client with the old CA only: %v, want unknown_ca", err)
	}

	opts := client(both)
	opts.Addr = canary(newCA.Bundle())
	_, err = Run(context.Background(), opts)
	if ce, ok := errors.AsType[*Error](err); !ok || ce.Class != ClassClientRefused {
		t.Errorf("canary without the old CA: %v, want client_refused", err)
	}
}

// TestFederatedServer: a server of a federated trust domain passes the check
// when it is named by --server-id (its trust domain's federated bundle
// verifies it, and the result says so); unnamed, it is in another trust
// domain; its ID signed by another trust domain's CA is an unknown CA.
func TestFederatedServer(t *testing.T) {
	w := newWorld(t)
	partner := identitytest.NewCA(t, "partner.test")
	src := w.ca.Source(t, clientID)
	src.SetBundle(partner.Bundle())
	client := identity.NewTLS(src)
	const partnerServer = "spiffe://partner.test/ns/web/sa/backend"
	good := serveTLS(t, certConfig(partner.TLSCertificate(t, partnerServer)))
	forged := serveTLS(t, certConfig(w.ca.TLSCertificate(t, partnerServer)))

	opts := w.opts(good)
	opts.TLS, opts.ReadWait = client, 200*time.Millisecond
	opts.ServerID = spiffeid.RequireFromString(partnerServer)
	res, err := Run(context.Background(), opts)
	if err != nil {
		t.Fatalf("federated server named by its ID: %v", err)
	}
	if res.Connection.ServerBundle != "partner.test" {
		t.Errorf("server verified by the bundle of %q", res.Connection.ServerBundle)
	}
	found := false
	for _, n := range res.Notes {
		found = found || strings.Contains(n, "verified against its federated bundle")
	}
	if !found {
		t.Errorf("notes %q do not say the server is federated", res.Notes)
	}

	opts.ServerID = spiffeid.ID{}
	if _, err := Run(context.Background(), opts); classOf(err) != ClassWrongTrustDomain {
		t.Errorf("unnamed federated server: %v, want %s", err, ClassWrongTrustDomain)
	}
	opts.FederatesWith = []spiffeid.TrustDomain{partner.TrustDomain()}
	if _, err := Run(context.Background(), opts); err != nil {
		t.Errorf("unnamed server of a trust domain the check federates with: %v", err)
	}

	opts = w.opts(forged)
	opts.TLS, opts.ServerID = client, spiffeid.RequireFromString(partnerServer)
	if _, err := Run(context.Background(), opts); classOf(err) != ClassUnknownCA {
		t.Errorf("partner.test ID signed by the local CA: %v, want %s", err, ClassUnknownCA)
	}
}

func classOf(err error) Class {
	var ce *Error
	if errors.As(err, &ce) {
		return ce.Class
	}
	return ""
}
