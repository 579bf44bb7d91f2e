package server

import (
	"context"
	"strings"
	"testing"
	"unsafe"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
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
	s.streams[bStream] = &streamState{from: peerKey{id: "spiffe://mesh.test/b"}}
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
	s.streams[key] = &streamState{from: peerKey{id: peer.String()}}

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

	// A node's streams are counted once each, however many requests name
	// the node, and each leaves with its stream.
	second := streamKey{delta: true, id: 7}
	s.streams[second] = &streamState{from: peerKey{id: peer.String()}}
	for range 3 {
		if err := s.checkNode(second, &core.Node{Id: peer.String()}); err != nil {
			t.Fatal(err)
		}
	}
	if n := s.boundStreams(peer.String()); n != 2 {
		t.Errorf("%d streams bound to the node, want 2", n)
	}
	s.callbacks().OnStreamClosed(key.id, nil)
	if n := s.boundStreams(peer.String()); n != 1 || len(s.Undeclared()) != 1 {
		t.Errorf("after one stream closed: %d streams bound, undeclared %v; want 1 and the node", n, s.Undeclared())
	}
	s.callbacks().OnDeltaStreamClosed(second.id, nil)
	if n := s.boundStreams(peer.String()); n != 0 || len(s.nodes) != 0 || s.Version(peer.String()) != "" {
		t.Errorf("after both closed: %d streams bound, %d nodes held, version %q; want nothing held", n, len(s.nodes), s.Version(peer.String()))
	}
}

// TestRequestsKeepNoCopies: go-control-plane keeps each stream's latest
// request of every type, and the first request's node, for as long as the
// stream lives. What in them the server already holds (the type URL it
// serves, the nonce and version of its last response, the peer's ID) is
// made to point at the server's copy, so ten thousand streams do not each
// keep their own.
func TestRequestsKeepNoCopies(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(ctx, Options{})
	s.Update(decls(t, a))
	id := "spiffe://mesh.test/a"
	cb := s.callbacks()
	same := func(what, got, held string) {
		t.Helper()
		if got != held || unsafe.StringData(got) != unsafe.StringData(held) {
			t.Errorf("%s %q: the request keeps its own copy of the server's %q", what, got, held)
		}
	}
	for _, delta := range []bool{false, true} {
		key := streamKey{delta: delta, id: 1}
		s.streams[key] = &streamState{from: peerKey{id: strings.Clone(id), addr: "192.0.2.1"}}
		node := &core.Node{Id: strings.Clone(id)}
		first := &discovery.DiscoveryRequest{Node: node, TypeUrl: strings.Clone(resource.ListenerType)}
		firstDelta := &discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: strings.Clone(resource.ListenerType)}
		var err error
		if delta {
			err = cb.OnStreamDeltaRequest(key.id, firstDelta)
		} else {
			err = cb.OnStreamRequest(key.id, first)
		}
		if err != nil {
			t.Fatal(err)
		}
		same("node ID", node.GetId(), s.streams[key].from.id)
		version := s.Version(id)
		if delta {
			cb.OnStreamDeltaResponse(key.id, firstDelta, &discovery.DeltaDiscoveryResponse{TypeUrl: resource.ListenerType, Nonce: "7", SystemVersionInfo: version})
			ack := &discovery.DeltaDiscoveryRequest{TypeUrl: strings.Clone(resource.ListenerType), ResponseNonce: strings.Clone("7")}
			if err := cb.OnStreamDeltaRequest(key.id, ack); err != nil {
				t.Fatal(err)
			}
			same("type URL", ack.GetTypeUrl(), servedTypeURLs[typeIndex(resource.ListenerType)])
			same("nonce", ack.GetResponseNonce(), s.streams[key].types[typeIndex(resource.ListenerType)].nonce)
		} else {
			cb.OnStreamResponse(ctx, key.id, first, &discovery.DiscoveryResponse{TypeUrl: resource.ListenerType, Nonce: "7", VersionInfo: version})
			ack := &discovery.DiscoveryRequest{Node: node, TypeUrl: strings.Clone(resource.ListenerType), ResponseNonce: strings.Clone("7"), VersionInfo: strings.Clone(version)}
			if err := cb.OnStreamRequest(key.id, ack); err != nil {
				t.Fatal(err)
			}
			same("type URL", ack.GetTypeUrl(), servedTypeURLs[typeIndex(resource.ListenerType)])
			same("nonce", ack.GetResponseNonce(), s.streams[key].types[typeIndex(resource.ListenerType)].nonce)
			same("version", ack.GetVersionInfo(), s.streams[key].types[typeIndex(resource.ListenerType)].version)
			if acks := s.Acks(); len(acks) != 1 || acks[0].Acked != 1 {
				t.Errorf("the acknowledgement was not recorded: %+v", acks)
			}
		}
	}
}

// TestSubscriptionBudget: a delta stream's subscriptions are counted once
// per type and name, given back when unsubscribed, and refused past
// maxSubscriptionBytes; a stream that subscribes to nothing holds nothing.
func TestSubscriptionBudget(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(ctx, Options{})
	key := streamKey{delta: true, id: 1}
	s.streams[key] = &streamState{from: peerKey{id: "spiffe://mesh.test/a"}}
	sub := func(typeURL string, add, drop []string) error {
		return s.checkSubscription(key, &discovery.DeltaDiscoveryRequest{TypeUrl: typeURL, ResourceNamesSubscribe: add, ResourceNamesUnsubscribe: drop})
	}
	if err := sub(resource.ClusterType, nil, nil); err != nil || s.streams[key].subscribed != nil {
		t.Fatalf("a request naming nothing: %v, mirror %v", err, s.streams[key].subscribed)
	}
	half := strings.Repeat("n", maxSubscriptionBytes/2)
	for range 2 { // the same name again costs nothing
		if err := sub(resource.EndpointType, []string{half}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.streams[key].subscribedSize; got != len(half) {
		t.Errorf("%d bytes counted, want %d", got, len(half))
	}
	// The same name of another type is another subscription; it fits, once.
	if err := sub(resource.ListenerType, []string{half}, nil); err != nil {
		t.Fatal(err)
	}
	if err := sub(resource.ClusterType, []string{"x"}, nil); err == nil {
		t.Fatal("a subscription past the budget was accepted")
	}
	s.streams[key] = &streamState{from: peerKey{id: "spiffe://mesh.test/a"}}
	if err := sub(resource.EndpointType, []string{half, "a"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := sub(resource.EndpointType, []string{"b"}, []string{half, "never-subscribed"}); err != nil {
		t.Fatal(err)
	}
	if got := s.streams[key].subscribedSize; got != 2 {
		t.Errorf("after unsubscribing: %d bytes counted, want 2", got)
	}
	if err := sub(resource.ListenerType, []string{half, strings.Repeat("m", maxSubscriptionBytes/2-2)}, nil); err != nil {
		t.Errorf("the budget given back was not reusable: %v", err)
	}
}

// TestStreamsShareThePeersStrings: a stream names its peer with the strings
// of the server's record of the peer (its connection's), over a real mTLS
// connection, instead of copies of its own.
func TestStreamsShareThePeersStrings(t *testing.T) {
	cp := startLiveCP(t, Options{})
	c := cp.dial(t, idA, "127.0.0.1")
	openBound(t, c, idA)
	openBound(t, c, idA)
	cp.s.mu.Lock()
	defer cp.s.mu.Unlock()
	if len(cp.s.streams) != 2 {
		t.Fatalf("%d streams, want 2", len(cp.s.streams))
	}
	for _, st := range cp.s.streams {
		u := cp.s.peers[st.from]
		if u == nil || u.conns != 1 || u.streams != 2 {
			t.Fatalf("the peer's record: %+v", u)
		}
		if unsafe.StringData(st.from.id) != unsafe.StringData(u.key.id) || unsafe.StringData(st.from.addr) != unsafe.StringData(u.key.addr) {
			t.Errorf("stream of %s keeps its own copy of the peer's ID or address", st.from)
		}
	}
}
