package client_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	td       = spiffeid.RequireTrustDomainFromString("mesh.test")
	cpID     = spiffeid.RequireFromString("spiffe://mesh.test/latch/control-plane")
	backend  = spiffeid.RequireFromString("spiffe://mesh.test/backend")
	frontend = spiffeid.RequireFromString("spiffe://mesh.test/frontend")
)

func declaration(id spiffeid.ID, port int, allow ...string) string {
	s := fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: %s}
spec:
  spiffeID: %s
  inbound:
    - port: %d
      appAddress: 127.0.0.1:7001
      allow:
`, strings.TrimPrefix(id.Path(), "/"), id, port)
	if len(allow) == 0 {
		return strings.TrimSuffix(s, "\n") + " []\n"
	}
	for _, a := range allow {
		s += "        - id: " + a + "\n"
	}
	return s
}

func writeFile(t *testing.T, dir, name, content string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func logger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// controlPlane is an in-process `latch control-plane` on loopback.
type controlPlane struct {
	srv   *server.Server
	store *policy.Store
	addr  string
	stop  func()
}

func startControlPlane(t *testing.T, ca *identitytest.CA, dir, addr string) *controlPlane {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	store, err := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{td, spiffeid.RequireTrustDomainFromString("partner.test")}}, logger(t))
	if err != nil {
		t.Fatal(err)
	}
	files := policy.NewFiles(store, dir)
	// Loopback only: tests never bind other addresses.
	srv := server.New(ctx, server.Options{Logger: logger(t), Translate: translate.Options{InboundHost: "127.0.0.1"}})
	snap, _, _ := files.Reload()
	srv.Update(snap)
	tlsc := identity.NewTLS(ca.Source(t, cpID.String())).ServerConfig(identity.Modern(), func(peer spiffeid.ID) error {
		if peer.MemberOf(td) {
			return nil
		}
		return fmt.Errorf("%s is not in %s", peer, td)
	})
	g := srv.NewGRPCServer(tlsc)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	go func() {
		defer wg.Done()
		// As latch control-plane does: what each reload changed.
		_ = files.Watch(ctx, 10*time.Millisecond, srv.UpdateChanged)
	}()
	var once sync.Once
	cp := &controlPlane{srv: srv, store: store, addr: lis.Addr().String()}
	cp.stop = func() {
		once.Do(func() {
			cancel()
			g.Stop()
			wg.Wait()
		})
	}
	t.Cleanup(cp.stop)
	return cp
}

// sidecar runs an ADS client whose apply records every config.
type sidecar struct {
	c       *client.Client
	applied chan *proxy.Config
	mu      sync.Mutex
	refuse  error // returned by apply when set
	current *proxy.Config
	stop    func()
}

func startSidecar(t *testing.T, opts client.Options) *sidecar {
	t.Helper()
	s := &sidecar{applied: make(chan *proxy.Config, 64)}
	if opts.MinBackoff == 0 {
		opts.MinBackoff, opts.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
	}
	if opts.Logger == nil {
		opts.Logger = logger(t)
	}
	c, err := client.New(opts, func(cfg *proxy.Config) error {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.refuse != nil {
			return s.refuse
		}
		s.current = cfg
		s.applied <- cfg
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	s.c = c
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	var once sync.Once
	s.stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(s.stop)
	return s
}

func (s *sidecar) next(t *testing.T) *proxy.Config {
	t.Helper()
	select {
	case cfg := <-s.applied:
		return cfg
	case <-time.After(10 * time.Second):
		t.Fatalf("no config applied; client status %+v", s.c.Status())
	}
	return nil
}

func (s *sidecar) noneFor(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case cfg := <-s.applied:
		t.Fatalf("unexpected config applied: %+v", cfg)
	case <-time.After(d):
	}
}

// eachProtocol runs f over delta xDS (the client's default) and state of
// the world.
func eachProtocol(t *testing.T, f func(t *testing.T, p client.Protocol)) {
	for _, p := range []client.Protocol{client.Incremental, client.StateOfTheWorld} {
		t.Run(p.String(), func(t *testing.T) { f(t, p) })
	}
}

// sidecarOptsFor is sidecarOpts speaking protocol p.
func sidecarOptsFor(t *testing.T, p client.Protocol, ca *identitytest.CA, addr string, id spiffeid.ID) client.Options {
	o := sidecarOpts(t, ca, addr, id)
	o.Protocol = p
	return o
}

func sidecarOpts(t *testing.T, ca *identitytest.CA, addr string, id spiffeid.ID) client.Options {
	return client.Options{
		Address:        addr,
		ControlPlaneID: cpID,
		NodeID:         id,
		TLS:            identity.NewTLS(ca.Source(t, id.String())).ClientConfig(identity.Modern(), cpID),
	}
}

func allows(cfg *proxy.Config, id spiffeid.ID) bool {
	return len(cfg.Inbound) == 1 && cfg.Inbound[0].Allow.Allows(id)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestEndToEndPropagation(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		dir := t.TempDir()
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String()))
		cp := startControlPlane(t, ca, dir, "127.0.0.1:0")
		sc := startSidecar(t, sidecarOptsFor(t, p, ca, cp.addr, backend))

		cfg := sc.next(t)
		if cfg.Source != "xds" || cfg.Version != cp.srv.Version(backend.String()) {
			t.Errorf("source %q version %q, want xds and %q", cfg.Source, cfg.Version, cp.srv.Version(backend.String()))
		}
		if !allows(cfg, frontend) || cfg.Inbound[0].Listen != "127.0.0.1:15001" || cfg.Inbound[0].App != "127.0.0.1:7001" {
			t.Fatalf("first config: %+v", cfg.Inbound)
		}

		intruder := spiffeid.RequireFromString("spiffe://mesh.test/intruder")
		var times []time.Duration
		for i, allow := range [][]string{{frontend.String(), intruder.String()}, {intruder.String()}, {frontend.String()}} {
			start := time.Now()
			writeFile(t, dir, "backend.yaml", declaration(backend, 15001, allow...))
			cfg = sc.next(t)
			times = append(times, time.Since(start))
			wantFrontend, wantIntruder := strings.Contains(strings.Join(allow, " "), "frontend"), strings.Contains(strings.Join(allow, " "), "intruder")
			if allows(cfg, frontend) != wantFrontend || allows(cfg, intruder) != wantIntruder {
				t.Fatalf("edit %d: allow-list %v", i, cfg.Inbound[0].Allow)
			}
		}
		t.Logf("declaration edit → config applied in the sidecar: %v (watch debounce 10ms)", times)

		// The sidecar reports ACKs: nothing refused.
		if n := cp.srv.LastNACK(backend.String()); n != "" {
			t.Errorf("control plane saw a NACK: %s", n)
		}
		waitFor(t, "the status to show the version and protocol", func() bool {
			st := sc.c.Status()
			return st.Connected && st.AppliedVersion == cfg.Version && st.Protocol == p.String()
		})
		// The control plane knows the sidecar applied the version it serves,
		// the version it would compute for the declaration.
		waitFor(t, "the control plane to count the ACK", func() bool {
			acks := cp.srv.Acks()
			return len(acks) == 1 && acks[0] == server.NodeAcks{Node: backend.String(), Version: cfg.Version, Connected: 1, Acked: 1}
		})
		decl, ok := cp.store.Snapshot().Lookup(backend)
		if !ok || cp.srv.VersionFor(decl) != cfg.Version {
			t.Errorf("VersionFor = %q, want the served %q", cp.srv.VersionFor(decl), cfg.Version)
		}
	})
}

func TestUndeclaredNodeServesNothing(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		dir := t.TempDir()
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001))
		cp := startControlPlane(t, ca, dir, "127.0.0.1:0")
		sc := startSidecar(t, sidecarOptsFor(t, p, ca, cp.addr, frontend))
		cfg := sc.next(t)
		if len(cfg.Inbound)+len(cfg.Outbound) != 0 {
			t.Fatalf("undeclared node got %+v", cfg)
		}
		// Declaring it later reaches it.
		writeFile(t, dir, "frontend.yaml", declaration(frontend, 15002, backend.String()))
		if cfg := sc.next(t); !allows(cfg, backend) {
			t.Fatalf("after declaring: %+v", cfg)
		}
	})
}

// TestNodeIDSpoofingRefused: a sidecar proving one ID cannot ask for
// another's policy, over SotW or delta.
func TestNodeIDSpoofingRefused(t *testing.T) {
	ca := identitytest.NewCA(t, "mesh.test")
	dir := t.TempDir()
	writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String()))
	cp := startControlPlane(t, ca, dir, "127.0.0.1:0")

	conn := dial(t, cp.addr, identity.NewTLS(ca.Source(t, frontend.String())).ClientConfig(identity.Modern(), cpID))
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	sotw, err := ads.StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := sotw.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: backend.String()}, TypeUrl: client.ListenerType}); err != nil {
		t.Fatal(err)
	}
	resp, err := sotw.Recv()
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("SotW spoof: got %v, %v; want PermissionDenied", resp, err)
	}
	t.Logf("SotW: %v", err)

	delta, err := ads.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := delta.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: backend.String()}, TypeUrl: client.ListenerType}); err != nil {
		t.Fatal(err)
	}
	dresp, err := delta.Recv()
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("delta spoof: got %v, %v; want PermissionDenied", dresp, err)
	}

	// The real client with a mismatched node ID is refused too and applies nothing.
	opts := sidecarOpts(t, ca, cp.addr, backend)
	opts.TLS = identity.NewTLS(ca.Source(t, frontend.String())).ClientConfig(identity.Modern(), cpID)
	sc := startSidecar(t, opts)
	waitFor(t, "the refusal", func() bool { return strings.Contains(sc.c.Status().LastError, "PermissionDenied") })
	sc.noneFor(t, 50*time.Millisecond)

	// Honest delta streams work: the control plane serves delta too.
	conn2 := dial(t, cp.addr, identity.NewTLS(ca.Source(t, backend.String())).ClientConfig(identity.Modern(), cpID))
	delta2, err := discovery.NewAggregatedDiscoveryServiceClient(conn2).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := delta2.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: backend.String()}, TypeUrl: client.ListenerType, ResourceNamesSubscribe: []string{"*"}}); err != nil {
		t.Fatal(err)
	}
	d, err := delta2.Recv()
	if err != nil || len(d.GetResources()) != 1 || d.GetResources()[0].GetName() != "inbound|15001" {
		t.Fatalf("delta: %v, %v", d, err)
	}
}

func dial(t *testing.T, addr string, tlsc *tls.Config) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsc)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestNACKKeepsLastGood: an update the sidecar refuses — by validation or
// because the data plane would not take it — leaves the running config in
// place, and the reason reaches the control plane.
func TestNACKKeepsLastGood(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		dir := t.TempDir()
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String()))
		cp := startControlPlane(t, ca, dir, "127.0.0.1:0")
		sc := startSidecar(t, sidecarOptsFor(t, p, ca, cp.addr, backend))
		good := sc.next(t)

		// Valid for the control plane, but the sidecar takes an app off
		// loopback only when told to: it must refuse the whole update.
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String())+`    - port: 15100
      appAddress: 192.0.2.10:8080
      allow: []
`)
		waitFor(t, "the NACK at the control plane", func() bool { return cp.srv.LastNACK(backend.String()) != "" })
		nack := cp.srv.LastNACK(backend.String())
		if !strings.Contains(nack, `cluster "inbound|15100|app"`) || !strings.Contains(nack, "load_assignment") {
			t.Errorf("NACK does not name resource and field: %s", nack)
		}
		t.Logf("control plane saw: %s", nack)
		sc.noneFor(t, 50*time.Millisecond)
		waitFor(t, "the NACK in the ACK state", func() bool {
			acks := cp.srv.Acks()
			return len(acks) == 1 && acks[0].Connected == 1 && acks[0].Acked == 0 && acks[0].NACKed == 1 &&
				strings.Contains(acks[0].NACK, `cluster "inbound|15100|app"`)
		})

		// The data plane refuses the next one: NACK as well, nothing changes.
		sc.mu.Lock()
		sc.refuse = errors.New("listener inbound|15001: address in use")
		sc.mu.Unlock()
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001))
		waitFor(t, "the apply refusal at the control plane", func() bool {
			return strings.Contains(cp.srv.LastNACK(backend.String()), "address in use")
		})
		sc.mu.Lock()
		cur := sc.current
		sc.refuse = nil
		sc.mu.Unlock()
		if cur != good {
			t.Fatalf("running config changed after NACKs: %+v", cur)
		}

		// A good update goes through again and clears the NACK.
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001, "spiffe://mesh.test/new"))
		if cfg := sc.next(t); !allows(cfg, spiffeid.RequireFromString("spiffe://mesh.test/new")) {
			t.Fatalf("after recovery: %+v", cfg.Inbound)
		}
		waitFor(t, "the NACK to clear", func() bool { return cp.srv.LastNACK(backend.String()) == "" })
		waitFor(t, "the ACK state to clear", func() bool {
			acks := cp.srv.Acks()
			return len(acks) == 1 && acks[0].Acked == 1 && acks[0].NACKed == 0 && acks[0].NACK == ""
		})
	})
}

// TestControlPlaneRestart: while the control plane is down the sidecar keeps
// its config; once it is back the sidecar reconnects and follows changes.
func TestControlPlaneRestart(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		dir := t.TempDir()
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String()))
		cp := startControlPlane(t, ca, dir, "127.0.0.1:0")
		sc := startSidecar(t, sidecarOptsFor(t, p, ca, cp.addr, backend))
		first := sc.next(t)

		cp.stop()
		waitFor(t, "the client to notice", func() bool { return !sc.c.Status().Connected })
		sc.noneFor(t, 100*time.Millisecond) // reconnect attempts fail; nothing is applied

		start := time.Now()
		cp2 := startControlPlane(t, ca, dir, cp.addr)
		waitFor(t, "the reconnect", func() bool { return sc.c.Status().Connected })
		t.Logf("control plane back → sidecar reconnected in %v", time.Since(start))
		// Same declarations, same version: the identical config is not re-applied.
		sc.noneFor(t, 50*time.Millisecond)
		if cp2.srv.Version(backend.String()) != first.Version {
			t.Errorf("restarted control plane serves version %s, was %s: versions must be content hashes", cp2.srv.Version(backend.String()), first.Version)
		}
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001))
		if cfg := sc.next(t); allows(cfg, frontend) {
			t.Fatalf("change after restart not applied: %+v", cfg.Inbound)
		}
	})
}

// TestStateDirRestart: a sidecar restarted while the control plane is down
// serves its last good policy from the state directory.
func TestStateDirRestart(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		dir, state := t.TempDir(), t.TempDir()
		writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String()))
		cp := startControlPlane(t, ca, dir, "127.0.0.1:0")
		opts := sidecarOptsFor(t, p, ca, cp.addr, backend)
		opts.StateDir = state
		sc := startSidecar(t, opts)
		live := sc.next(t)
		sc.stop()
		cp.stop()

		sc2 := startSidecar(t, opts)
		restored := sc2.next(t)
		if restored.Source != "xds-state" || restored.Version != live.Version || !allows(restored, frontend) {
			t.Fatalf("restored %+v from %+v", restored, live)
		}
		if sc2.c.Status().Connected {
			t.Fatal("connected to a stopped control plane")
		}

		// A state file of another node is not used.
		other := sidecarOptsFor(t, p, ca, cp.addr, frontend)
		other.StateDir = state
		sc3 := startSidecar(t, other)
		sc3.noneFor(t, 100*time.Millisecond)
	})
}

// TestWrongControlPlaneRefused: the sidecar talks only to the control plane
// ID it was given, and the control plane only to SVIDs of its trust domain.
func TestWrongControlPlaneRefused(t *testing.T) {
	ca := identitytest.NewCA(t, "mesh.test")
	dir := t.TempDir()
	writeFile(t, dir, "backend.yaml", declaration(backend, 15001, frontend.String()))
	cp := startControlPlane(t, ca, dir, "127.0.0.1:0")

	// The TLS config expects the right ID, but Options names another: the
	// client's own check refuses.
	opts := sidecarOpts(t, ca, cp.addr, backend)
	opts.ControlPlaneID = spiffeid.RequireFromString("spiffe://mesh.test/other-cp")
	sc := startSidecar(t, opts)
	waitFor(t, "the refusal", func() bool { return strings.Contains(sc.c.Status().LastError, "other-cp") })
	sc.noneFor(t, 50*time.Millisecond)

	// A sidecar whose SVID comes from another CA cannot connect.
	evil := identitytest.NewCA(t, "mesh.test")
	opts = sidecarOpts(t, ca, cp.addr, backend)
	opts.TLS = identity.NewTLS(identitytest.NewSource(evil.SVID(t, backend.String()), ca.Bundle())).ClientConfig(identity.Modern(), cpID)
	sc2 := startSidecar(t, opts)
	waitFor(t, "the refusal", func() bool { return sc2.c.Status().LastError != "" })
	sc2.noneFor(t, 50*time.Millisecond)
	if cp.srv.Connected() != 0 {
		t.Errorf("%d streams open", cp.srv.Connected())
	}
}
