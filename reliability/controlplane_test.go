package reliability

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// controlPlane is latch's xDS server on a fixed loopback address, so that it
// can be killed and started again where the sidecars expect it.
type controlPlane struct {
	xs     *server.Server
	addr   string
	tlsc   *identity.TLS
	cancel context.CancelFunc
	g      *grpc.Server
	done   chan struct{}
}

func startControlPlane(t *testing.T, addr string, tlsc *identity.TLS, decls []policy.Declaration) *controlPlane {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	xs := server.New(ctx, server.Options{Translate: translate.Options{InboundHost: "127.0.0.1"}})
	xs.Update(policy.Snapshot{Declarations: decls})
	g := xs.NewGRPCServer(tlsc.ServerConfig(identity.Modern(), func(peer spiffeid.ID) error {
		if !peer.MemberOf(spiffeid.RequireTrustDomainFromString(trustDomain)) {
			return fmt.Errorf("%s is not in the trust domain", peer)
		}
		return nil
	}))
	cp := &controlPlane{xs: xs, addr: lis.Addr().String(), tlsc: tlsc, cancel: cancel, g: g, done: make(chan struct{})}
	go func() {
		defer close(cp.done)
		g.Serve(lis)
	}()
	t.Cleanup(cp.kill)
	return cp
}

// update pushes new declarations to the connected sidecars.
func (cp *controlPlane) update(decls []policy.Declaration) {
	cp.xs.Update(policy.Snapshot{Declarations: decls})
}

// kill stops the control plane abruptly: streams are cut, nothing is said.
func (cp *controlPlane) kill() {
	cp.g.Stop()
	cp.cancel()
	<-cp.done
}

func backendDecl(t *testing.T, port int, app string, allowed ...string) []policy.Declaration {
	t.Helper()
	doc := fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: backend}
spec:
  spiffeID: %s
  inbound:
    - port: %d
      appAddress: %s
      allow:
`, id("backend"), port, app)
	for _, a := range allowed {
		doc += fmt.Sprintf("        - id: %s\n", id(a))
	}
	ds, err := policy.Parse("backend.yaml", []byte(doc), policy.Options{TrustDomains: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString(trustDomain)}})
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

// TestControlPlaneRestart: the backend sidecar takes its policy from the
// control plane over ADS. The control plane is killed: the sidecar keeps its
// last good config and keeps serving. It comes back with a new policy: the
// sidecar reconnects and applies it.
func TestControlPlaneRestart(t *testing.T) {
	verdict(t, "faults")
	m := newMesh(t, devca.Options{})
	cpTLS := identity.NewTLS(m.source(t, "control-plane"))
	backSrc := m.source(t, "backend")
	app := newApp(t, nil)
	inAddr := freeAddr(t)
	_, portStr, _ := net.SplitHostPort(inAddr)
	var port int
	fmt.Sscan(portStr, &port)

	cp := startControlPlane(t, "127.0.0.1:0", cpTLS, backendDecl(t, port, app.addr(), "frontend"))
	back := newSidecar(t, backSrc)
	xc, err := client.New(client.Options{
		Address:        cp.addr,
		ControlPlaneID: id("control-plane"),
		NodeID:         id("backend"),
		TLS:            identity.NewTLS(backSrc).ClientConfig(identity.Modern(), id("control-plane")),
		MinBackoff:     50 * time.Millisecond,
		MaxBackoff:     300 * time.Millisecond,
	}, back.srv.Apply)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		xc.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	waitConfig := func(what string, ok func(*proxy.Config) bool) *proxy.Config {
		t.Helper()
		deadline := time.Now().Add(waitFor)
		for time.Now().Before(deadline) {
			if c := back.srv.Current(); c != nil && ok(c) {
				return c
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("sidecar never got %s; status %+v", what, xc.Status())
		return nil
	}
	first := waitConfig("its first policy", func(*proxy.Config) bool { return true })

	front := newSidecar(t, m.source(t, "frontend"))
	front.apply(&proxy.Config{Version: "1", TLS: identity.Modern(), Outbound: []proxy.Outbound{{
		Name: "backend", Listen: "127.0.0.1:0", Upstreams: []string{inAddr}, ServerID: id("backend"),
	}}})
	entry := front.addr("backend")
	if err := echoOK(entry, 4096, waitFor); err != nil {
		t.Fatalf("through the xDS-configured sidecar: %v", err)
	}

	// Kill the control plane; the sidecar notices and keeps serving.
	cp.kill()
	deadline := time.Now().Add(waitFor)
	for xc.Status().Connected && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if xc.Status().Connected {
		t.Fatal("client still connected to a dead control plane")
	}
	served := 0
	for range 20 {
		if err := echoOK(entry, 4096, waitFor); err != nil {
			t.Fatalf("during the control-plane outage: %v", err)
		}
		served++
	}
	if c := back.srv.Current(); c.Version != first.Version {
		t.Fatalf("config changed during the outage: %s → %s", first.Version, c.Version)
	}

	// Back, on the same address, with a policy that no longer allows the
	// frontend: the sidecar must reconnect and apply it.
	startControlPlane(t, cp.addr, cpTLS, backendDecl(t, port, app.addr(), "batch"))
	second := waitConfig("the restarted control plane's policy", func(c *proxy.Config) bool { return c.Version != first.Version })
	got, _ := roundTrip(entry, []byte("now denied"), waitFor)
	if len(got) != 0 {
		t.Errorf("frontend still served after the new policy denied it")
	}
	t.Logf("control plane killed: %d connections served on the last good config %s; restarted: config %s applied", served, first.Version, second.Version)
	figuref("faults", "control plane killed: connections served on the last good config", "%d / 20", served)
	figure("faults", "control plane restarted: sidecar reconnected and applied the new policy", "yes")
}
