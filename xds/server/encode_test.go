package server

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"reflect"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/translate"
)

// every shape of declaration the translation knows: inbound with each rule
// kind, PROXY protocol and federation; outbound over EDS and DNS.
const shapes = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: svc}
spec:
  spiffeID: spiffe://mesh.test/ns/shop/sa/svc
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      idleTimeout: 90s
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - trustDomain: partner.test
        - pathPrefix: spiffe://mesh.test/ns/ops
    - port: 8444
      appAddress: 127.0.0.1:8081
      proxyProtocol: v2
      federatesWith: [partner.test]
      allow: [{pathPrefix: spiffe://partner.test/ns/billing}]
  outbound:
    - port: 9001
      endpoints: ["10.0.0.2:8443", "10.0.0.1:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
    - port: 9002
      target: pay.partner.svc:443
      serverID: spiffe://partner.test/pay
      federatesWith: [partner.test]
`

// TestSnapshotsHoldResourcesEncoded: a node's snapshot holds each resource
// as the bytes it marshals to (encode), and what it sends is exactly what
// the translation marshals to, under the same version.
func TestSnapshotsHoldResourcesEncoded(t *testing.T) {
	ds, err := policy.Parse("t.yaml", []byte(shapes), policy.Options{TrustDomains: []spiffeid.TrustDomain{
		spiffeid.RequireTrustDomainFromString("mesh.test"), spiffeid.RequireTrustDomainFromString("partner.test"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	r := translate.Translate(ds[0], translate.Options{})
	want := byType(translate.Translate(ds[0], translate.Options{}))
	b := build(ds[0].ID.String(), r)
	if b.err != nil {
		t.Fatal(b.err)
	}
	if b.version != translate.Translate(ds[0], translate.Options{}).Hash() {
		t.Errorf("version %s, want the translation's hash %s", b.version, r.Hash())
	}
	det := proto.MarshalOptions{Deterministic: true}
	n := 0
	for typ, list := range want {
		held := b.snap.GetResources(typ)
		if len(held) != len(list) {
			t.Fatalf("%s: %d resources held, want %d", typ, len(held), len(list))
		}
		for _, w := range list {
			name := cache.GetResourceName(w)
			h, ok := held[name]
			if !ok {
				t.Fatalf("%s %q not held", typ, name)
			}
			if len(h.ProtoReflect().GetUnknown()) == 0 {
				t.Errorf("%s %q is held as a tree of fields, not encoded", typ, name)
			}
			if h.ProtoReflect().Descriptor().FullName() == w.ProtoReflect().Descriptor().FullName() {
				t.Errorf("%s %q is held as a message of its type (%d bytes before its fields), not as its bytes", typ, name, reflect.TypeOf(w).Elem().Size())
			}
			wb, err := det.Marshal(w)
			if err != nil {
				t.Fatal(err)
			}
			hb, err := det.Marshal(h)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(wb, hb) {
				t.Errorf("%s %q marshals to other bytes than the translation's", typ, name)
			}
			// What a sidecar decodes is the translation's resource.
			got := w.ProtoReflect().New().Interface()
			if err := proto.Unmarshal(hb, got); err != nil || !proto.Equal(got, w) {
				t.Errorf("%s %q decodes to something else (%v)", typ, name, err)
			}
			n++
		}
	}
	// What go-control-plane's own snapshot of the translation would give
	// the cache: the same resources per type, the same version, and for
	// delta streams the same version of each resource, so a sidecar moving
	// between replicas or releases is sent nothing it has.
	theirs, err := cache.NewSnapshot(b.version, want)
	if err != nil {
		t.Fatal(err)
	}
	if err := theirs.ConstructVersionMap(); err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType} {
		if got, w := b.snap.GetVersion(typ), theirs.GetVersion(typ); got != w && !(typ == resource.RouteType && got == "") {
			t.Errorf("%s: version %q, want %q", typ, got, w)
		}
		if got, w := b.snap.GetVersionMap(typ), theirs.GetVersionMap(typ); !maps.Equal(got, w) {
			t.Errorf("%s: resource versions %v, want %v", typ, got, w)
		}
		got, w := b.snap.GetResourcesAndTTL(typ), theirs.GetResourcesAndTTL(typ)
		if len(got) != len(w) {
			t.Errorf("%s: %d resources with TTL, want %d", typ, len(got), len(w))
		}
		for name, r := range w {
			g, ok := got[name]
			gb, _ := det.Marshal(g.Resource)
			wb, _ := det.Marshal(r.Resource)
			if !ok || g.TTL != nil || !bytes.Equal(gb, wb) {
				t.Errorf("%s %q: held %v with TTL %v, marshalling to other bytes", typ, name, ok, g.TTL)
			}
		}
	}
	if n < 7 || len(want[resource.EndpointType]) == 0 {
		t.Fatalf("only %d resources (%d endpoints): the declaration should cover every shape", n, len(want[resource.EndpointType]))
	}
	// The translation's resources are left as they were.
	if !proto.Equal(r.Listeners[0], translate.Translate(ds[0], translate.Options{}).Listeners[0]) {
		t.Error("encoding changed the translation's resources")
	}
}

// TestBuildRefuses: consistency is still checked although encoded clusters
// hide their references, and a snapshot whose resources cannot be told apart
// by name is not served.
func TestBuildRefuses(t *testing.T) {
	eds := &cluster.Cluster{Name: "outbound|9001", ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig: &cluster.Cluster_EdsClusterConfig{}}
	if b := build("n", translate.Resources{Clusters: []*cluster.Cluster{eds}}); b.err == nil {
		t.Error("an EDS cluster without its endpoints was served")
	}
	if b := build("n", translate.Resources{Clusters: []*cluster.Cluster{eds}, Endpoints: []*endpoint.ClusterLoadAssignment{{ClusterName: "outbound|9001"}}}); b.err != nil {
		t.Errorf("a consistent snapshot refused: %v", b.err)
	}
	static := &cluster.Cluster{Name: "inbound|8443|app", ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC}}
	if b := build("n", translate.Resources{Clusters: []*cluster.Cluster{static, static}}); b.err == nil {
		t.Error("two clusters of one name were served")
	}
	if b := build("n", translate.Resources{Clusters: []*cluster.Cluster{{ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC}}}}); b.err == nil {
		t.Error("a cluster without a name was served")
	}
}

// TestRefusedSnapshotNotRecorded: a node whose first snapshot could not be
// built is not recorded as served (nor its declaration as translated), so
// the next update builds it again instead of skipping it as unchanged.
func TestRefusedSnapshotNotRecorded(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(ctx, Options{})
	s.snapMu.Lock()
	ok := s.install(built{node: "spiffe://mesh.test/n", err: errors.New("inconsistent")})
	s.snapMu.Unlock()
	if ok || s.Version("spiffe://mesh.test/n") != "" || len(s.served) != 0 {
		t.Errorf("a refused snapshot was recorded: installed %v, version %q, %d nodes held", ok, s.Version("spiffe://mesh.test/n"), len(s.served))
	}
}
