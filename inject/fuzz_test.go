package inject_test

import (
	"errors"
	"strings"
	"testing"

	"latch.dev/latch/inject"
	"latch.dev/latch/proxy"
)

// fuzzAdminPort is the admin port the fuzzed specs must not claim.
const fuzzAdminPort = 15000

// FuzzParseSpec: whatever the annotations, ParseSpec never panics. A refusal
// is an *AnnotationError with a message naming the annotation. An accepted
// static spec renders (StaticConfig) into a file the proxy's own parser
// accepts: the webhook must never admit a pod whose sidecar then cannot
// start, and nothing the pod owner writes may widen the proxy's rules.
//
// Each annotation is given with a presence flag, since an empty annotation
// and a missing one mean different things.
func FuzzParseSpec(f *testing.F) {
	type seed struct {
		cp                                    bool
		profile, in, allow, out, pol          string
		hasProf, hasIn, hasAl, hasOut, hasPol bool
	}
	seeds := []seed{
		{in: "8443:8080", allow: "spiffe://td/ns/a/sa/b", hasIn: true, hasAl: true},
		{in: "8443:8080,9443:9090", allow: "id=spiffe://td/a, pathPrefix=spiffe://td/ns, trustDomain=td", hasIn: true, hasAl: true,
			out: "15001=backend.default.svc:8443@spiffe://td/ns/default/sa/backend", hasOut: true, profile: "intermediate", hasProf: true},
		{out: "15001=[::1]:8443@spiffe://td/x", hasOut: true},
		{cp: true, pol: "control-plane", hasPol: true},
		{cp: true},
		{in: "8443:8443", allow: "spiffe://td/a", hasIn: true, hasAl: true},
		{in: "15000:8080", allow: "spiffe://td/a", hasIn: true, hasAl: true},
		{in: "8443:8080", allow: "pathPrefix=spiffe://td", hasIn: true, hasAl: true},
		{in: "8443:8080", allow: "trustDomain=spiffe://td/x", hasIn: true, hasAl: true},
		{in: "8443:8080", hasIn: true},
		{out: "15001=backend:8443@spiffe://td", hasOut: true},
		{out: "15001=:8443@spiffe://td/x", hasOut: true},
		{out: "8080=b:1@spiffe://td/x", hasOut: true, in: "8443:8080", allow: "spiffe://td/a", hasIn: true, hasAl: true},
		{out: "0=b:1@spiffe://td/x", hasOut: true},
		{out: "15001=b:99999@spiffe://td/x", hasOut: true},
		{out: "15001=b c:1@spiffe://td/x", hasOut: true},
		{out: "15001=b/c:1@spiffe://td/x", hasOut: true},
		{out: "15001=b:1@spiffe://td/x@y", hasOut: true},
		{profile: "legacy", hasProf: true, in: "1:2", allow: "spiffe://td/a", hasIn: true, hasAl: true},
		{pol: "static", hasPol: true},
		{pol: "control-plane", hasPol: true, in: "1:2", hasIn: true},
		{in: ",,,", hasIn: true, allow: " , ", hasAl: true},
		{in: strings.Repeat("1:2,", 65), hasIn: true, allow: "spiffe://td/a", hasAl: true},
	}
	for _, s := range seeds {
		f.Add(s.cp, s.profile, s.in, s.allow, s.out, s.pol, s.hasProf, s.hasIn, s.hasAl, s.hasOut, s.hasPol)
	}
	f.Fuzz(func(t *testing.T, controlPlane bool, profile, in, allow, out, pol string, hasProf, hasIn, hasAllow, hasOut, hasPol bool) {
		ann := map[string]string{}
		set := func(ok bool, key, v string) {
			if ok {
				ann[key] = v
			}
		}
		set(hasProf, inject.AnnotationTLSProfile, profile)
		set(hasIn, inject.AnnotationInbound, in)
		set(hasAllow, inject.AnnotationAllow, allow)
		set(hasOut, inject.AnnotationOutbound, out)
		set(hasPol, inject.AnnotationPolicy, pol)

		spec, err := inject.ParseSpec(ann, controlPlane, fuzzAdminPort)
		if err != nil {
			ae, ok := errors.AsType[*inject.AnnotationError](err)
			if !ok {
				t.Fatalf("error %T is not an *AnnotationError: %v", err, err)
			}
			if ae.Annotation == "" || ae.Problem == "" || !strings.Contains(err.Error(), ae.Annotation) {
				t.Fatalf("refusal does not name the annotation and the problem: %q", err)
			}
			return
		}
		if spec.ControlPlane {
			if !controlPlane {
				t.Fatal("a control-plane spec accepted by an injector without a control plane")
			}
			if len(spec.Inbound)+len(spec.Outbound)+len(spec.Allow) > 0 {
				t.Fatalf("control-plane spec also carries a static policy: %+v", spec)
			}
			return
		}
		if len(spec.Inbound) > 0 && len(spec.Allow) == 0 {
			t.Fatalf("inbound ports accepted without an allow-list: %+v", spec)
		}
		for _, p := range spec.Inbound {
			if p.Port == fuzzAdminPort || p.AppPort == fuzzAdminPort {
				t.Fatalf("admin port claimed: %+v", spec)
			}
		}
		for _, p := range spec.Outbound {
			if p.Port == fuzzAdminPort {
				t.Fatalf("admin port claimed: %+v", spec)
			}
		}
		appPorts := map[int]bool{}
		for _, p := range spec.Inbound {
			appPorts[p.AppPort] = true
		}
		for _, p := range spec.Outbound {
			if appPorts[p.Port] {
				t.Fatalf("outbound local port %d is also an inbound app port: sidecar and app would both bind 127.0.0.1:%d", p.Port, p.Port)
			}
		}
		file, err := inject.StaticConfig(spec)
		if err != nil {
			t.Fatalf("accepted spec does not render: %v\n%+v", err, spec)
		}
		cfg, err := proxy.Parse("latch.dev/config", file)
		if err != nil {
			t.Fatalf("annotations %q accepted, but the sidecar would refuse the config it gets:\n%v\n%s", ann, err, file)
		}
		if len(cfg.Inbound) != len(spec.Inbound) || len(cfg.Outbound) != len(spec.Outbound) {
			t.Fatalf("rendered config has %d/%d listeners, spec %d/%d", len(cfg.Inbound), len(cfg.Outbound), len(spec.Inbound), len(spec.Outbound))
		}
	})
}
