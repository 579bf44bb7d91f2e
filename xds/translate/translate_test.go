package translate

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"latch.dev/latch/xds/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var opts = policy.Options{TrustDomains: []spiffeid.TrustDomain{
	spiffeid.RequireTrustDomainFromString("mesh.test"),
	spiffeid.RequireTrustDomainFromString("partner.test"),
}}

func decl(t *testing.T, src string) policy.Declaration {
	t.Helper()
	ds, err := policy.Parse("test.yaml", []byte(src), opts)
	if err != nil {
		t.Fatal(err)
	}
	return ds[0]
}

const head = "apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: svc}\nspec:\n  spiffeID: spiffe://mesh.test/ns/shop/sa/svc\n"

var cases = []struct{ name, spec string }{
	{"inbound_all_rule_kinds", `  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      idleTimeout: 90s
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - trustDomain: partner.test
        - pathPrefix: spiffe://mesh.test/ns/ops
`},
	{"inbound_proxy_protocol", `  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      proxyProtocol: v2
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
`},
	{"inbound_deny_all", `  inbound:
    - port: 8443
      appAddress: localhost:8080
`},
	{"outbound_eds_and_dns", `  outbound:
    - port: 9001
      endpoints: ["10.0.0.2:8443", "10.0.0.1:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
    - port: 9002
      target: pay.partner.svc:443
      serverID: spiffe://partner.test/pay
      federatesWith: [partner.test]
      idleTimeout: 5m
`},
	{"inbound_federated", `  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      federatesWith: [partner.test, third.test]
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - pathPrefix: spiffe://third.test/ns/billing
        - trustDomain: partner.test
`},
	{"empty", ""},
}

// TestGolden pins the exact resources: a change in what the control plane
// emits is a change in the xDS contract and shows up in review.
func TestGolden(t *testing.T) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := Translate(decl(t, head+tc.spec), Options{})
			got := render(t, r)
			path := filepath.Join("testdata", tc.name+".json")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the translation; if intended, run go test ./xds/translate -update\ngot:\n%s", path, got)
			}
		})
	}
}

func TestPureAndHashStable(t *testing.T) {
	d := decl(t, head+cases[0].spec)
	a, b := Translate(d, Options{}), Translate(d, Options{})
	if a.Hash() != b.Hash() {
		t.Fatal("same declaration, different hashes")
	}
	d2 := decl(t, head+cases[0].spec+"        - id: spiffe://mesh.test/extra\n")
	if Translate(d2, Options{}).Hash() == a.Hash() {
		t.Fatal("allow-list change did not change the hash")
	}
}

// render writes resources as indented protojson. protojson's own spacing is
// deliberately unstable, so it is normalised through encoding/json.
func render(t *testing.T, r Resources) []byte {
	t.Helper()
	var doc struct {
		Listeners []json.RawMessage `json:"listeners"`
		Clusters  []json.RawMessage `json:"clusters"`
		Endpoints []json.RawMessage `json:"endpoints"`
	}
	m := func(p proto.Message) json.RawMessage {
		b, err := protojson.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, l := range r.Listeners {
		doc.Listeners = append(doc.Listeners, m(l))
	}
	for _, c := range r.Clusters {
		doc.Clusters = append(doc.Clusters, m(c))
	}
	for _, e := range r.Endpoints {
		doc.Endpoints = append(doc.Endpoints, m(e))
	}
	raw, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, raw, "", "  "); err != nil {
		t.Fatal(err)
	}
	out.WriteByte('\n')
	return out.Bytes()
}

// shapes are declarations of every shape the decoder accepts, beyond the
// golden cases: each rule kind alone and together, several ports, host names
// and IPv6 literals for the app and upstreams, one endpoint and as many as a
// declaration may list, idle timeouts on both sides.
var shapes = []struct{ name, spec string }{
	{"inbound_id_only", `  inbound:
    - port: 1
      appAddress: 127.0.0.1:2
      allow: [{id: spiffe://mesh.test/a}]
`},
	{"inbound_trust_domain_only", `  inbound:
    - port: 65535
      appAddress: "[::1]:65534"
      allow: [{trustDomain: mesh.test}]
`},
	{"inbound_path_prefix_only", `  inbound:
    - port: 8443
      appAddress: app.shop.svc.cluster.local:8080
      allow: [{pathPrefix: spiffe://mesh.test/ns/shop}]
`},
	{"many_ports_both_ways", `  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      allow: [{id: spiffe://mesh.test/ns/shop/sa/frontend}, {trustDomain: partner.test}]
    - port: 9443
      appAddress: 127.0.0.1:9090
      idleTimeout: 1s
  outbound:
    - port: 9001
      endpoints: ["10.0.0.1:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
      idleTimeout: 1h
    - port: 9002
      endpoints: ["[fd00::1]:8443", "[fd00::2]:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/cache
    - port: 9003
      target: "[fd00::3]:443"
      serverID: spiffe://partner.test/pay
      federatesWith: [partner.test]
    - port: 9004
      endpoints: ["db-0.db:5432", "db-1.db:5432"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
`},
	{"outbound_only", `  outbound:
    - port: 15100
      target: 127.0.0.1:9
      serverID: spiffe://mesh.test/ns/shop/sa/db
`},
	{"outbound_many_endpoints", "  outbound:\n    - port: 9001\n      serverID: spiffe://mesh.test/ns/shop/sa/db\n      endpoints:\n" + manyEndpoints(32)},
}

func manyEndpoints(n int) string {
	var sb strings.Builder
	for i := range n {
		fmt.Fprintf(&sb, "        - 10.0.%d.%d:8443\n", i/250, i%250+1)
	}
	return sb.String()
}

// TestEnvoyValid: every resource the translator emits, for every declaration
// shape and inbound host, passes Envoy's own constraints (protoc-gen-validate,
// as go-control-plane generates them), and so does every typed config inside
// them (filters, transport sockets), which ValidateAll on the resource does
// not look into. Envoy would accept what latch's sidecars get.
func TestEnvoyValid(t *testing.T) {
	all := append(slices.Clone(cases), shapes...)
	for _, tc := range all {
		for _, host := range []string{"", "127.0.0.1", "::1", "0.0.0.0"} {
			r := Translate(decl(t, head+tc.spec), Options{InboundHost: host})
			var msgs []proto.Message
			for _, l := range r.Listeners {
				msgs = append(msgs, l)
			}
			for _, c := range r.Clusters {
				msgs = append(msgs, c)
			}
			for _, e := range r.Endpoints {
				msgs = append(msgs, e)
			}
			if tc.spec != "" && len(msgs) == 0 {
				t.Fatalf("%s: no resources", tc.name)
			}
			for _, m := range msgs {
				for _, err := range envoyErrors(t, m) {
					t.Errorf("%s (inbound host %q): %s", tc.name, host, err)
				}
			}
		}
	}
}

// TestEnvoyValidCatches: the check above can fail: a resource breaking one of
// Envoy's rules at the top and one inside a typed config are both reported.
func TestEnvoyValidCatches(t *testing.T) {
	r := Translate(decl(t, head+cases[0].spec), Options{})
	l := r.Listeners[0]
	l.FilterChains[0].Filters[1] = filter(TCPProxyFilter, &tcpproxy.TcpProxy{ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: "x"}}) // no stat_prefix
	if errs := envoyErrors(t, l); len(errs) != 1 || !strings.Contains(errs[0], "StatPrefix") {
		t.Errorf("typed config without stat_prefix: %q", errs)
	}
	r.Clusters[0].ConnectTimeout = durationpb.New(0)
	if errs := envoyErrors(t, r.Clusters[0]); len(errs) != 1 || !strings.Contains(errs[0], "ConnectTimeout") {
		t.Errorf("cluster with a zero connect timeout: %q", errs)
	}
}

// envoyErrors runs ValidateAll on m and on every typed config (Any) inside
// it, unpacked, recursively.
func envoyErrors(t *testing.T, m proto.Message) []string {
	t.Helper()
	var out []string
	if v, ok := m.(interface{ ValidateAll() error }); !ok {
		t.Fatalf("%T has no ValidateAll", m)
	} else if err := v.ValidateAll(); err != nil {
		out = append(out, fmt.Sprintf("%T: %v", m, err))
	}
	var walk func(r protoreflect.Message)
	walk = func(r protoreflect.Message) {
		if a, ok := r.Interface().(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
			if err != nil {
				out = append(out, fmt.Sprintf("typed config %s: %v", a.GetTypeUrl(), err))
				return
			}
			out = append(out, envoyErrors(t, inner)...)
			return
		}
		r.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			switch {
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool { walk(mv.Message()); return true })
			case fd.IsList() && fd.Message() != nil:
				for i := range v.List().Len() {
					walk(v.List().Get(i).Message())
				}
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(v.Message())
			}
			return true
		})
	}
	walk(m.ProtoReflect())
	return out
}

// TestInboundHost: the default inbound address is every address of the pod
// in Envoy's spelling ("::" with ipv4_compat); any other host is passed on as
// given, without ipv4_compat.
func TestInboundHost(t *testing.T) {
	d := decl(t, head+cases[0].spec)
	for _, tc := range []struct {
		host, want string
		compat     bool
	}{
		{"", "::", true},
		{"::", "::", true},
		{"0.0.0.0", "0.0.0.0", false},
		{"127.0.0.1", "127.0.0.1", false},
		{"::1", "::1", false},
	} {
		sa := Translate(d, Options{InboundHost: tc.host}).Listeners[0].GetAddress().GetSocketAddress()
		if sa.GetAddress() != tc.want || sa.GetIpv4Compat() != tc.compat {
			t.Errorf("InboundHost %q: address %q ipv4_compat %v, want %q %v", tc.host, sa.GetAddress(), sa.GetIpv4Compat(), tc.want, tc.compat)
		}
	}
}
