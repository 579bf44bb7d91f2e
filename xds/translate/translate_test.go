package translate

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

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
      idleTimeout: 5m
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

// TestEnvoyValid: every resource passes Envoy's own proto constraints
// (protoc-gen-validate), so Envoy would accept what latch's sidecars get.
func TestEnvoyValid(t *testing.T) {
	type validator interface{ ValidateAll() error }
	for _, tc := range cases {
		r := Translate(decl(t, head+tc.spec), Options{})
		var all []validator
		for _, l := range r.Listeners {
			all = append(all, l)
		}
		for _, c := range r.Clusters {
			all = append(all, c)
		}
		for _, e := range r.Endpoints {
			all = append(all, e)
		}
		for _, v := range all {
			if err := v.ValidateAll(); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
	}
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
