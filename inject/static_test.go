package inject_test

import (
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/inject"
	"latch.dev/latch/proxy"
)

// TestStaticConfigRefusesWhatTheSidecarRefuses: StaticConfig runs the file it
// renders through the sidecar's own parser, so a Spec that slipped past
// ParseSpec (these are built by hand; ParseSpec refuses them) still never
// reaches a pod. Mutate refuses the pod with this error.
func TestStaticConfigRefusesWhatTheSidecarRefuses(t *testing.T) {
	backend := spiffeid.RequireFromString("spiffe://mesh.test/ns/a/sa/backend")
	allow := []identity.Rule{identity.AllowTrustDomain(backend.TrustDomain())}
	tests := []struct {
		name string
		spec inject.Spec
		want []string
	}{
		{"target host with a space", inject.Spec{Outbound: []inject.OutboundPort{{Port: 15001, Target: "back end:8443", ServerID: backend}}},
			[]string{"outbound[0].upstreams[0]", `"back end"`}},
		{"target host with a slash", inject.Spec{Outbound: []inject.OutboundPort{{Port: 15001, Target: "a/b:8443", ServerID: backend}}},
			[]string{"outbound[0].upstreams[0]", `"a/b"`}},
		{"server ID is a trust domain", inject.Spec{Outbound: []inject.OutboundPort{{Port: 15001, Target: "b:8443", ServerID: spiffeid.RequireFromString("spiffe://mesh.test")}}},
			[]string{"outbound[0].serverID", "names a trust domain"}},
		{"no server ID", inject.Spec{Outbound: []inject.OutboundPort{{Port: 15001, Target: "b:8443"}}},
			[]string{"serverID"}},
		{"two inbounds on one port", inject.Spec{Inbound: []inject.InboundPort{{Port: 8443, AppPort: 8080}, {Port: 8443, AppPort: 9090}}, Allow: allow},
			[]string{"inbound[1]"}},
		{"unknown profile", inject.Spec{Profile: "legacy", Outbound: []inject.OutboundPort{{Port: 15001, Target: "b:8443", ServerID: backend}}},
			[]string{"legacy"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file, err := inject.StaticConfig(tt.spec)
			if err == nil {
				t.Fatalf("rendered a config the sidecar refuses:\n%s", file)
			}
			msg := err.Error()
			for _, w := range append([]string{"would be refused by latch proxy", "annotation " + inject.AnnotationConfig}, tt.want...) {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not contain %q", msg, w)
				}
			}
		})
	}

	// And a good spec still renders.
	good := inject.Spec{Inbound: []inject.InboundPort{{Port: 8443, AppPort: 8080}}, Allow: allow,
		Outbound: []inject.OutboundPort{{Port: 15001, Target: "[::1]:8443", ServerID: backend}}}
	if _, err := inject.StaticConfig(good); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
}

// The sidecar gets the target as it was checked, not as it was written:
// parsePort allows spaces around a port, the sidecar's address parser not.
func TestParseSpecRendersCheckedTarget(t *testing.T) {
	spec, err := inject.ParseSpec(map[string]string{
		inject.AnnotationOutbound: "15001=backend.shop.svc: 8443@spiffe://mesh.test/ns/shop/sa/backend, 15002=[fd00::1]:9443 @spiffe://mesh.test/ns/shop/sa/db",
	}, false, 15000)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range spec.Outbound {
		got = append(got, o.Target)
	}
	if want := []string{"backend.shop.svc:8443", "[fd00::1]:9443"}; !slices.Equal(got, want) {
		t.Fatalf("targets %q, want %q", got, want)
	}
	if _, err := inject.StaticConfig(spec); err != nil {
		t.Fatalf("rendered config refused: %v", err)
	}
}

// TestProxyProtocolAnnotation: the ports named in latch.dev/proxy-protocol,
// and only those, send their app a PROXY protocol header, in the file the
// sidecar reads.
func TestProxyProtocolAnnotation(t *testing.T) {
	spec, err := inject.ParseSpec(map[string]string{
		inject.AnnotationInbound:       "8443:8080,9443:9090",
		inject.AnnotationAllow:         "spiffe://mesh.test/ns/shop/sa/frontend",
		inject.AnnotationProxyProtocol: " 9443 ",
	}, false, 15000)
	if err != nil {
		t.Fatal(err)
	}
	file, err := inject.StaticConfig(spec)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := proxy.Parse("rendered", file)
	if err != nil {
		t.Fatalf("sidecar refuses the rendered file: %v\n%s", err, file)
	}
	got := map[string]bool{}
	for _, in := range cfg.Inbound {
		got[in.Name] = in.ProxyProtocol
	}
	if want := map[string]bool{"inbound-8443": false, "inbound-9443": true}; !maps.Equal(got, want) {
		t.Errorf("proxyProtocol by listener %v, want %v\n%s", got, want, file)
	}
}

// TestFederationAnnotation: latch.dev/federates-with reaches every inbound
// listener and, for an upstream, only the trust domain of its server; the
// sidecar's parser takes the file, allow rules and server IDs in the
// federated trust domain included.
func TestFederationAnnotation(t *testing.T) {
	spec, err := inject.ParseSpec(map[string]string{
		inject.AnnotationInbound:       "8443:8080",
		inject.AnnotationAllow:         "spiffe://mesh.test/ns/shop/sa/frontend, trustDomain=partner.test",
		inject.AnnotationOutbound:      "15001=db.shop.svc:5432@spiffe://mesh.test/ns/shop/sa/db, 15002=pay.partner.test:443@spiffe://partner.test/ns/pay/sa/api",
		inject.AnnotationFederatesWith: "partner.test, other.test",
	}, false, 15000)
	if err != nil {
		t.Fatal(err)
	}
	file, err := inject.StaticConfig(spec)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := proxy.Parse("rendered", file)
	if err != nil {
		t.Fatalf("sidecar refuses the rendered file: %v\n%s", err, file)
	}
	names := func(tds []spiffeid.TrustDomain) string {
		var s []string
		for _, td := range tds {
			s = append(s, td.Name())
		}
		return strings.Join(s, ",")
	}
	if got := names(cfg.Inbound[0].FederatesWith); got != "partner.test,other.test" {
		t.Errorf("inbound federates with %q", got)
	}
	for _, o := range cfg.Outbound {
		want := map[string]string{"outbound-15001": "", "outbound-15002": "partner.test"}[o.Name]
		if got := names(o.FederatesWith); got != want {
			t.Errorf("%s federates with %q, want %q", o.Name, got, want)
		}
	}
}
