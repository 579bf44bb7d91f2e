package server

import (
	"context"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"latch.dev/latch/xds/translate"
)

// TestResponsesDecodeAsEnvoyDoes reads what the control plane sends over
// real mTLS streams, state of the world and delta at once on one node (two
// streams marshalling the same held resources), and decodes it as Envoy
// does: every resource is an Any whose type URL is the response's type, and
// decodes, by the message that type URL names, to the resource the
// translation made. A delta resource's version is the SHA-256 of its bytes,
// as go-control-plane's own snapshot gives it, so another replica, or a
// restarted one, agrees with it: a sidecar moving there with the versions
// it holds is sent only what it holds at another version, and told what it
// holds that is gone.
func TestResponsesDecodeAsEnvoyDoes(t *testing.T) {
	// b, with a resource of every type and several of some.
	const b = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: b}
spec:
  spiffeID: spiffe://mesh.test/b
  inbound: [{port: 8443, appAddress: "127.0.0.1:1", allow: [{id: spiffe://mesh.test/a}]}]
  outbound:
    - {port: 9001, target: "127.0.0.1:8443", serverID: spiffe://mesh.test/a}
    - {port: 9002, endpoints: ["10.0.0.2:8443", "10.0.0.1:8443"], serverID: spiffe://mesh.test/a}
`
	first, second := startLiveCP(t, Options{}), startLiveCP(t, Options{})
	first.s.Update(decls(t, a+"---\n"+b))
	second.s.Update(decls(t, b+"---\n"+a))
	want := map[string]map[string]proto.Message{}
	wantVersion := map[string]map[string]string{}
	for typ, list := range byType(translate.Translate(decls(t, b).Declarations[0], translate.Options{})) {
		want[typ], wantVersion[typ] = map[string]proto.Message{}, map[string]string{}
		for _, m := range list {
			raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			want[typ][cache.GetResourceName(m)] = m
			wantVersion[typ][cache.GetResourceName(m)] = cache.HashResource(raw)
		}
	}
	if len(want[resource.EndpointType]) == 0 || len(want[resource.ClusterType]) < 2 || len(want[resource.ListenerType]) < 2 {
		t.Fatalf("b should have endpoints and several clusters and listeners: %v", want)
	}
	edsNames := slices.Sorted(maps.Keys(want[resource.EndpointType]))

	// decode checks one resource of a response of typeURL as Envoy would
	// read it, and returns its name. (It runs on the streams' goroutines:
	// it reports, it does not stop the test.)
	decode := func(t *testing.T, typeURL string, a *anypb.Any) string {
		t.Helper()
		if a.GetTypeUrl() != typeURL {
			t.Errorf("a resource of a %s response is an Any of %s", typeURL, a.GetTypeUrl())
			return ""
		}
		m, err := a.UnmarshalNew() // by the type URL, from the registry
		if err != nil {
			t.Errorf("%s: %v", typeURL, err)
			return ""
		}
		name := cache.GetResourceName(m)
		if w, ok := want[typeURL][name]; !ok || !proto.Equal(m, w) {
			t.Errorf("%s %q decodes to another resource than the translation's (known: %v)", typeURL, name, ok)
		}
		return name
	}

	conn := first.dial(t, idB, "")
	st := openADS(t, conn)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // state of the world
		defer wg.Done()
		for _, req := range []*discovery.DiscoveryRequest{
			{Node: &core.Node{Id: idB}, TypeUrl: resource.ClusterType},
			{TypeUrl: resource.EndpointType, ResourceNames: edsNames},
			{TypeUrl: resource.ListenerType},
		} {
			if err := st.Send(req); err != nil {
				t.Error(err)
				return
			}
			resp, err := st.Recv()
			if err != nil {
				t.Error(err)
				return
			}
			if resp.GetTypeUrl() != req.GetTypeUrl() || resp.GetVersionInfo() != first.s.Version(idB) {
				t.Errorf("asked for %s, got %s at version %q", req.GetTypeUrl(), resp.GetTypeUrl(), resp.GetVersionInfo())
				return
			}
			var names []string
			for _, a := range resp.GetResources() {
				names = append(names, decode(t, req.GetTypeUrl(), a))
			}
			if w := slices.Sorted(maps.Keys(want[req.GetTypeUrl()])); !slices.Equal(slices.Sorted(slices.Values(names)), w) {
				t.Errorf("state of the world %s: %v, want %v", req.GetTypeUrl(), names, w)
			}
		}
	}()

	held := map[string]map[string]string{}
	go func() { // delta
		defer wg.Done()
		got := deltaExchange(t, conn, []*discovery.DeltaDiscoveryRequest{
			{Node: &core.Node{Id: idB}, TypeUrl: resource.ClusterType, ResourceNamesSubscribe: []string{"*"}},
			{TypeUrl: resource.ListenerType, ResourceNamesSubscribe: []string{"*"}},
			{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: edsNames},
		})
		for typ, resp := range got {
			held[typ] = map[string]string{}
			for _, r := range resp.GetResources() {
				if name := decode(t, typ, r.GetResource()); name != r.GetName() {
					t.Errorf("delta %s %q carries a resource named %q", typ, r.GetName(), name)
				}
				held[typ][r.GetName()] = r.GetVersion()
			}
			if !maps.Equal(held[typ], wantVersion[typ]) {
				t.Errorf("delta %s: resource versions %v, want the hashes of their bytes %v", typ, held[typ], wantVersion[typ])
			}
		}
	}()
	wg.Wait()
	if t.Failed() {
		return
	}

	// The sidecar moves to the other replica holding what it was sent, one
	// cluster at a version that replica does not have, and a cluster that
	// no longer exists.
	stale := slices.Sorted(maps.Keys(held[resource.ClusterType]))[0]
	initial := maps.Clone(held[resource.ClusterType])
	initial[stale] = "0123"
	initial["outbound|1"] = wantVersion[resource.ClusterType][stale]
	got := deltaExchange(t, second.dial(t, idB, ""), []*discovery.DeltaDiscoveryRequest{
		{Node: &core.Node{Id: idB}, TypeUrl: resource.ClusterType, ResourceNamesSubscribe: []string{"*"}, InitialResourceVersions: initial},
		{TypeUrl: resource.ListenerType, ResourceNamesSubscribe: []string{"*"}, InitialResourceVersions: held[resource.ListenerType]},
	})
	clusters, listeners := got[resource.ClusterType], got[resource.ListenerType]
	if len(clusters.GetResources()) != 1 || clusters.GetResources()[0].GetName() != stale ||
		clusters.GetResources()[0].GetVersion() != wantVersion[resource.ClusterType][stale] {
		t.Errorf("another replica sent %v for clusters held at %v; want only %q again", clusters.GetResources(), initial, stale)
	}
	if !slices.Equal(clusters.GetRemovedResources(), []string{"outbound|1"}) {
		t.Errorf("removed %v, want the cluster that is gone", clusters.GetRemovedResources())
	}
	if len(listeners.GetResources()) != 0 || len(listeners.GetRemovedResources()) != 0 {
		t.Errorf("another replica sent listeners %v (removed %v) to a sidecar holding them", listeners.GetResources(), listeners.GetRemovedResources())
	}
}

// deltaExchange opens a delta stream on conn, sends reqs and returns the
// first response of each of their types.
func deltaExchange(t *testing.T, conn *grpc.ClientConn, reqs []*discovery.DeltaDiscoveryRequest) map[string]*discovery.DeltaDiscoveryResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Error(err)
		return nil
	}
	for _, req := range reqs {
		if err := st.Send(req); err != nil {
			t.Error(err)
			return nil
		}
	}
	out := map[string]*discovery.DeltaDiscoveryResponse{}
	for len(out) < len(reqs) {
		resp, err := st.Recv()
		if err != nil {
			t.Errorf("receiving delta responses (have %d of %d): %v", len(out), len(reqs), err)
			return out
		}
		if _, dup := out[resp.GetTypeUrl()]; dup {
			t.Errorf("a second %s response before the others", resp.GetTypeUrl())
			return out
		}
		out[resp.GetTypeUrl()] = resp
	}
	return out
}
