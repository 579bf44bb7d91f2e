package client

import (
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/xds/translate"
)

// scriptedCP is a delta ADS server whose responses a test writes one by
// one, hostile ones included, and which reports every request the client
// sends.
type scriptedCP struct {
	addr     string
	nonce    int
	send     chan *discovery.DeltaDiscoveryResponse
	requests chan *discovery.DeltaDiscoveryRequest
}

type scriptedADS struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	cp *scriptedCP
}

func (s scriptedADS) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	go func() {
		for {
			req, err := st.Recv()
			if err != nil {
				return
			}
			select {
			case s.cp.requests <- req:
			case <-st.Context().Done():
				return
			}
		}
	}()
	for {
		select {
		case resp := <-s.cp.send:
			if err := st.Send(resp); err != nil {
				return err
			}
		case <-st.Context().Done():
			return nil
		}
	}
}

func startScriptedCP(t *testing.T, ca *identitytest.CA, cpID spiffeid.ID) *scriptedCP {
	t.Helper()
	cp := &scriptedCP{send: make(chan *discovery.DeltaDiscoveryResponse), requests: make(chan *discovery.DeltaDiscoveryRequest, 100)}
	tlsc := identity.NewTLS(ca.Source(t, cpID.String())).ServerConfig(identity.Modern(), func(spiffeid.ID) error { return nil })
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsc)))
	discovery.RegisterAggregatedDiscoveryServiceServer(g, scriptedADS{cp: cp})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	t.Cleanup(func() { g.Stop(); wg.Wait() })
	cp.addr = lis.Addr().String()
	return cp
}

// respond sends a response and returns the client's answer to it: its ACK
// or NACK (nil error detail: ACK), skipping subscription changes.
func (cp *scriptedCP) respond(t *testing.T, resp *discovery.DeltaDiscoveryResponse) *discovery.DeltaDiscoveryRequest {
	t.Helper()
	cp.nonce++
	resp.Nonce = strconv.Itoa(cp.nonce)
	cp.send <- resp
	deadline := time.After(10 * time.Second)
	for {
		select {
		case req := <-cp.requests:
			if req.GetResponseNonce() == resp.GetNonce() {
				return req
			}
		case <-deadline:
			t.Fatalf("no answer to the %s response", shortType(resp.GetTypeUrl()))
		}
	}
}

func resourcesOf(t *testing.T, typ string, r translate.Resources, version string) []*discovery.Resource {
	t.Helper()
	var out []*discovery.Resource
	add := func(name string, m proto.Message) {
		out = append(out, &discovery.Resource{Name: name, Version: version + "/" + name, Resource: mustAny(m)})
	}
	switch typ {
	case ListenerType:
		for _, l := range r.Listeners {
			add(l.Name, l)
		}
	case ClusterType:
		for _, c := range r.Clusters {
			add(c.Name, c)
		}
	case EndpointType:
		for _, e := range r.Endpoints {
			add(e.ClusterName, e)
		}
	}
	return out
}

// TestDeltaHostileResponses: delta responses a control plane could get
// wrong or forge — a resource named otherwise than its content, one name
// twice, a resource without a body — are refused whole, naming the
// resource; removals of names never sent and responses of types not asked
// for change nothing; and a fix that sends only part of a refused update
// applies the whole of what the control plane meant, never a mix with what
// ran before.
func TestDeltaHostileResponses(t *testing.T) {
	ca := identitytest.NewCA(t, "mesh.test")
	cpID := spiffeid.RequireFromString("spiffe://mesh.test/other-control-plane")
	cp := startScriptedCP(t, ca, cpID)
	c, applied := startClient(t, ca, cp.addr, cpID, Incremental)
	good := goodResources(t)

	// The first state, in order: clusters, endpoints, listeners.
	for _, typ := range []string{ClusterType, EndpointType, ListenerType} {
		if ack := cp.respond(t, &discovery.DeltaDiscoveryResponse{TypeUrl: typ, SystemVersionInfo: "v1", Resources: resourcesOf(t, typ, good, "v1")}); ack.GetErrorDetail() != nil {
			t.Fatalf("first %s refused: %s", shortType(typ), ack.GetErrorDetail().GetMessage())
		}
	}
	first := nextConfig(t, applied)
	if first.Version != "v1" || len(first.Inbound) != 1 || len(first.Outbound) == 0 {
		t.Fatalf("first config: %+v", first)
	}

	// restore sends the good resources of typ named again, as a control
	// plane would with its next change, and removes names good lacks.
	restore := func(typ string, names []string) {
		t.Helper()
		back := &discovery.DeltaDiscoveryResponse{TypeUrl: typ, SystemVersionInfo: "v1"}
		byName := map[string]*discovery.Resource{}
		for _, r := range resourcesOf(t, typ, good, "v1") {
			byName[r.GetName()] = r
		}
		for _, n := range slices.Compact(slices.Sorted(slices.Values(names))) {
			if r, ok := byName[n]; ok {
				back.Resources = append(back.Resources, r)
			} else {
				back.RemovedResources = append(back.RemovedResources, n)
			}
		}
		if ack := cp.respond(t, back); ack.GetErrorDetail() != nil {
			t.Fatalf("putting the good %s back refused: %s", shortType(typ), ack.GetErrorDetail().GetMessage())
		}
	}
	inbound := listenerNamed(good, in)
	for _, tc := range []struct {
		name string
		resp *discovery.DeltaDiscoveryResponse
		want string // in the NACK
	}{
		{"resource named otherwise than its content", &discovery.DeltaDiscoveryResponse{TypeUrl: ListenerType, SystemVersionInfo: "v2",
			Resources: []*discovery.Resource{{Name: "outbound|9001", Version: "x", Resource: mustAny(inbound)}}},
			`listener "outbound|9001": name: the resource is named "inbound|8443"`},
		{"one name twice", &discovery.DeltaDiscoveryResponse{TypeUrl: ListenerType, SystemVersionInfo: "v2",
			Resources: []*discovery.Resource{{Name: in, Version: "a", Resource: mustAny(inbound)}, {Name: in, Version: "b", Resource: mustAny(inbound)}}},
			`listener "inbound|8443": sent twice`},
		{"resource without a body", &discovery.DeltaDiscoveryResponse{TypeUrl: ClusterType, SystemVersionInfo: "v2",
			Resources: []*discovery.Resource{{Name: app, Version: "x"}}},
			`cluster "": missing`},
	} {
		ack := cp.respond(t, tc.resp)
		if got := ack.GetErrorDetail().GetMessage(); !strings.Contains(got, tc.want) {
			t.Errorf("%s: answer %q, want a NACK naming %q", tc.name, got, tc.want)
		}
		var names []string
		for _, r := range tc.resp.GetResources() {
			names = append(names, r.GetName())
		}
		restore(tc.resp.GetTypeUrl(), names)
	}

	// A removal of a name never sent, and a type not asked for: nothing
	// changes, both are acknowledged or ignored.
	if ack := cp.respond(t, &discovery.DeltaDiscoveryResponse{TypeUrl: ListenerType, SystemVersionInfo: "v1", RemovedResources: []string{"never-sent"}}); ack.GetErrorDetail() != nil {
		t.Errorf("removal of a name never sent refused: %s", ack.GetErrorDetail().GetMessage())
	}
	cp.send <- &discovery.DeltaDiscoveryResponse{TypeUrl: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", Nonce: "route"}
	select {
	case cfg := <-applied:
		t.Fatalf("applied after hostile responses: %+v", cfg)
	case <-time.After(100 * time.Millisecond):
	}

	// A refused update, then a fix of only part of it: the refused cluster
	// stays in the control plane's view, so a listener change alone is
	// refused too, naming it; once the cluster is fixed, the whole — new
	// listener, fixed cluster — applies.
	bad := goodResources(t)
	editUpstream(clusterNamed(bad, out), func(u *tlsv3.UpstreamTlsContext) {
		u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].SanType = tlsv3.SubjectAltNameMatcher_DNS
	})
	if ack := cp.respond(t, &discovery.DeltaDiscoveryResponse{TypeUrl: ClusterType, SystemVersionInfo: "v3", Resources: resourcesOf(t, ClusterType, translate.Resources{Clusters: []*cluster.Cluster{clusterNamed(bad, out)}}, "v3")}); !strings.Contains(ack.GetErrorDetail().GetMessage(), `cluster "outbound|9001"`) {
		t.Fatalf("a server SAN of DNS type: answer %q", ack.GetErrorDetail().GetMessage())
	}
	next := goodResources(t)
	l := listenerNamed(next, in)
	l.Address.GetSocketAddress().PortSpecifier = &core.SocketAddress_PortValue{PortValue: 8444}
	if ack := cp.respond(t, &discovery.DeltaDiscoveryResponse{TypeUrl: ListenerType, SystemVersionInfo: "v4", Resources: resourcesOf(t, ListenerType, translate.Resources{Listeners: []*listener.Listener{l}}, "v4")}); !strings.Contains(ack.GetErrorDetail().GetMessage(), `cluster "outbound|9001"`) {
		t.Fatalf("a listener change while the refused cluster is held: answer %q, want the cluster's refusal", ack.GetErrorDetail().GetMessage())
	}
	select {
	case cfg := <-applied:
		t.Fatalf("applied a mix of the refused update and the running config: %+v", cfg)
	case <-time.After(50 * time.Millisecond):
	}
	if ack := cp.respond(t, &discovery.DeltaDiscoveryResponse{TypeUrl: ClusterType, SystemVersionInfo: "v5", Resources: resourcesOf(t, ClusterType, translate.Resources{Clusters: []*cluster.Cluster{clusterNamed(good, out)}}, "v5")}); ack.GetErrorDetail() != nil {
		t.Fatalf("the fix refused: %s", ack.GetErrorDetail().GetMessage())
	}
	cfg := nextConfig(t, applied)
	if cfg.Inbound[0].Listen != ":8444" || cfg.Version != "v5" {
		t.Fatalf("after the fix: version %s, inbound %+v", cfg.Version, cfg.Inbound)
	}
	// The status follows the apply, which the config above came from.
	for deadline := time.Now().Add(10 * time.Second); c.Status().AppliedVersion != "v5" && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if st := c.Status(); st.AppliedVersion != "v5" || st.Protocol != "delta" || st.LastError != "" {
		t.Errorf("status %+v", st)
	}
}
