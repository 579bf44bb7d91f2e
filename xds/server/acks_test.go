package server

import (
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
)

// TestStateOfTheWorldAcksAndNACKs follows one state-of-the-world stream's
// answers at the control plane: a node counts as having applied its version
// once every type sent was acknowledged at that version, and not before; a
// refused update is held (not sent again at once, which the snapshot cache
// would do forever, since the refusal names the older version the sidecar
// kept) until the next change; acknowledgements of an earlier response of a
// type do not count for the later one.
func TestStateOfTheWorldAcksAndNACKs(t *testing.T) {
	cp := startLiveCP(t, Options{})
	st := openADS(t, cp.dial(t, idA, ""))
	responses := make(chan *discovery.DiscoveryResponse, 16)
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				close(responses)
				return
			}
			responses <- r
		}
	}()
	send := func(r *discovery.DiscoveryRequest) {
		t.Helper()
		if err := st.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	next := func(typeURL string) *discovery.DiscoveryResponse {
		t.Helper()
		select {
		case r, ok := <-responses:
			if !ok {
				t.Fatal("the stream ended")
			}
			if r.GetTypeUrl() != typeURL {
				t.Fatalf("got a response of %s, want %s", r.GetTypeUrl(), typeURL)
			}
			return r
		case <-time.After(10 * time.Second):
			t.Fatalf("no response of %s", typeURL)
		}
		return nil
	}
	ack := func(r *discovery.DiscoveryResponse) {
		t.Helper()
		send(&discovery.DiscoveryRequest{TypeUrl: r.GetTypeUrl(), VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()})
	}
	acks := func() NodeAcks {
		for _, na := range cp.s.Acks() {
			if na.Node == idA {
				return na
			}
		}
		return NodeAcks{}
	}
	wantAcks := func(what string, acked, nacked int) {
		t.Helper()
		waitFor(t, what, func() bool { na := acks(); return na.Connected == 1 && na.Acked == acked && na.NACKed == nacked })
	}

	send(&discovery.DiscoveryRequest{Node: &core.Node{Id: idA}, TypeUrl: resource.ClusterType})
	clusters := next(resource.ClusterType)
	v1 := clusters.GetVersionInfo()
	if v1 == "" || v1 != cp.s.Version(idA) {
		t.Fatalf("clusters at version %q, the node's is %q", v1, cp.s.Version(idA))
	}
	wantAcks("clusters sent, not acknowledged", 0, 0)
	ack(clusters)
	wantAcks("clusters acknowledged", 1, 0)
	send(&discovery.DiscoveryRequest{TypeUrl: resource.ListenerType})
	listeners := next(resource.ListenerType)
	wantAcks("listeners sent, not acknowledged", 0, 0)
	ack(listeners)
	wantAcks("every type acknowledged", 1, 0)

	// A change: both types are sent again. The clusters are refused.
	cp.s.Update(decls(t, strings.Replace(a, "127.0.0.1:1", "127.0.0.1:2", 1)+"---\n"+b))
	v2 := cp.s.Version(idA)
	if v2 == v1 {
		t.Fatal("the change did not change a's version")
	}
	clusters2 := next(resource.ClusterType)
	listeners2 := next(resource.ListenerType)
	if clusters2.GetVersionInfo() != v2 || listeners2.GetVersionInfo() != v2 {
		t.Fatalf("sent versions %q and %q, want %q", clusters2.GetVersionInfo(), listeners2.GetVersionInfo(), v2)
	}
	// An acknowledgement naming the first response of a type is not one of
	// the second.
	ack(listeners)
	wantAcks("an old response acknowledged", 0, 0)
	send(&discovery.DiscoveryRequest{TypeUrl: resource.ClusterType, VersionInfo: v1, ResponseNonce: clusters2.GetNonce(),
		ErrorDetail: &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: "cluster refused"}})
	ack(listeners2)
	wantAcks("the clusters refused", 0, 1)
	if n := cp.s.LastNACK(idA); n != "cluster refused" {
		t.Fatalf("LastNACK %q", n)
	}
	select {
	case r := <-responses:
		t.Fatalf("the refused update came again (%s version %s), or something else did", r.GetTypeUrl(), r.GetVersionInfo())
	case <-time.After(time.Second):
	}

	// The next change is sent; acknowledged, the refusal is forgotten.
	cp.s.Update(decls(t, strings.Replace(a, "127.0.0.1:1", "127.0.0.1:3", 1)+"---\n"+b))
	clusters3, listeners3 := next(resource.ClusterType), next(resource.ListenerType)
	ack(clusters3)
	ack(listeners3)
	wantAcks("the next change acknowledged", 1, 0)
	if n := cp.s.LastNACK(idA); n != "" {
		t.Fatalf("LastNACK %q after the acknowledgement", n)
	}
	if na := acks(); na.Version != cp.s.Version(idA) || na.Version == v2 {
		t.Fatalf("acks at version %q, the node's is %q", na.Version, cp.s.Version(idA))
	}
}
