package inject_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/inject"
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
