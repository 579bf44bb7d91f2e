package policy_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/translate"
)

var fuzzTD = spiffeid.RequireTrustDomainFromString("mesh.test")

const fuzzGoodDecl = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: svc, namespace: shop}
spec:
  spiffeID: spiffe://mesh.test/ns/shop/sa/svc
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      idleTimeout: 90s
      proxyProtocol: v2
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - trustDomain: mesh.test
        - pathPrefix: spiffe://mesh.test/ns/ops
  outbound:
    - port: 9001
      endpoints: ["127.0.0.2:8443", "[::1]:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
    - port: 9002
      target: db.local:8443
      serverID: spiffe://mesh.test/ns/shop/sa/db
`

// FuzzDeclarationToProxy follows a declaration down the whole pipeline: a
// ServicePolicy that policy.Parse accepts must translate into resources the
// sidecar's xDS validation accepts, and those must build a proxy.Config that
// passes proxy's Validate with the same listeners. A declaration accepted at
// the top and refused at the bottom would be NACKed by every sidecar it
// reaches (and, being one file, take down nothing else, but serve nothing).
// A refusal carries a file and a line.
func FuzzDeclarationToProxy(f *testing.F) {
	f.Add([]byte(fuzzGoodDecl))
	f.Add([]byte(fuzzGoodDecl + "---\n" + strings.ReplaceAll(fuzzGoodDecl, "sa/svc", "sa/other")))
	for _, hostile := range []string{
		"spec:\n  spiffeID: spiffe://other.test/x\n",
		strings.Replace(fuzzGoodDecl, "- trustDomain: mesh.test", "- trustDomain: other.test", 1),
		strings.Replace(fuzzGoodDecl, "pathPrefix: spiffe://mesh.test/ns/ops", "pathPrefix: spiffe://mesh.test", 1),
		strings.Replace(fuzzGoodDecl, "port: 9002", "port: 8443", 1),
		strings.Replace(fuzzGoodDecl, "port: 9001", "port: 0", 1),
		strings.Replace(fuzzGoodDecl, "127.0.0.1:8080", "0.0.0.0:8080", 1),
		strings.Replace(fuzzGoodDecl, "idleTimeout: 90s", "idleTimeout: -1s", 1),
		strings.Replace(fuzzGoodDecl, "proxyProtocol: v2", "proxyProtocol: v1", 1),
		strings.Replace(fuzzGoodDecl, "      proxyProtocol: v2\n", "      federatesWith: [partner.test]\n", 1) + "    - port: 9003\n      target: pay.partner.test:443\n      serverID: spiffe://partner.test/pay\n      federatesWith: [partner.test]\n",
		strings.Replace(fuzzGoodDecl, "- trustDomain: mesh.test", "- trustDomain: partner.test", 1),
		strings.Replace(fuzzGoodDecl, "      proxyProtocol: v2\n", "", 1),
		strings.Replace(fuzzGoodDecl, "idleTimeout: 90s", "idleTimeout: 0s", 1),
		strings.Replace(fuzzGoodDecl, "serverID: spiffe://mesh.test/ns/shop/sa/db", "serverID: spiffe://mesh.test", 1),
		strings.Replace(fuzzGoodDecl, "target: db.local:8443", "target: \"db local:8443\"", 1),
		strings.Replace(fuzzGoodDecl, "kind: ServicePolicy", "kind: ServicePolicy\nextra: 1", 1),
		"kind: [\n",
		"apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: &m {name: x}\nspec: *m\n",
		"a: &a [*a, *a, *a]\nb: &b [*a, *a, *a]\n",
		"\t\x00",
	} {
		f.Add([]byte(hostile))
	}
	opts := policy.Options{TrustDomains: []spiffeid.TrustDomain{fuzzTD}}
	f.Fuzz(func(t *testing.T, data []byte) {
		decls, err := policy.Parse("fuzz.yaml", data, opts)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			fe, ok := errors.AsType[*policy.FileError](err)
			if !ok || len(fe.Errors) == 0 {
				t.Fatalf("error %T without location: %v", err, err)
			}
			for _, e := range fe.Errors {
				if e.Line < 1 || e.Reason == "" {
					t.Fatalf("refusal without a line or a reason: %q", e.Error())
				}
			}
			return
		}
		for _, d := range decls {
			if d.ID.TrustDomain() != fuzzTD {
				t.Fatalf("declaration for %s outside the configured trust domain", d.ID)
			}
			res := translate.Translate(d, translate.Options{})
			// The widest sidecar: the control plane cannot know whether a
			// sidecar takes apps off loopback (--allow-non-loopback-app).
			v := client.Validator{NodeID: d.ID, Profile: identity.Modern(), AllowNonLoopbackApp: true}
			cfg, err := buildResources(v, res)
			if err != nil {
				t.Fatalf("declaration accepted but its resources are refused by the sidecar: %v\n%s", err, data)
			}
			if err := cfg.Validate(); err != nil {
				t.Fatalf("declaration accepted but the proxy config is invalid: %v\n%s", err, data)
			}
			if len(cfg.Inbound) != len(d.Inbound) || len(cfg.Outbound) != len(d.Outbound) {
				t.Fatalf("config has %d/%d listeners, declaration %d/%d", len(cfg.Inbound), len(cfg.Outbound), len(d.Inbound), len(d.Outbound))
			}
			pp := map[string]bool{}
			for _, in := range d.Inbound {
				pp[translate.InboundName(in.Port)] = in.ProxyProtocol
			}
			for _, in := range cfg.Inbound {
				if in.ProxyProtocol != pp[in.Name] {
					t.Fatalf("listener %s: proxyProtocol %v in the sidecar's config, %v in the declaration", in.Name, in.ProxyProtocol, pp[in.Name])
				}
				for _, r := range in.Allow.Rules() {
					if r.TrustDomain() != fuzzTD && !slices.Contains(in.FederatesWith, r.TrustDomain()) {
						t.Fatalf("allow rule %s outside the trust domain", r)
					}
				}
			}
		}
	})
}

// buildResources runs translated resources through the sidecar's validation,
// as the ADS client does: each resource on its own, then the set.
func buildResources(v client.Validator, r translate.Resources) (*proxy.Config, error) {
	set := client.Set{Listeners: map[string]client.Listener{}, Clusters: map[string]client.Cluster{}, Endpoints: map[string]client.Endpoints{}}
	for _, l := range r.Listeners {
		vl, err := v.Listener(mustAny(l))
		if err != nil {
			return nil, err
		}
		set.Listeners[vl.Name] = vl
	}
	for _, c := range r.Clusters {
		vc, err := v.Cluster(mustAny(c))
		if err != nil {
			return nil, err
		}
		set.Clusters[vc.Name] = vc
	}
	for _, e := range r.Endpoints {
		ve, err := v.Endpoints(mustAny(e))
		if err != nil {
			return nil, err
		}
		set.Endpoints[ve.Name] = ve
	}
	return v.Build(set, "fuzz")
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}
