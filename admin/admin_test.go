package admin

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

const (
	trustDomain = "mesh.test"
	sidecarID   = "spiffe://mesh.test/ns/web/sa/backend"
	peerID      = "spiffe://mesh.test/ns/web/sa/frontend"
)

var td = spiffeid.RequireTrustDomainFromString(trustDomain)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestReadiness: /readyz is 503 and says what is missing until an SVID is
// held and a policy applied, then 200; /healthz is 200 throughout.
func TestReadiness(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	src := identitytest.NewSource(nil, ca.Bundle())
	mon := NewIdentityMonitor(src, MonitorOptions{TrustDomain: td, Logger: slog.New(slog.DiscardHandler)})
	var policy Flag
	base := startServer(t, Options{Ready: Readiness(
		ReadyCheck{"svid", mon.SVIDReady},
		ReadyCheck{"policy", policy.Check},
	)})

	if code, _ := get(t, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz %d", code)
	}
	code, body := get(t, base+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "svid: no X.509-SVID") || !strings.Contains(body, "policy: not yet") {
		t.Fatalf("/readyz with nothing: %d %q", code, body)
	}

	src.SetSVID(ca.SVID(t, sidecarID))
	code, body = get(t, base+"/readyz")
	if code != http.StatusServiceUnavailable || strings.Contains(body, "svid") || !strings.Contains(body, "policy") {
		t.Fatalf("/readyz with SVID only: %d %q", code, body)
	}

	policy.Set()
	if code, body = get(t, base+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz with SVID and policy: %d %q", code, body)
	}

	// An expired SVID makes the sidecar unready again.
	src.SetSVID(ca.SVID(t, sidecarID, identitytest.Expired()))
	if code, body = get(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "expired") {
		t.Fatalf("/readyz with expired SVID: %d %q", code, body)
	}
	policy.Unset("control plane unreachable")
	if _, body = get(t, base+"/readyz"); !strings.Contains(body, "policy: control plane unreachable") {
		t.Errorf("/readyz does not give the reason: %q", body)
	}
}

func TestPprofOnlyWhenEnabled(t *testing.T) {
	off := startServer(t, Options{})
	if code, _ := get(t, off+"/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("pprof without the flag: %d", code)
	}
	on := startServer(t, Options{EnablePprof: true})
	if code, _ := get(t, on+"/debug/pprof/"); code != http.StatusOK {
		t.Errorf("pprof with the flag: %d", code)
	}
}

func TestStatus(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	src := ca.Source(t, sidecarID)
	mon := NewIdentityMonitor(src, MonitorOptions{TrustDomain: td})
	base := startServer(t, Options{Status: func() any {
		return map[string]any{"identity": mon.Status(), "policy": map[string]string{"version": "v7"}}
	}})
	code, body := get(t, base+"/status")
	if code != http.StatusOK {
		t.Fatalf("/status %d", code)
	}
	var got struct {
		Identity IdentityStatus    `json:"identity"`
		Policy   map[string]string `json:"policy"`
	}
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, body)
	}
	svid, _ := src.GetX509SVID()
	leaf := svid.Certificates[0]
	if got.Identity.SPIFFEID != sidecarID || got.Identity.SVID == nil ||
		!got.Identity.SVID.NotAfter.Equal(leaf.NotAfter) ||
		got.Identity.SVID.Serial != strings.ToUpper(leaf.SerialNumber.Text(16)) {
		t.Errorf("identity status %+v", got.Identity)
	}
	if len(got.Identity.Bundles) != 1 || len(got.Identity.Bundles[0].CAs) != 1 ||
		got.Identity.Bundles[0].CAs[0].Subject != ca.Cert().Subject.String() ||
		!got.Identity.Bundles[0].CAs[0].NotAfter.Equal(ca.Cert().NotAfter) {
		t.Errorf("bundle status %+v", got.Identity.Bundles)
	}
	if got.Policy["version"] != "v7" {
		t.Errorf("policy %v", got.Policy)
	}
}

// startTestEndpoint serves a TLS test endpoint for sidecarID on loopback.
func startTestEndpoint(t *testing.T, src identity.Source, opts TestEndpointOptions) *TestEndpoint {
	t.Helper()
	opts.Addr = "127.0.0.1:0"
	opts.TLS = identity.NewTLS(src)
	opts.TrustDomain = td
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	ep, err := ListenTestEndpoint(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- ep.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("test endpoint Serve: %v", err)
		}
	})
	return ep
}

// dialEndpoint connects as peerID and returns the reply, or the error of the
// handshake or the first read.
func dialEndpoint(t *testing.T, ca *identitytest.CA, addr string, p identity.Profile) (*TestEndpointReply, *tls.ConnectionState, error) {
	t.Helper()
	cfg := identity.NewTLS(ca.Source(t, peerID)).ClientConfig(p, spiffeid.RequireFromString(sidecarID))
	cfg.ServerName = "backend.web.svc"
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(conn)
	if err != nil {
		return nil, nil, err
	}
	var r TestEndpointReply
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("reply is not JSON: %v: %q", err, b)
	}
	cs := conn.ConnectionState()
	return &r, &cs, nil
}

// TestTestEndpoint checks the reply against the certificate actually served
// and the parameters actually negotiated, for both profiles.
func TestTestEndpoint(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	// The intermediate profile on the server so that a TLS 1.2 client is
	// answered too.
	ep := startTestEndpoint(t, ca.Source(t, sidecarID), TestEndpointOptions{Profile: identity.Intermediate()})
	tls12 := identity.Intermediate()
	tls12.MaxVersion = tls.VersionTLS12

	for _, tc := range []struct {
		name    string
		profile identity.Profile
		version string
		group   string
	}{
		{"modern", identity.Modern(), "TLS 1.3", "X25519MLKEM768"},
		{"TLS 1.2", tls12, "TLS 1.2", "X25519"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, cs, err := dialEndpoint(t, ca, ep.Addr().String(), tc.profile)
			if err != nil {
				t.Fatal(err)
			}
			served := cs.PeerCertificates[0]
			sum := sha256.Sum256(served.Raw)
			c := r.Connection
			for _, f := range []struct{ name, got, want string }{
				{"kind", r.Kind, TestEndpointKind},
				{"fingerprint", c.ServerCertSHA256, hex.EncodeToString(sum[:])},
				{"version", c.Version, tc.version},
				{"cipher suite", c.CipherSuite, tls.CipherSuiteName(cs.CipherSuite)},
				{"group", c.KeyExchangeGroup, tc.group},
				{"server ID", c.ServerSPIFFEID, sidecarID},
				{"client ID", c.ClientSPIFFEID, peerID},
				{"SNI", c.SNI, "backend.web.svc"},
				{"issuer", c.Issuer, served.Issuer.String()},
				{"expiry", c.NotAfterASN1, served.NotAfter.UTC().Format("060102150405Z")},
				{"expiry RFC 3339", c.NotAfter, served.NotAfter.UTC().Format(time.RFC3339)},
			} {
				if f.got != f.want {
					t.Errorf("%s = %q, want %q", f.name, f.got, f.want)
				}
			}
		})
	}
}

// TestTestEndpointRefusesOutsiders: the default allow-list is the local
// trust domain; an explicit list is honoured. A refused client gets an
// alert, no document.
func TestTestEndpointRefusesOutsiders(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	only := identity.NewAllowList(identity.AllowID(spiffeid.RequireFromString("spiffe://mesh.test/ns/ops/sa/prober")))
	ep := startTestEndpoint(t, ca.Source(t, sidecarID), TestEndpointOptions{Allow: &only})
	if r, _, err := dialEndpoint(t, ca, ep.Addr().String(), identity.Modern()); err == nil {
		t.Fatalf("a client outside the allow-list got a reply: %+v", r)
	} else if !strings.Contains(err.Error(), "bad certificate") {
		t.Errorf("refusal: %v", err)
	}
}

// TestTestEndpointShutdownWithStalledClient: a client that connects and never
// starts its handshake does not hold up shutdown, and nothing is left
// running (goleak in TestMain).
func TestTestEndpointShutdownWithStalledClient(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	logs := newLogRecorder()
	ep, err := ListenTestEndpoint(TestEndpointOptions{
		Addr: "127.0.0.1:0", TLS: identity.NewTLS(ca.Source(t, sidecarID)), TrustDomain: td,
		HandshakeTimeout: time.Hour, Logger: slog.New(logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- ep.Serve(ctx) }()
	conn, err := net.Dial("tcp", ep.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The endpoint is inside the handshake with us once it has accepted;
	// a second connection that completes shows the accept loop is live.
	if _, _, err := dialEndpoint(t, ca, ep.Addr().String(), identity.Modern()); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	logs.wait(t, slog.LevelInfo, "tls test endpoint: handshake failed")
	// What must hold is that the endpoint no longer answers. (A bare TCP
	// connect is not the test: with packages tested in parallel, another
	// test may bind the freed port at once.)
	if r, _, err := dialEndpoint(t, ca, ep.Addr().String(), identity.Modern()); err == nil {
		t.Errorf("endpoint still answering after shutdown: %+v", r)
	}
}

// TestTestEndpointFederated: a workload of a trust domain the endpoint
// federates with is answered, and the reply names the bundle that verified
// it; once the federation list no longer names it, it is refused.
func TestTestEndpointFederated(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	partner := identitytest.NewCA(t, "partner.test")
	partnerTD := spiffeid.RequireTrustDomainFromString("partner.test")
	src := ca.Source(t, sidecarID)
	src.SetBundle(partner.Bundle())
	var federated atomic.Bool
	federated.Store(true)
	ep := startTestEndpoint(t, src, TestEndpointOptions{FederatesWith: func() []spiffeid.TrustDomain {
		if federated.Load() {
			return []spiffeid.TrustDomain{partnerTD}
		}
		return nil
	}})
	clientSrc := partner.Source(t, "spiffe://partner.test/ns/ops/sa/prober")
	clientSrc.SetBundle(ca.Bundle())
	cfg := identity.NewTLS(clientSrc).ClientConfig(identity.Modern(), spiffeid.RequireFromString(sidecarID), identity.FederatesWith(td))
	cfg.ClientSessionCache = nil
	ask := func() (*TestEndpointReply, error) {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ep.Addr().String(), cfg)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(conn)
		if err != nil {
			return nil, err
		}
		var r TestEndpointReply
		return &r, json.Unmarshal(b, &r)
	}
	r, err := ask()
	if err != nil {
		t.Fatalf("federated workload not answered: %v", err)
	}
	if r.Connection.ClientBundle != "partner.test" || r.Connection.ClientSPIFFEID != "spiffe://partner.test/ns/ops/sa/prober" {
		t.Errorf("reply: client %s verified by the bundle of %q", r.Connection.ClientSPIFFEID, r.Connection.ClientBundle)
	}
	federated.Store(false)
	if r, err := ask(); err == nil {
		t.Errorf("answered after the federation was dropped: %+v", r)
	}
}
