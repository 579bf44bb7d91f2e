package server

import (
	"context"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/xds/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var opts = policy.Options{TrustDomains: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("mesh.test")}}

func decls(t *testing.T, src string) policy.Snapshot {
	t.Helper()
	ds, err := policy.Parse("t.yaml", []byte(src), opts)
	if err != nil {
		t.Fatal(err)
	}
	return policy.Snapshot{Declarations: ds}
}

const a = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: a}
spec:
  spiffeID: spiffe://mesh.test/a
  inbound: [{port: 8443, appAddress: "127.0.0.1:1", allow: [{id: spiffe://mesh.test/b}]}]
`

const b = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: b}
spec:
  spiffeID: spiffe://mesh.test/b
  outbound: [{port: 9001, target: "127.0.0.1:8443", serverID: spiffe://mesh.test/a}]
`

func TestUpdateVersionsAndRemoval(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(ctx, Options{})
	if s.Ready() {
		t.Fatal("ready before any declarations")
	}
	s.Update(decls(t, a+"---\n"+b))
	va, vb := s.Version("spiffe://mesh.test/a"), s.Version("spiffe://mesh.test/b")
	if va == "" || vb == "" || va == vb || !s.Ready() {
		t.Fatalf("versions %q %q ready %v", va, vb, s.Ready())
	}
	snap, err := s.cache.GetSnapshot("spiffe://mesh.test/b")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(snap.GetResources(resource.EndpointType)); n != 1 {
		t.Errorf("b has %d endpoint resources, want 1", n)
	}

	// Same declarations, another replica: same versions.
	s2 := New(ctx, Options{})
	s2.Update(decls(t, b+"---\n"+a))
	if s2.Version("spiffe://mesh.test/a") != va || s2.Version("spiffe://mesh.test/b") != vb {
		t.Error("replicas disagree on versions: they must be content hashes")
	}

	// b's declaration goes away while b is connected: b is served an empty
	// snapshot, not its old one.
	bStream := streamKey{id: 1}
	s.streams[bStream] = &streamState{peer: spiffeid.RequireFromString("spiffe://mesh.test/b")}
	if err := s.checkNode(bStream, &core.Node{Id: "spiffe://mesh.test/b"}); err != nil {
		t.Fatal(err)
	}
	s.Update(decls(t, a))
	if s.Version("spiffe://mesh.test/a") != va {
		t.Error("a's version changed though its declaration did not")
	}
	snap, err = s.cache.GetSnapshot("spiffe://mesh.test/b")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(snap.GetResources(resource.ListenerType)) + len(snap.GetResources(resource.ClusterType)); n != 0 || s.Version("spiffe://mesh.test/b") == vb {
		t.Errorf("removed declaration still served: %d resources, version %s", n, s.Version("spiffe://mesh.test/b"))
	}

	// a's goes away while a is not connected: nothing is kept for it (it is
	// told to serve nothing when it connects).
	s.Update(decls(t, b))
	s.Update(policy.Snapshot{})
	if _, err := s.cache.GetSnapshot("spiffe://mesh.test/a"); err == nil || s.Version("spiffe://mesh.test/a") != "" {
		t.Errorf("a node with neither declaration nor stream is still held: version %q", s.Version("spiffe://mesh.test/a"))
	}
	if s.Version("spiffe://mesh.test/b") == "" {
		t.Error("the connected node lost its (empty) snapshot")
	}
}

func TestCheckNode(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(ctx, Options{})
	peer := spiffeid.RequireFromString("spiffe://mesh.test/a")
	key := streamKey{id: 1}
	s.streams[key] = &streamState{peer: peer}

	if err := s.checkNode(key, nil); err == nil {
		t.Error("first request without a node accepted")
	}
	if err := s.checkNode(key, &core.Node{Id: "spiffe://mesh.test/b"}); err == nil {
		t.Error("another workload's node ID accepted")
	}
	if err := s.checkNode(key, &core.Node{Id: "spiffe://mesh.test/a/"}); err == nil {
		t.Error("a look-alike node ID accepted")
	}
	// Before declarations are loaded an unknown node is not told "nothing".
	if err := s.checkNode(key, &core.Node{Id: peer.String()}); err != nil {
		t.Fatal(err)
	}
	if s.Version(peer.String()) != "" {
		t.Error("empty snapshot set before declarations were loaded")
	}
	if err := s.checkNode(key, nil); err != nil {
		t.Errorf("later request without node refused: %v", err)
	}
	if err := s.checkNode(key, &core.Node{Id: "spiffe://mesh.test/b"}); err == nil {
		t.Error("node ID switched mid-stream")
	}
	if err := s.checkNode(streamKey{delta: true, id: 1}, &core.Node{Id: peer.String()}); err == nil {
		t.Error("request on an unknown (delta) stream accepted")
	}
	s.Update(policy.Snapshot{})
	if err := s.checkNode(key, &core.Node{Id: peer.String()}); err != nil {
		t.Fatal(err)
	}
	if s.Version(peer.String()) == "" {
		t.Error("undeclared node not given an empty snapshot once declarations are loaded")
	}
}
