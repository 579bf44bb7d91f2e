package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/admin"
	"latch.dev/latch/check"
	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/proxy"
	xdsclient "latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// TrustDomain is the demo mesh's trust domain.
const TrustDomain = "demo.latch.test"

// The demo's workloads.
var (
	ControlPlaneID = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/latch/control-plane")
	FrontendID     = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/ns/demo/sa/frontend")
	BackendID      = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/ns/demo/sa/backend")
	IntruderID     = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/ns/demo/sa/intruder")
)

// Options configure a demo run.
type Options struct {
	// Out receives the human-readable walkthrough.
	Out io.Writer
	// Logs receives the components' structured logs; nil discards them.
	Logs io.Writer
	// KeepRunning leaves the mesh up until ctx is done.
	KeepRunning bool
}

// Report is what a run observed, for tests and for the JSON output.
type Report struct {
	RoundTrip      RoundTrip               `json:"round_trip"`
	IntruderDenied Denial                  `json:"intruder_denied"`
	TLS            identity.ConnectionInfo `json:"tls"`
	Federation     Federation              `json:"federation"`
	PolicyChange   PolicyChange            `json:"policy_change"`
	Duration       time.Duration           `json:"duration_ns"`
}

// RoundTrip describes the frontend → backend exchange through the sidecars.
type RoundTrip struct {
	Bytes   int           `json:"bytes"`
	SHA256  string        `json:"sha256"`
	Elapsed time.Duration `json:"elapsed_ns"`
}

// Denial is the backend sidecar's refusal of a peer, as it logged it.
type Denial struct {
	Listener string `json:"listener"`
	PeerID   string `json:"peer_id"`
	Class    string `json:"class"`
	Reason   string `json:"reason"`
}

// PolicyChange measures a live edit of the backend's declaration that swaps
// the frontend for the intruder in its allow-list: from the file write until
// the frontend's open connection was closed by the backend sidecar, and until
// the intruder's first successful round trip.
type PolicyChange struct {
	File          string        `json:"file"`
	RevokedAfter  time.Duration `json:"revoked_after_ns"`
	AdmittedAfter time.Duration `json:"admitted_after_ns"`
	FrontendNow   Denial        `json:"frontend_now"`
}

// Run starts the mesh, walks through it, and tears it down (or waits for ctx
// when KeepRunning). Any step that does not behave is an error.
func Run(ctx context.Context, opts Options) (*Report, error) {
	start := time.Now()
	out := opts.Out
	if out == nil {
		out = io.Discard
	}
	logs := opts.Logs
	if logs == nil {
		logs = io.Discard
	}
	denials := &denialRecorder{}
	logger := slog.New(recordingHandler{next: slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}), rec: denials})

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	m := &mesh{log: logger}
	defer m.close()

	fmt.Fprintf(out, "latch demo: a mesh on loopback with a DEVELOPMENT CA (throwaway, never for production)\n\n")

	ca, err := devca.New(TrustDomain, devca.Options{Logger: logger.With("component", "devca")})
	if err != nil {
		return nil, fmt.Errorf("starting the development CA: %w", err)
	}
	m.onClose(func() { _ = ca.Close() })
	fmt.Fprintf(out, "  dev CA         trust domain %s, one Workload API socket per workload in %s\n", TrustDomain, ca.SocketDir())
	partner, err := devca.New(PartnerTrustDomain, devca.Options{Logger: logger.With("component", "devca-partner")})
	if err != nil {
		return nil, fmt.Errorf("starting the partner's development CA: %w", err)
	}
	m.onClose(func() { _ = partner.Close() })
	if err := ca.FederateWith(partner); err != nil {
		return nil, err
	}
	if err := partner.FederateWith(ca); err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  partner dev CA trust domain %s, federated with %s both ways (each Workload API hands out the other's bundle)\n", PartnerTrustDomain, TrustDomain)

	app, err := startEcho(logger)
	if err != nil {
		return nil, err
	}
	m.onClose(func() { _ = app.Close() })
	fmt.Fprintf(out, "  echo app       %s (plain TCP, loopback only)\n", app.Addr())
	who, err := startWhoami(logger)
	if err != nil {
		return nil, err
	}
	m.onClose(func() { _ = who.Close() })
	fmt.Fprintf(out, "  whoami app     %s (reads the PROXY protocol v2 header and says what it names)\n", who.Addr())

	ports, err := freeAddrs(5)
	if err != nil {
		return nil, err
	}
	declDir, err := os.MkdirTemp("", "latch-demo-declarations-")
	if err != nil {
		return nil, fmt.Errorf("making the declarations directory: %w", err)
	}
	m.onClose(func() { _ = os.RemoveAll(declDir) })
	decl := declarations{
		Dir: declDir, App: app.Addr().String(), WhoamiApp: who.Addr().String(),
		BackendIn: ports[0], FrontendOut: ports[1], IntruderOut: ports[2], BackendWhoami: ports[4],
	}
	if err := decl.write(FrontendID); err != nil {
		return nil, err
	}
	cp, err := m.controlPlane(ctx, ca, decl.Dir, ports[3])
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  control plane  %s on %s, serving the declarations in %s\n", ControlPlaneID, cp, decl.Dir)

	backend, err := m.sidecar(ctx, ca, cp, "backend", BackendID)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  backend        %s\n                 inbound %s → app, allows only %s (policy %s)\n"+
		"                 inbound %s → whoami app with a PROXY protocol v2 header, federates with %s\n", BackendID, decl.BackendIn, FrontendID, backend.server.Current().Version, decl.BackendWhoami, PartnerTrustDomain)
	frontend, err := m.sidecar(ctx, ca, cp, "frontend", FrontendID)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  frontend       %s\n                 outbound %s → backend (must prove %s)\n", FrontendID, decl.FrontendOut, BackendID)
	if _, err := m.sidecar(ctx, ca, cp, "intruder", IntruderID); err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  intruder       %s (valid SVID, not in the allow-list)\n                 outbound %s → backend\n\n", IntruderID, decl.IntruderOut)

	rep := &Report{}
	rep.RoundTrip, err = roundTrip(ctx, decl.FrontendOut, 64<<10)
	if err != nil {
		return nil, fmt.Errorf("round trip frontend → backend: %w", err)
	}
	fmt.Fprintf(out, "✔ round trip    app → frontend sidecar ═mTLS═▶ backend sidecar → echo: %d bytes each way, sha256 %s…, %s\n",
		rep.RoundTrip.Bytes, rep.RoundTrip.SHA256[:16], rep.RoundTrip.Elapsed.Round(time.Microsecond))

	if err := refused(ctx, decl.IntruderOut); err != nil {
		return nil, fmt.Errorf("intruder: %w", err)
	}
	if rep.IntruderDenied, err = denials.wait(ctx, IntruderID.String(), 5*time.Second); err != nil {
		return nil, fmt.Errorf("intruder: %w", err)
	}
	fmt.Fprintf(out, "✔ intruder      refused by the backend sidecar before any byte reached the app\n                 class=%s reason=%q\n",
		rep.IntruderDenied.Class, rep.IntruderDenied.Reason)
	if n := app.Conns(); n != 1 {
		return nil, fmt.Errorf("the echo app saw %d connections, want exactly 1 (the frontend's)", n)
	}

	// The backend's TLS test endpoint answers with what it negotiated; the
	// frontend asks through the same code path as `latch check`.
	te, err := admin.ListenTestEndpoint(admin.TestEndpointOptions{
		Addr: "127.0.0.1:0", TLS: backend.tls, TrustDomain: BackendID.TrustDomain(),
		FederatesWith: func() []spiffeid.TrustDomain { return backend.server.Current().InboundFederation() },
		Logger:        logger.With("component", "test-endpoint"),
	})
	if err != nil {
		return nil, fmt.Errorf("starting the backend's TLS test endpoint: %w", err)
	}
	m.goUntilClose(ctx, te.Serve)
	res, err := check.Run(ctx, check.Options{Addr: te.Addr().String(), TLS: frontend.tls, ServerID: BackendID})
	if err != nil {
		return nil, fmt.Errorf("checking the backend's TLS test endpoint: %w", err)
	}
	rep.TLS = res.Connection
	js, _ := json.MarshalIndent(rep.TLS, "                 ", "  ")
	fmt.Fprintf(out, "✔ negotiated    (backend's TLS test endpoint %s, asked by the frontend)\n                 %s\n", te.Addr(), js)

	rep.Federation, err = federatedCall(ctx, m, partner, decl.BackendWhoami, decl.BackendIn, te.Addr().String(), denials)
	if err != nil {
		return nil, fmt.Errorf("federation: %w", err)
	}
	fed := rep.Federation
	fmt.Fprintf(out, "✔ federation    %s (trust domain %s) admitted on the backend's whoami listener %s,\n"+
		"                 which federates with %s: the backend verified it against the bundle of %s (its TLS test endpoint says),\n"+
		"                 the partner verified the backend against the bundle of %s (federated on its side)\n"+
		"                 refused on the echo listener, which does not federate: class=%s\n",
		fed.PeerID, PartnerTrustDomain, fed.Listener, PartnerTrustDomain, fed.ClientBundle, fed.ServerBundle, fed.Refused.Class)
	fmt.Fprintf(out, "✔ PROXY v2      the whoami app read from the header: peer %s from %s, %s %s, certificate sha256 %s…\n",
		fed.App.PeerID, fed.App.Source, fed.App.TLSVersion, fed.App.Cipher, fed.App.CertSHA256[:min(16, len(fed.App.CertSHA256))])

	rep.PolicyChange, err = changePolicy(ctx, decl, denials)
	if err != nil {
		return nil, fmt.Errorf("live policy change: %w", err)
	}
	pc := rep.PolicyChange
	fmt.Fprintf(out, "✔ policy change %s now allows the intruder instead of the frontend (edited, control plane pushed over xDS)\n"+
		"                 frontend's open connection closed after %s; intruder admitted after %s\n"+
		"                 frontend now refused: class=%s reason=%q\n",
		pc.File, pc.RevokedAfter.Round(time.Millisecond), pc.AdmittedAfter.Round(time.Millisecond), pc.FrontendNow.Class, pc.FrontendNow.Reason)

	rep.Duration = time.Since(start)
	fmt.Fprintf(out, "\ndemo finished in %s\n", rep.Duration.Round(time.Millisecond))
	if opts.KeepRunning {
		// The walk-through ended with the policy swapped: say what works now.
		fmt.Fprintf(out, "keeping the mesh up (Ctrl-C to stop); the policy now admits the intruder instead of the frontend:\n"+
			"  plain TCP to %s (the intruder's outbound) reaches the echo app through both sidecars\n"+
			"  plain TCP to %s (the frontend's outbound) is reset: the backend's sidecar refuses the frontend\n"+
			"  edit the allow list in %s to change that; the control plane pushes it at once\n",
			decl.IntruderOut, decl.FrontendOut, decl.backendFile())
		<-ctx.Done()
	}
	return rep, nil
}

// declarations are the demo's ServicePolicy files.
type declarations struct {
	Dir                                      string
	App, BackendIn, FrontendOut, IntruderOut string
	// WhoamiApp is behind BackendWhoami, the backend's listener with a
	// PROXY protocol header that federates with the partner trust domain.
	WhoamiApp, BackendWhoami string
}

// The templates are examples/declarations with the demo's ports; a test
// keeps the two in step.
const backendTemplate = `# The backend: the echo app behind its sidecar. Edit the allow-list and the
# control plane pushes the change to the backend's sidecar at once.
apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata:
  name: backend
  namespace: demo
spec:
  spiffeID: %s
  inbound:
    - port: %s
      appAddress: %s
      idleTimeout: 5m
      allow:
        - id: %s
    - port: %s
      appAddress: %s
      proxyProtocol: v2
      federatesWith: [%s]
      allow:
        - id: %s
        - pathPrefix: spiffe://%s/ns/billing
`

const callerTemplate = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata:
  name: %s
  namespace: demo
spec:
  spiffeID: %s
  outbound:
    - port: %s
      target: %s
      serverID: %s
`

func (d declarations) backendFile() string { return filepath.Join(d.Dir, "backend.yaml") }

// write writes all three declarations, the backend allowing only allowed.
func (d declarations) write(allowed spiffeid.ID) error {
	if err := os.MkdirAll(d.Dir, 0o700); err != nil {
		return fmt.Errorf("writing declarations: %w", err)
	}
	files := map[string]string{
		"frontend.yaml": fmt.Sprintf(callerTemplate, "frontend", FrontendID, port(d.FrontendOut), d.BackendIn, BackendID),
		"intruder.yaml": fmt.Sprintf(callerTemplate, "intruder", IntruderID, port(d.IntruderOut), d.BackendIn, BackendID),
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(d.Dir, name), []byte(body), 0o600); err != nil {
			return fmt.Errorf("writing declarations: %w", err)
		}
	}
	return d.allow(allowed)
}

// allow rewrites the backend's declaration to allow exactly id. The write is
// a rename, so the control plane never reads half a file.
func (d declarations) allow(id spiffeid.ID) error {
	body := fmt.Sprintf(backendTemplate, BackendID, port(d.BackendIn), d.App, id,
		port(d.BackendWhoami), d.WhoamiApp, PartnerTrustDomain, FrontendID, PartnerTrustDomain)
	tmp := filepath.Join(d.Dir, ".backend.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		return fmt.Errorf("writing the backend declaration: %w", err)
	}
	return os.Rename(tmp, d.backendFile())
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// changePolicy swaps the frontend for the intruder in the backend's
// allow-list while the frontend holds an open connection, and measures how
// long the change takes to reach the data plane.
func changePolicy(ctx context.Context, d declarations, denials *denialRecorder) (PolicyChange, error) {
	pc := PolicyChange{File: d.backendFile()}
	var dialer net.Dialer
	live, err := dialer.DialContext(ctx, "tcp", d.FrontendOut)
	if err != nil {
		return pc, err
	}
	defer live.Close()
	if err := echoOnce(live, []byte("still here")); err != nil {
		return pc, fmt.Errorf("frontend's long-lived connection: %w", err)
	}

	start := time.Now()
	if err := d.allow(IntruderID); err != nil {
		return pc, err
	}
	// The backend sidecar closes the frontend's connection: a read returns.
	_ = live.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := live.Read(make([]byte, 1)); n != 0 || errors.Is(err, os.ErrDeadlineExceeded) {
		return pc, fmt.Errorf("the frontend's open connection survived the revocation (read %d bytes, %v)", n, err)
	}
	pc.RevokedAfter = time.Since(start)

	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := roundTrip(ctx, d.IntruderOut, 1024); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return pc, errors.New("the intruder was not admitted after the change")
		}
		time.Sleep(10 * time.Millisecond)
	}
	pc.AdmittedAfter = time.Since(start)

	if err := refused(ctx, d.FrontendOut); err != nil {
		return pc, fmt.Errorf("frontend after revocation: %w", err)
	}
	pc.FrontendNow, err = denials.wait(ctx, FrontendID.String(), 5*time.Second)
	return pc, err
}

func echoOnce(c net.Conn, msg []byte) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs: %q", got)
	}
	return nil
}

// sidecar is one in-process latch: its Workload API source, TLS, proxy and
// ADS client.
type sidecar struct {
	name   string
	tls    *identity.TLS
	server *proxy.Server
}

type mesh struct {
	log     *slog.Logger
	mu      sync.Mutex
	closers []func()
}

func (m *mesh) onClose(f func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closers = append(m.closers, f)
}

// goUntilClose runs f until the mesh closes, and waits for it then.
func (m *mesh) goUntilClose(ctx context.Context, f func(context.Context) error) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := f(ctx); err != nil && ctx.Err() == nil {
			m.log.Error("demo component stopped", "error", err.Error())
		}
	}()
	m.onClose(func() { cancel(); <-done })
}

// close runs the closers in reverse order of registration.
func (m *mesh) close() {
	m.mu.Lock()
	cs := m.closers
	m.closers = nil
	m.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}

func (m *mesh) source(ctx context.Context, ca *devca.CA, name string, id spiffeid.ID) (*identity.WorkloadSource, error) {
	sock, err := ca.AddWorkload(id.String())
	if err != nil {
		return nil, fmt.Errorf("registering %s with the dev CA: %w", name, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	src, err := identity.NewWorkloadSource(wctx, sock, m.log.With("workload", name))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	m.onClose(func() { _ = src.Close() })
	return src, nil
}

// controlPlane runs latch's control plane in-process, as `latch
// control-plane` composes it, and returns its xDS address.
func (m *mesh) controlPlane(ctx context.Context, ca *devca.CA, dir, addr string) (string, error) {
	src, err := m.source(ctx, ca, "control-plane", ControlPlaneID)
	if err != nil {
		return "", err
	}
	log := m.log.With("component", "control-plane")
	td := ControlPlaneID.TrustDomain()
	store, err := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{td}}, log)
	if err != nil {
		return "", err
	}
	files := policy.NewFiles(store, dir)
	snap, _, err := files.Reload()
	if err != nil {
		return "", fmt.Errorf("reading the demo declarations: %w", err)
	}
	if len(snap.Errors) > 0 {
		return "", fmt.Errorf("the demo declarations are refused: %v", snap.Errors[0])
	}
	cpCtx, cancel := context.WithCancel(ctx)
	xs := server.New(cpCtx, server.Options{Logger: log, Translate: translate.Options{InboundHost: "127.0.0.1"}})
	xs.Update(snap)
	g := xs.NewGRPCServer(identity.NewTLS(src).ServerConfig(identity.Modern(), func(peer spiffeid.ID) error {
		if !peer.MemberOf(td) {
			return fmt.Errorf("peer %s: %w: not in trust domain %s", peer, identity.ErrNotAllowed, td)
		}
		return nil
	}))
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		cancel()
		return "", fmt.Errorf("control plane listener: %w", err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	go func() {
		defer wg.Done()
		_ = files.Watch(cpCtx, 20*time.Millisecond, func(s policy.Snapshot, _ policy.Change) { xs.Update(s) })
	}()
	m.onClose(func() { cancel(); g.Stop(); wg.Wait() })
	return lis.Addr().String(), nil
}

// sidecar starts a latch whose policy comes from the control plane and waits
// until it has applied its first configuration.
func (m *mesh) sidecar(ctx context.Context, ca *devca.CA, cp, name string, id spiffeid.ID) (*sidecar, error) {
	src, err := m.source(ctx, ca, name, id)
	if err != nil {
		return nil, err
	}
	log := m.log.With("sidecar", name)
	t := identity.NewTLS(src)
	srv := proxy.NewServer(t, proxy.Options{Logger: log, DrainTimeout: time.Second})
	m.onClose(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	applied := make(chan struct{}, 1)
	apply := func(c *proxy.Config) error {
		if err := srv.Apply(c); err != nil {
			return err
		}
		select {
		case applied <- struct{}{}:
		default:
		}
		return nil
	}
	client, err := xdsclient.New(xdsclient.Options{
		Address: cp, ControlPlaneID: ControlPlaneID, NodeID: id,
		TLS:    t.ClientConfig(identity.Modern(), ControlPlaneID),
		Logger: log, MinBackoff: 50 * time.Millisecond, // the client names its component itself
	}, apply)
	if err != nil {
		return nil, fmt.Errorf("sidecar %s: %w", name, err)
	}
	m.goUntilClose(ctx, client.Run)
	select {
	case <-applied:
	case <-time.After(10 * time.Second):
		return nil, fmt.Errorf("sidecar %s got no policy from the control plane: %s", name, client.Status().LastError)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &sidecar{name: name, tls: t, server: srv}, nil
}

// roundTrip sends n random bytes through the frontend's outbound listener,
// half-closes, and checks the echo byte for byte.
func roundTrip(ctx context.Context, addr string, n int) (RoundTrip, error) {
	start := time.Now()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return RoundTrip{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	payload := make([]byte, n)
	_, _ = rand.Read(payload)
	go func() {
		_, _ = c.Write(payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return RoundTrip{}, fmt.Errorf("reading the echo: %w", err)
	}
	sent, recv := sha256.Sum256(payload), sha256.Sum256(got)
	if sent != recv {
		return RoundTrip{}, fmt.Errorf("echo differs: sent %d bytes, got %d", len(payload), len(got))
	}
	return RoundTrip{Bytes: n, SHA256: hex.EncodeToString(sent[:]), Elapsed: time.Since(start)}, nil
}

// refused connects through an outbound listener and expects the connection
// to end without an echo: the upstream sidecar refused the caller. The
// outbound sidecar passes the refusal on as a reset, which on loopback can
// arrive before connect returns.
func refused(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return nil
	}
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Write([]byte("let me in"))
	got, _ := io.ReadAll(c)
	if len(got) > 0 {
		return fmt.Errorf("got %d bytes back: it was let in", len(got))
	}
	return nil
}

// echoApp is the demo's application: it echoes and counts connections.
type echoApp struct {
	net.Listener
	mu    sync.Mutex
	conns int
	wg    sync.WaitGroup
}

func startEcho(log *slog.Logger) (*echoApp, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the echo app: %w", err)
	}
	a := &echoApp{Listener: l}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			a.mu.Lock()
			a.conns++
			a.mu.Unlock()
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				defer c.Close()
				n, _ := io.Copy(c, c)
				_ = c.(*net.TCPConn).CloseWrite()
				log.Debug("echo app connection done", "bytes", n)
			}()
		}
	}()
	return a, nil
}

func (a *echoApp) Conns() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.conns
}

func (a *echoApp) Close() error {
	err := a.Listener.Close()
	a.wg.Wait()
	return err
}

// freeAddrs finds n free loopback ports for the declarations, which the
// demo's listeners bind once the control plane has pushed them.
func freeAddrs(n int) ([]string, error) {
	addrs := make([]string, n)
	for i := range addrs {
		a, err := freeport.Addr()
		if err != nil {
			return nil, err
		}
		addrs[i] = a
	}
	return addrs, nil
}

// denialRecorder keeps the log records that carry a handshake failure class,
// so the demo can show the backend's own words for refusing the intruder.
type denialRecorder struct {
	mu      sync.Mutex
	records []Denial
	changed chan struct{}
}

func (r *denialRecorder) add(d Denial) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, d)
	if r.changed != nil {
		close(r.changed)
		r.changed = nil
	}
}

func (r *denialRecorder) wait(ctx context.Context, peer string, timeout time.Duration) (Denial, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		for _, d := range r.records {
			if d.PeerID == peer || strings.Contains(d.Reason, peer) {
				r.mu.Unlock()
				return d, nil
			}
		}
		if r.changed == nil {
			r.changed = make(chan struct{})
		}
		ch := r.changed
		r.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			return Denial{}, errors.New("no denial was logged for " + peer)
		case <-ctx.Done():
			return Denial{}, ctx.Err()
		}
	}
}

// recordingHandler passes records on and shows the recorder every record
// that names a failure class, including attributes bound with Logger.With
// (the proxy binds "listener" that way).
type recordingHandler struct {
	next  slog.Handler
	rec   *denialRecorder
	bound []slog.Attr
}

func (h recordingHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h recordingHandler) Handle(ctx context.Context, r slog.Record) error {
	var d Denial
	note := func(a slog.Attr) bool {
		switch a.Key {
		case "listener":
			d.Listener = a.Value.String()
		case "peer_id":
			d.PeerID = a.Value.String()
		case "class":
			d.Class = a.Value.String()
		case "reason":
			d.Reason = a.Value.String()
		}
		return true
	}
	for _, a := range h.bound {
		note(a)
	}
	r.Attrs(note)
	if d.Class != "" && d.Class != "ok" {
		h.rec.add(d)
	}
	return h.next.Handle(ctx, r)
}

func (h recordingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return recordingHandler{h.next.WithAttrs(as), h.rec, append(slices.Clip(h.bound), as...)}
}

func (h recordingHandler) WithGroup(name string) slog.Handler {
	return recordingHandler{h.next.WithGroup(name), h.rec, h.bound}
}
