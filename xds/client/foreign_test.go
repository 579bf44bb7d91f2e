package client

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/translate"
)

// plainCP is a bare go-control-plane server: unlike latch's, it serves
// whatever snapshot a test sets, with per-type versions, and reports every
// NACK it receives.
type plainCP struct {
	cache cachev3.SnapshotCache
	addr  string
	nacks chan string
}

// sotwOnly is an ADS server that does not implement delta xDS, as older
// control planes do not.
type sotwOnly struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	srv serverv3.Server
}

func (s sotwOnly) StreamAggregatedResources(st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	return s.srv.StreamAggregatedResources(st)
}

func startPlainCP(t *testing.T, ca *identitytest.CA, cpID spiffeid.ID) *plainCP {
	return startForeignCP(t, ca, cpID, true)
}

// startForeignCP starts a go-control-plane server, serving delta xDS too if
// delta.
func startForeignCP(t *testing.T, ca *identitytest.CA, cpID spiffeid.ID, delta bool) *plainCP {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cp := &plainCP{cache: cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil), nacks: make(chan string, 100)}
	srv := serverv3.NewServer(ctx, cp.cache, serverv3.CallbackFuncs{
		StreamRequestFunc: func(_ int64, req *discovery.DiscoveryRequest) error {
			if d := req.GetErrorDetail(); d != nil {
				cp.nacks <- d.GetMessage()
			}
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, req *discovery.DeltaDiscoveryRequest) error {
			if d := req.GetErrorDetail(); d != nil {
				cp.nacks <- d.GetMessage()
			}
			return nil
		},
	})
	tlsc := identity.NewTLS(ca.Source(t, cpID.String())).ServerConfig(identity.Modern(), func(spiffeid.ID) error { return nil })
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsc)))
	if delta {
		discovery.RegisterAggregatedDiscoveryServiceServer(g, srv)
	} else {
		discovery.RegisterAggregatedDiscoveryServiceServer(g, sotwOnly{srv: srv})
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	t.Cleanup(func() { cancel(); g.Stop(); wg.Wait() })
	cp.addr = lis.Addr().String()
	return cp
}

// set serves r to nodeID with one version per type: listeners, clusters,
// endpoints.
func (cp *plainCP) set(t *testing.T, r translate.Resources, lv, cv, ev string) {
	t.Helper()
	res := map[resource.Type][]types.Resource{resource.ListenerType: {}, resource.ClusterType: {}, resource.EndpointType: {}}
	for _, l := range r.Listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
	}
	for _, c := range r.Clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], c)
	}
	for _, e := range r.Endpoints {
		res[resource.EndpointType] = append(res[resource.EndpointType], e)
	}
	snap, err := cachev3.NewSnapshot("", res)
	if err != nil {
		t.Fatal(err)
	}
	snap.Resources[types.Listener].Version = lv
	snap.Resources[types.Cluster].Version = cv
	snap.Resources[types.Endpoint].Version = ev
	if err := cp.cache.SetSnapshot(context.Background(), nodeID.String(), snap); err != nil {
		t.Fatal(err)
	}
}

func startClient(t *testing.T, ca *identitytest.CA, addr string, cpID spiffeid.ID, p Protocol) (*Client, chan *proxy.Config) {
	t.Helper()
	applied := make(chan *proxy.Config, 16)
	c, err := New(Options{
		Address: addr, ControlPlaneID: cpID, NodeID: nodeID, Protocol: p,
		TLS:        identity.NewTLS(ca.Source(t, nodeID.String())).ClientConfig(identity.Modern(), cpID),
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, SettleTimeout: 50 * time.Millisecond,
	}, func(cfg *proxy.Config) error { applied <- cfg; return nil })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return c, applied
}

func nextConfig(t *testing.T, ch chan *proxy.Config) *proxy.Config {
	t.Helper()
	select {
	case cfg := <-ch:
		return cfg
	case <-time.After(10 * time.Second):
		t.Fatal("no config applied")
	}
	return nil
}

// TestNACKMatrixOverTheWire pushes every hostile case of the validation
// table through a real ADS stream: each is refused with its reason visible
// at the control plane, and the previous config keeps serving.
func TestNACKMatrixOverTheWire(t *testing.T) {
	for _, p := range []Protocol{Incremental, StateOfTheWorld} {
		t.Run(p.String(), func(t *testing.T) {
			ca := identitytest.NewCA(t, "mesh.test")
			cpID := spiffeid.RequireFromString("spiffe://mesh.test/other-control-plane")
			cp := startPlainCP(t, ca, cpID)
			cp.set(t, goodResources(t), "good", "good", "good")
			c, applied := startClient(t, ca, cp.addr, cpID, p)
			good := nextConfig(t, applied)

			for i, tc := range hostileCases {
				r := goodResources(t)
				tc.edit(&r)
				v := "bad-" + strings.ReplaceAll(tc.name, " ", "-")
				cp.set(t, r, v, v, v)
				// The NACK naming this case's resource and field; earlier ones may
				// still be on their way (refusals of a resent update are delayed).
				deadline := time.After(10 * time.Second)
				for found := false; !found; {
					select {
					case msg := <-cp.nacks:
						found = strings.Contains(msg, tc.resource) && strings.Contains(msg, tc.field)
					case cfg := <-applied:
						t.Fatalf("%d %s: applied %+v", i, tc.name, cfg)
					case <-deadline:
						t.Fatalf("%d %s: no NACK naming %s and %q", i, tc.name, tc.resource, tc.field)
					}
				}
			}
			select {
			case cfg := <-applied:
				t.Fatalf("a hostile update was applied: %+v", cfg)
			default:
			}
			if st := c.Status(); st.LastError == "" || !st.Connected {
				t.Errorf("status after the matrix: %+v", st)
			}
			// And a good change is still taken afterwards.
			r := goodResources(t)
			clusterNamed(r, app).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().PortSpecifier = &core.SocketAddress_PortValue{PortValue: 8081}
			cp.set(t, r, "good2", "good2", "good2")
			// Listeners may follow late (their last refusal is answered after a
			// delay), so the new clusters can be applied on their own first.
			if cfg := nextConfig(t, applied); cfg.Inbound[0].App != "127.0.0.1:8081" || good.Inbound[0].App != "127.0.0.1:8080" {
				t.Errorf("after the matrix: %+v", cfg.Inbound)
			}
			deadline := time.Now().Add(10 * time.Second)
			for c.Status().AppliedVersion != "good2" {
				if time.Now().After(deadline) {
					t.Fatalf("never settled on good2: %+v", c.Status())
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// TestClustersOnlyUpdate: a control plane that versions types separately
// may change clusters without resending listeners; the client applies the
// change once the listeners have had time to follow.
func TestClustersOnlyUpdate(t *testing.T) {
	for _, p := range []Protocol{Incremental, StateOfTheWorld} {
		t.Run(p.String(), func(t *testing.T) {
			ca := identitytest.NewCA(t, "mesh.test")
			cpID := spiffeid.RequireFromString("spiffe://mesh.test/other-control-plane")
			cp := startPlainCP(t, ca, cpID)
			cp.set(t, goodResources(t), "l1", "c1", "e1")
			_, applied := startClient(t, ca, cp.addr, cpID, p)
			first := nextConfig(t, applied)
			if first.Inbound[0].App != "127.0.0.1:8080" {
				t.Fatalf("first: %+v", first.Inbound)
			}

			r := goodResources(t)
			clusterNamed(r, app).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().PortSpecifier = &core.SocketAddress_PortValue{PortValue: 8081}
			cp.set(t, r, "l1", "c2", "e1")
			cfg := nextConfig(t, applied)
			// Over delta, the version is the latest response's: the
			// listeners, unchanged, are not sent again.
			want := map[Protocol]string{StateOfTheWorld: "lds=l1,cds=c2,eds=e1", Incremental: "c2"}[p]
			if cfg.Inbound[0].App != "127.0.0.1:8081" || cfg.Version != want {
				t.Fatalf("clusters-only update: version %s, inbound %+v", cfg.Version, cfg.Inbound)
			}
		})
	}
}

// TestFallsBackToStateOfTheWorld: against a control plane that does not
// implement delta xDS (Unimplemented), the client speaks state of the world
// on the same connection, and follows changes there; against one that
// does, it stays on delta.
func TestFallsBackToStateOfTheWorld(t *testing.T) {
	for _, delta := range []bool{false, true} {
		ca := identitytest.NewCA(t, "mesh.test")
		cpID := spiffeid.RequireFromString("spiffe://mesh.test/other-control-plane")
		cp := startForeignCP(t, ca, cpID, delta)
		cp.set(t, goodResources(t), "v1", "v1", "v1")
		c, applied := startClient(t, ca, cp.addr, cpID, Incremental)
		if cfg := nextConfig(t, applied); cfg.Version != "v1" {
			t.Fatalf("delta served %v: version %s", delta, cfg.Version)
		}
		want := map[bool]string{false: "sotw", true: "delta"}[delta]
		if st := c.Status(); st.Protocol != want || !st.Connected {
			t.Errorf("delta served %v: status %+v, want protocol %s", delta, st, want)
		}
		r := goodResources(t)
		clusterNamed(r, app).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().PortSpecifier = &core.SocketAddress_PortValue{PortValue: 8081}
		cp.set(t, r, "v2", "v2", "v2")
		if cfg := nextConfig(t, applied); cfg.Inbound[0].App != "127.0.0.1:8081" {
			t.Errorf("delta served %v: after a change: %+v", delta, cfg.Inbound)
		}
		// This control plane does not order its types: the endpoints may
		// come last, unchanged, and complete the version.
		deadline := time.Now().Add(10 * time.Second)
		for c.Status().AppliedVersion != "v2" {
			if time.Now().After(deadline) {
				t.Fatalf("delta served %v: never settled on v2: %+v", delta, c.Status())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}
