package inject

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
)

// Annotations a pod (or its Deployment's pod template) sets to ask for and
// shape its sidecar.
const (
	// AnnotationInject is "true" to opt a pod in (in any namespace the
	// webhook sees) or "false" to opt it out of a namespace labelled
	// latch.dev/inject=enabled.
	AnnotationInject = "latch.dev/inject"
	// AnnotationInbound maps sidecar ports to application ports:
	// "8443:8080,9443:9090". The sidecar accepts mTLS on the first port of
	// each pair and forwards plain TCP to 127.0.0.1 on the second.
	AnnotationInbound = "latch.dev/inbound"
	// AnnotationAllow lists the peers allowed on every inbound port,
	// comma-separated: a bare SPIFFE ID (exactly that ID), or
	// id=…, pathPrefix=…, trustDomain=… as in the config file.
	AnnotationAllow = "latch.dev/allow"
	// AnnotationOutbound declares upstreams the application reaches through
	// a loopback port: "15001=backend.default.svc:8443@spiffe://td/ns/default/sa/backend".
	AnnotationOutbound = "latch.dev/outbound"
	// AnnotationProxyProtocol lists the inbound sidecar ports (of
	// latch.dev/inbound) whose app gets a PROXY protocol v2 header naming
	// the peer before its bytes: "8443" or "8443,9443".
	AnnotationProxyProtocol = "latch.dev/proxy-protocol"
	// AnnotationFederatesWith lists foreign trust domains, comma-separated
	// bare names ("partner.example,other.example"), whose workloads every
	// inbound port accepts (latch.dev/allow may then name them) and whose
	// servers latch.dev/outbound may name; each peer is verified against its
	// own trust domain's federated bundle from the Workload API.
	AnnotationFederatesWith = "latch.dev/federates-with"
	// AnnotationPolicy "control-plane" takes the whole policy from the
	// control plane over xDS instead of from the annotations above.
	AnnotationPolicy = "latch.dev/policy"
	// AnnotationTLSProfile is "modern" (the default) or "intermediate".
	AnnotationTLSProfile = "latch.dev/tls-profile"

	// AnnotationStatus is written by the injector: its presence marks a pod
	// as injected, which makes injection idempotent.
	AnnotationStatus = "latch.dev/status"
	// AnnotationConfig is written by the injector: the static config file
	// generated from the annotations above. The sidecar reads it through a
	// downward API volume, so no ConfigMap has to be created per pod.
	AnnotationConfig = "latch.dev/config"
)

// LabelNamespaceInject is the namespace label that opts every pod of the
// namespace in ("enabled") or keeps every pod out ("disabled"); the chart's
// webhook namespaceSelectors match it.
const LabelNamespaceInject = "latch.dev/inject"

// LabelPodInject is a pod label that works like AnnotationInject when the
// annotation is absent. Unlike an annotation, a label can be matched by the
// webhook's objectSelector, which keeps unrelated pods away from the injector.
const LabelPodInject = "latch.dev/inject"

// PolicyControlPlane is the only value AnnotationPolicy accepts.
const PolicyControlPlane = "control-plane"

// maxEntries bounds the number of ports or rules one annotation may list; a
// pod needing more should take its policy from the control plane.
const maxEntries = 64

// AnnotationError says which annotation of a pod is malformed and why. The
// webhook refuses such a pod with this text, so the owner sees it in the
// ReplicaSet's events.
type AnnotationError struct {
	Annotation string
	Value      string
	Problem    string
}

func (e *AnnotationError) Error() string {
	if e.Value == "" {
		return fmt.Sprintf("annotation %s: %s", e.Annotation, e.Problem)
	}
	return fmt.Sprintf("annotation %s=%q: %s", e.Annotation, e.Value, e.Problem)
}

func annErr(ann map[string]string, key, format string, args ...any) *AnnotationError {
	return &AnnotationError{Annotation: key, Value: ann[key], Problem: fmt.Sprintf(format, args...)}
}

// Spec is what a pod's annotations ask of its sidecar.
type Spec struct {
	// ControlPlane is true when the policy comes from the control plane;
	// Inbound, Allow and Outbound are then empty.
	ControlPlane bool
	// Profile is the TLS profile name; "" means the sidecar's default.
	Profile  string
	Inbound  []InboundPort
	Allow    []identity.Rule
	Outbound []OutboundPort
	// FederatesWith are the foreign trust domains every inbound port
	// accepts; an outbound entry accepts the one of its server ID.
	FederatesWith []spiffeid.TrustDomain
}

// InboundPort is one sidecar port and the application port behind it.
type InboundPort struct {
	Port    int
	AppPort int
	// ProxyProtocol: the app gets a PROXY protocol v2 header first.
	ProxyProtocol bool
}

// OutboundPort is one loopback port and the upstream it leads to.
type OutboundPort struct {
	Port     int
	Target   string
	ServerID spiffeid.ID
}

// ParseSpec reads the sidecar's annotations. controlPlane says whether the
// injector knows a control plane; without one, a pod that names no policy is
// refused rather than given a sidecar that would serve nothing. adminPort is
// reserved for the sidecar's admin server and may not be claimed.
func ParseSpec(ann map[string]string, controlPlane bool, adminPort int) (Spec, error) {
	var s Spec
	if v, ok := ann[AnnotationTLSProfile]; ok {
		if _, err := identity.ProfileByName(v); err != nil {
			return Spec{}, annErr(ann, AnnotationTLSProfile, "want modern or intermediate")
		}
		s.Profile = v
	}
	_, hasIn := ann[AnnotationInbound]
	_, hasAllow := ann[AnnotationAllow]
	_, hasOut := ann[AnnotationOutbound]
	_, hasPP := ann[AnnotationProxyProtocol]
	_, hasFed := ann[AnnotationFederatesWith]
	static := hasIn || hasAllow || hasOut || hasPP || hasFed

	if v, ok := ann[AnnotationPolicy]; ok {
		if v != PolicyControlPlane {
			return Spec{}, annErr(ann, AnnotationPolicy, "the only value is %q (or leave it out and declare %s/%s)", PolicyControlPlane, AnnotationInbound, AnnotationOutbound)
		}
		if static {
			return Spec{}, annErr(ann, AnnotationPolicy, "conflicts with %s: the policy comes either from the control plane or from the pod's annotations", firstPresent(ann, AnnotationInbound, AnnotationAllow, AnnotationOutbound, AnnotationProxyProtocol, AnnotationFederatesWith))
		}
		if !controlPlane {
			return Spec{}, annErr(ann, AnnotationPolicy, "this cluster's injector has no control plane configured (chart value sidecar.controlPlane.address)")
		}
		s.ControlPlane = true
		return s, nil
	}
	if !static {
		if !controlPlane {
			return Spec{}, &AnnotationError{Annotation: AnnotationInbound, Problem: fmt.Sprintf(
				"the pod declares no policy and this cluster has no control plane: set %s/%s (with %s), or %s: %s once a control plane is installed",
				AnnotationInbound, AnnotationOutbound, AnnotationAllow, AnnotationPolicy, PolicyControlPlane)}
		}
		s.ControlPlane = true
		return s, nil
	}

	taken := map[int]string{adminPort: "the sidecar's admin port"}
	claim := func(key string, port int, what string) error {
		if prev, ok := taken[port]; ok {
			return annErr(ann, key, "port %d is already %s", port, prev)
		}
		taken[port] = what
		return nil
	}

	if hasIn {
		entries, err := split(ann, AnnotationInbound)
		if err != nil {
			return Spec{}, err
		}
		for _, e := range entries {
			sp, ap, ok := strings.Cut(e, ":")
			if !ok {
				return Spec{}, annErr(ann, AnnotationInbound, "entry %q: want SIDECAR_PORT:APP_PORT, e.g. 8443:8080", e)
			}
			port, err := parsePort(sp)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationInbound, "entry %q: sidecar port: %v", e, err)
			}
			app, err := parsePort(ap)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationInbound, "entry %q: app port: %v", e, err)
			}
			if port == app {
				return Spec{}, annErr(ann, AnnotationInbound, "entry %q: the sidecar and the app cannot share a port in one pod", e)
			}
			if err := claim(AnnotationInbound, port, "an inbound sidecar port"); err != nil {
				return Spec{}, err
			}
			s.Inbound = append(s.Inbound, InboundPort{Port: port, AppPort: app})
		}
		for _, in := range s.Inbound {
			if what, ok := taken[in.AppPort]; ok {
				return Spec{}, annErr(ann, AnnotationInbound, "app port %d is also %s", in.AppPort, what)
			}
		}
		// The app listens on 127.0.0.1:<app port> and the sidecar binds its
		// outbound ports on 127.0.0.1 too: one of the two would fail to start.
		for _, in := range s.Inbound {
			if _, ok := taken[in.AppPort]; !ok {
				taken[in.AppPort] = fmt.Sprintf("the app port behind inbound port %d", in.Port)
			}
		}
		if !hasAllow {
			return Spec{}, annErr(ann, AnnotationInbound, "no %s: every peer would be refused; list the SPIFFE IDs allowed to connect", AnnotationAllow)
		}
	}

	if hasFed {
		if !hasIn && !hasOut {
			return Spec{}, annErr(ann, AnnotationFederatesWith, "applies to inbound ports and outbound upstreams, but neither %s nor %s is set", AnnotationInbound, AnnotationOutbound)
		}
		entries, err := split(ann, AnnotationFederatesWith)
		if err != nil {
			return Spec{}, err
		}
		for _, e := range entries {
			td, err := identity.ParseTrustDomain(e)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationFederatesWith, "entry %v", err)
			}
			if slices.Contains(s.FederatesWith, td) {
				return Spec{}, annErr(ann, AnnotationFederatesWith, "%s listed twice", td.Name())
			}
			s.FederatesWith = append(s.FederatesWith, td)
		}
	}

	if hasPP {
		if !hasIn {
			return Spec{}, annErr(ann, AnnotationProxyProtocol, "applies to inbound ports, but %s is not set", AnnotationInbound)
		}
		entries, err := split(ann, AnnotationProxyProtocol)
		if err != nil {
			return Spec{}, err
		}
		for _, e := range entries {
			port, err := parsePort(e)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationProxyProtocol, "entry %q: %v", e, err)
			}
			i := slices.IndexFunc(s.Inbound, func(in InboundPort) bool { return in.Port == port })
			switch {
			case i < 0:
				return Spec{}, annErr(ann, AnnotationProxyProtocol, "port %d is not an inbound sidecar port of %s", port, AnnotationInbound)
			case s.Inbound[i].ProxyProtocol:
				return Spec{}, annErr(ann, AnnotationProxyProtocol, "port %d listed twice", port)
			}
			s.Inbound[i].ProxyProtocol = true
		}
	}

	if hasAllow {
		if !hasIn {
			return Spec{}, annErr(ann, AnnotationAllow, "applies to inbound ports, but %s is not set", AnnotationInbound)
		}
		entries, err := split(ann, AnnotationAllow)
		if err != nil {
			return Spec{}, err
		}
		for _, e := range entries {
			kind, value := "id", e
			if k, v, ok := strings.Cut(e, "="); ok {
				kind, value = strings.TrimSpace(k), strings.TrimSpace(v)
			}
			r, err := identity.ParseRule(kind, value)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationAllow, "entry %q: %v", e, err)
			}
			s.Allow = append(s.Allow, r)
		}
	}

	if hasOut {
		entries, err := split(ann, AnnotationOutbound)
		if err != nil {
			return Spec{}, err
		}
		for _, e := range entries {
			ps, rest, ok := strings.Cut(e, "=")
			target, sid, ok2 := strings.Cut(rest, "@")
			if !ok || !ok2 {
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: want LOCAL_PORT=HOST:PORT@SPIFFE_ID, e.g. 15001=backend.default.svc:8443@spiffe://example.org/ns/default/sa/backend", e)
			}
			port, err := parsePort(ps)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: local port: %v", e, err)
			}
			host, tp, err := net.SplitHostPort(target)
			if err != nil || host == "" {
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: target %q is not HOST:PORT", e, target)
			}
			// The sidecar's rule: accepting more here would admit a pod
			// whose sidecar cannot start.
			if err := proxy.CheckHost(host); err != nil {
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: target %v", e, err)
			}
			tport, err := parsePort(tp)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: target port: %v", e, err)
			}
			id, err := spiffeid.FromString(sid)
			if err != nil {
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: server ID %q: %v", e, sid, err)
			}
			if id.Path() == "" {
				// A trust-domain ID would be proved by no SVID; the sidecar
				// refuses it, so the pod would never become ready.
				return Spec{}, annErr(ann, AnnotationOutbound, "entry %q: server ID %q names a trust domain, not a workload (want e.g. %s/ns/NAMESPACE/sa/ACCOUNT)", e, sid, id)
			}
			if err := claim(AnnotationOutbound, port, "an outbound local port"); err != nil {
				return Spec{}, err
			}
			// Rendered from what was checked (the port without the spaces
			// parsePort allows), not the annotation's text.
			s.Outbound = append(s.Outbound, OutboundPort{Port: port, Target: net.JoinHostPort(host, strconv.Itoa(tport)), ServerID: id})
		}
	}
	return s, nil
}

// split returns the trimmed, non-empty comma-separated entries of an
// annotation, refusing an empty list and more than maxEntries.
func split(ann map[string]string, key string) ([]string, error) {
	var out []string
	for _, e := range strings.Split(ann[key], ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return nil, annErr(ann, key, "is empty")
	}
	if len(out) > maxEntries {
		return nil, annErr(ann, key, "has %d entries, at most %d are supported (use the control plane for more)", len(out), maxEntries)
	}
	return out, nil
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("%q is not a port number (1-65535)", s)
	}
	return p, nil
}

func firstPresent(ann map[string]string, keys ...string) string {
	for _, k := range keys {
		if _, ok := ann[k]; ok {
			return k
		}
	}
	return ""
}
