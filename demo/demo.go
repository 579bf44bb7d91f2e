package demo

import (
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
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"latch.dev/latch/admin"
	"latch.dev/latch/check"
	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
)

// TrustDomain is the demo mesh's trust domain.
const TrustDomain = "demo.latch.test"

// The demo's workloads.
var (
	FrontendID = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/ns/demo/sa/frontend")
	BackendID  = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/ns/demo/sa/backend")
	IntruderID = spiffeid.RequireFromString("spiffe://" + TrustDomain + "/ns/demo/sa/intruder")
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
	Duration       time.Duration           `json:"-"`
}

// RoundTrip describes the frontend → backend exchange through the sidecars.
type RoundTrip struct {
	Bytes   int           `json:"bytes"`
	SHA256  string        `json:"sha256"`
	Elapsed time.Duration `json:"elapsed_ns"`
}

// Denial is the backend sidecar's refusal of the intruder, as it logged it.
type Denial struct {
	Listener string `json:"listener"`
	PeerID   string `json:"peer_id"`
	Class    string `json:"class"`
	Reason   string `json:"reason"`
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

	app, err := startEcho(logger)
	if err != nil {
		return nil, err
	}
	m.onClose(func() { _ = app.Close() })
	fmt.Fprintf(out, "  echo app       %s (plain TCP, loopback only)\n", app.Addr())

	backend, err := m.sidecar(ctx, ca, "backend", BackendID)
	if err != nil {
		return nil, err
	}
	frontend, err := m.sidecar(ctx, ca, "frontend", FrontendID)
	if err != nil {
		return nil, err
	}
	intruder, err := m.sidecar(ctx, ca, "intruder", IntruderID)
	if err != nil {
		return nil, err
	}

	inboundAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	if err := backend.server.Apply(&proxy.Config{
		Version: "demo-1", Source: "demo", TLS: identity.Modern(),
		Inbound: []proxy.Inbound{{
			Name: "inbound|backend", Listen: inboundAddr, App: app.Addr().String(),
			Allow: identity.NewAllowList(identity.AllowID(FrontendID)),
		}},
	}); err != nil {
		return nil, fmt.Errorf("configuring the backend sidecar: %w", err)
	}
	fmt.Fprintf(out, "  backend        %s\n                 inbound %s → app, allows only %s\n", BackendID, inboundAddr, FrontendID)

	frontOut, err := outbound(frontend, "outbound|backend", inboundAddr)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  frontend       %s\n                 outbound %s → backend (must prove %s)\n", FrontendID, frontOut, BackendID)
	intruderOut, err := outbound(intruder, "outbound|backend", inboundAddr)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  intruder       %s (valid SVID, not in the allow-list)\n                 outbound %s → backend\n\n", IntruderID, intruderOut)

	rep := &Report{}
	rep.RoundTrip, err = roundTrip(ctx, frontOut, 64<<10)
	if err != nil {
		return nil, fmt.Errorf("round trip frontend → backend: %w", err)
	}
	fmt.Fprintf(out, "✔ round trip    app → frontend sidecar ═mTLS═▶ backend sidecar → echo: %d bytes each way, sha256 %s…, %s\n",
		rep.RoundTrip.Bytes, rep.RoundTrip.SHA256[:16], rep.RoundTrip.Elapsed.Round(time.Microsecond))

	rep.IntruderDenied, err = intruderRefused(ctx, intruderOut, denials)
	if err != nil {
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
		Addr: "127.0.0.1:0", TLS: backend.tls, TrustDomain: spiffeid.RequireTrustDomainFromString(TrustDomain),
		Logger: logger.With("component", "test-endpoint"),
	})
	if err != nil {
		return nil, fmt.Errorf("starting the backend's TLS test endpoint: %w", err)
	}
	teCtx, teStop := context.WithCancel(ctx)
	var teDone sync.WaitGroup
	teDone.Add(1)
	go func() { defer teDone.Done(); _ = te.Serve(teCtx) }()
	m.onClose(func() { teStop(); teDone.Wait() })
	res, err := check.Run(ctx, check.Options{Addr: te.Addr().String(), TLS: frontend.tls, ServerID: BackendID})
	if err != nil {
		return nil, fmt.Errorf("checking the backend's TLS test endpoint: %w", err)
	}
	rep.TLS = res.Connection
	js, _ := json.MarshalIndent(rep.TLS, "                 ", "  ")
	fmt.Fprintf(out, "✔ negotiated    (backend's TLS test endpoint %s, asked by the frontend)\n                 %s\n", te.Addr(), js)

	rep.Duration = time.Since(start)
	fmt.Fprintf(out, "\ndemo finished in %s\n", rep.Duration.Round(time.Millisecond))
	if opts.KeepRunning {
		fmt.Fprintf(out, "keeping the mesh up (Ctrl-C to stop): connect plain TCP to %s (frontend) or %s (intruder)\n", frontOut, intruderOut)
		<-ctx.Done()
	}
	return rep, nil
}

// sidecar is one in-process latch: its Workload API source, TLS and proxy.
type sidecar struct {
	name   string
	src    *workloadapi.X509Source
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

func (m *mesh) sidecar(ctx context.Context, ca *devca.CA, name string, id spiffeid.ID) (*sidecar, error) {
	sock, err := ca.AddWorkload(id.String())
	if err != nil {
		return nil, fmt.Errorf("registering %s with the dev CA: %w", name, err)
	}
	log := m.log.With("sidecar", name)
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	src, err := identity.NewWorkloadSource(wctx, sock, log)
	if err != nil {
		return nil, fmt.Errorf("sidecar %s: %w", name, err)
	}
	m.onClose(func() { _ = src.Close() })
	t := identity.NewTLS(src)
	srv := proxy.NewServer(t, proxy.Options{Logger: log, DrainTimeout: time.Second})
	m.onClose(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	return &sidecar{name: name, src: src, tls: t, server: srv}, nil
}

func outbound(s *sidecar, name, upstream string) (string, error) {
	addr, err := freeAddr()
	if err != nil {
		return "", err
	}
	err = s.server.Apply(&proxy.Config{
		Version: "demo-1", Source: "demo", TLS: identity.Modern(),
		Outbound: []proxy.Outbound{{Name: name, Listen: addr, Upstreams: []string{upstream}, ServerID: BackendID}},
	})
	if err != nil {
		return "", fmt.Errorf("configuring the %s sidecar: %w", s.name, err)
	}
	return addr, nil
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

// intruderRefused connects through the intruder's sidecar and expects the
// connection to end without an echo, then returns the backend's denial log.
func intruderRefused(ctx context.Context, addr string, denials *denialRecorder) (Denial, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return Denial{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Write([]byte("let me in"))
	got, _ := io.ReadAll(c)
	if len(got) > 0 {
		return Denial{}, fmt.Errorf("the intruder got %d bytes back: it was let in", len(got))
	}
	return denials.wait(ctx, IntruderID.String(), 5*time.Second)
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

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free loopback port: %w", err)
	}
	addr := l.Addr().String()
	return addr, l.Close()
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
