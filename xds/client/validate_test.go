package client

import (
	"errors"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	proxyprotocol "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/proxy_protocol/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/translate"
)

var (
	testTD   = spiffeid.RequireTrustDomainFromString("mesh.test")
	nodeID   = spiffeid.RequireFromString("spiffe://mesh.test/ns/shop/sa/svc")
	testOpts = policy.Options{TrustDomains: []spiffeid.TrustDomain{testTD}}
)

const testDecl = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: svc}
spec:
  spiffeID: spiffe://mesh.test/ns/shop/sa/svc
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      idleTimeout: 90s
      proxyProtocol: v2
      federatesWith: [partner.test]
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - trustDomain: mesh.test
        - pathPrefix: spiffe://mesh.test/ns/ops
  outbound:
    - port: 9001
      endpoints: ["127.0.0.2:8443", "127.0.0.1:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
    - port: 9002
      target: db.local:8443
      serverID: spiffe://mesh.test/ns/shop/sa/db
    - port: 9003
      target: pay.partner.test:8443
      serverID: spiffe://partner.test/ns/pay/sa/api
      federatesWith: [partner.test]
`

func goodResources(t testing.TB) translate.Resources {
	t.Helper()
	ds, err := policy.Parse("svc.yaml", []byte(testDecl), testOpts)
	if err != nil {
		t.Fatal(err)
	}
	return translate.Translate(ds[0], translate.Options{})
}

func validator() Validator { return Validator{NodeID: nodeID, Profile: identity.Modern()} }

// build runs resources through the client's whole validation path.
func build(v Validator, r translate.Resources) (*proxy.Config, error) {
	c := &Client{v: v, pending: newResources()}
	res := newResources()
	var ls, cs, es []*anypb.Any
	for _, l := range r.Listeners {
		ls = append(ls, mustAny(l))
	}
	for _, cl := range r.Clusters {
		cs = append(cs, mustAny(cl))
	}
	for _, e := range r.Endpoints {
		es = append(es, mustAny(e))
	}
	for _, step := range []struct {
		typ string
		in  []*anypb.Any
	}{{ClusterType, cs}, {EndpointType, es}, {ListenerType, ls}} {
		if err := c.decode(&res, step.typ, step.in); err != nil {
			return nil, err
		}
	}
	return v.Build(res.set, "v1")
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}

func TestBuildGood(t *testing.T) {
	cfg, err := build(validator(), goodResources(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Inbound) != 1 || len(cfg.Outbound) != 3 {
		t.Fatalf("config: %+v", cfg)
	}
	in := cfg.Inbound[0]
	if in.Name != "inbound|8443" || in.Listen != ":8443" || in.App != "127.0.0.1:8080" || in.IdleTimeout != 90*time.Second || !in.ProxyProtocol {
		t.Errorf("inbound: %+v", in)
	}
	want := identity.NewAllowList(
		identity.AllowID(spiffeid.RequireFromString("spiffe://mesh.test/ns/shop/sa/frontend")),
		identity.AllowTrustDomain(testTD),
		identity.AllowPathPrefix(spiffeid.RequireFromString("spiffe://mesh.test/ns/ops")),
	)
	if !in.Allow.Equal(want) {
		t.Errorf("allow = %v, want %v (the translation must round-trip)", in.Allow, want)
	}
	out := cfg.Outbound[0]
	if out.Name != "outbound|9001" || out.Listen != "127.0.0.1:9001" || strings.Join(out.Upstreams, ",") != "127.0.0.2:8443,127.0.0.1:8443" ||
		out.ServerID.String() != "spiffe://mesh.test/ns/shop/sa/db" || out.ConnectTimeout != 5*time.Second {
		t.Errorf("outbound (EDS): %+v", out)
	}
	if got := strings.Join(cfg.Outbound[1].Upstreams, ","); got != "db.local:8443" {
		t.Errorf("outbound (DNS) upstreams = %s", got)
	}
	if fed := in.FederatesWith; len(fed) != 1 || fed[0].Name() != "partner.test" {
		t.Errorf("inbound federates with %v", fed)
	}
	if o := cfg.Outbound[2]; o.ServerID.String() != "spiffe://partner.test/ns/pay/sa/api" || len(o.FederatesWith) != 1 || o.FederatesWith[0].Name() != "partner.test" {
		t.Errorf("outbound to a federated server: %+v", o)
	}
	for _, o := range cfg.Outbound[:2] {
		if len(o.FederatesWith) != 0 {
			t.Errorf("outbound %s federates with %v", o.Name, o.FederatesWith)
		}
	}
	if cfg.Source != "xds" || cfg.Version != "v1" || cfg.TLS.Name != identity.ProfileModern {
		t.Errorf("header: source %q version %q profile %q", cfg.Source, cfg.Version, cfg.TLS.Name)
	}
}

func TestBuildNarrowsProfile(t *testing.T) {
	r := goodResources(t)
	for _, l := range r.Listeners {
		if l.Name == "inbound|8443" {
			editDownstream(l, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{EcdhCurves: []string{"X25519MLKEM768"}}
			})
		}
	}
	cfg, err := build(validator(), r)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.TLS.Curves) != 1 {
		t.Errorf("curves = %v, want only X25519MLKEM768", cfg.TLS.Curves)
	}
}

// TestBuildSessionResumption: max_session_keys 0 on an outbound cluster's
// UpstreamTlsContext (Envoy's way to say "no resumption") turns resumption
// off for that listener only; unset or any other count leaves it on.
func TestBuildSessionResumption(t *testing.T) {
	for _, tt := range []struct {
		name string
		keys *wrapperspb.UInt32Value
		off  bool
	}{
		{"unset", nil, false},
		{"zero", wrapperspb.UInt32(0), true},
		{"one", wrapperspb.UInt32(1), false},
		{"many", wrapperspb.UInt32(100), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := goodResources(t)
			editUpstream(clusterNamed(r, "outbound|9001"), func(u *tlsv3.UpstreamTlsContext) { u.MaxSessionKeys = tt.keys })
			cfg, err := build(validator(), r)
			if err != nil {
				t.Fatal(err)
			}
			for _, out := range cfg.Outbound {
				want := tt.off && out.Name == "outbound|9001"
				if out.DisableSessionResumption != want {
					t.Errorf("%s: DisableSessionResumption = %v, want %v", out.Name, out.DisableSessionResumption, want)
				}
			}
		})
	}
}

func TestBuildIncomplete(t *testing.T) {
	r := goodResources(t)
	r.Endpoints = nil
	if _, err := build(validator(), r); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("missing endpoints: %v, want ErrIncomplete", err)
	}
	r = goodResources(t)
	r.Clusters = r.Clusters[1:]
	if _, err := build(validator(), r); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("missing cluster: %v, want ErrIncomplete", err)
	}
}

// Editing helpers: each unpacks a typed config, lets the test change it, and
// packs it back.

func listenerNamed(r translate.Resources, name string) *listener.Listener {
	for _, l := range r.Listeners {
		if l.Name == name {
			return l
		}
	}
	panic("no listener " + name)
}

func clusterNamed(r translate.Resources, name string) *cluster.Cluster {
	for _, c := range r.Clusters {
		if c.Name == name {
			return c
		}
	}
	panic("no cluster " + name)
}

func editTyped[T proto.Message](a **anypb.Any, m T, f func(T)) {
	if err := (*a).UnmarshalTo(m); err != nil {
		panic(err)
	}
	f(m)
	*a = mustAny(m)
}

func editRBAC(l *listener.Listener, f func(*rbac.RBAC)) {
	fl := l.FilterChains[0].Filters[0]
	tc := fl.GetTypedConfig()
	editTyped(&tc, &rbac.RBAC{}, f)
	fl.ConfigType = &listener.Filter_TypedConfig{TypedConfig: tc}
}

func editTCP(l *listener.Listener, f func(*tcpproxy.TcpProxy)) {
	fl := l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1]
	tc := fl.GetTypedConfig()
	editTyped(&tc, &tcpproxy.TcpProxy{}, f)
	fl.ConfigType = &listener.Filter_TypedConfig{TypedConfig: tc}
}

func editDownstream(l *listener.Listener, f func(*tlsv3.DownstreamTlsContext)) {
	ts := l.FilterChains[0].TransportSocket
	tc := ts.GetTypedConfig()
	editTyped(&tc, &tlsv3.DownstreamTlsContext{}, f)
	ts.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: tc}
}

func editUpstream(c *cluster.Cluster, f func(*tlsv3.UpstreamTlsContext)) {
	ts := c.TransportSocket
	tc := ts.GetTypedConfig()
	editTyped(&tc, &tlsv3.UpstreamTlsContext{}, f)
	ts.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: tc}
}

func editProxyProtocol(c *cluster.Cluster, f func(*proxyprotocol.ProxyProtocolUpstreamTransport)) {
	ts := c.TransportSocket
	tc := ts.GetTypedConfig()
	editTyped(&tc, &proxyprotocol.ProxyProtocolUpstreamTransport{}, f)
	ts.ConfigType = &core.TransportSocket_TypedConfig{TypedConfig: tc}
}

func inlineFormat(s string) *core.SubstitutionFormatString {
	return &core.SubstitutionFormatString{Format: &core.SubstitutionFormatString_TextFormatSource{
		TextFormatSource: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: s}}}}
}

// setApp points the inbound listener's app cluster at host:port.
func setApp(r translate.Resources, host string, port uint32) {
	sa := clusterNamed(r, app).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress()
	sa.Address, sa.PortSpecifier = host, &core.SocketAddress_PortValue{PortValue: port}
}

// TestNonLoopbackAppWhenAllowed: a sidecar started with
// --allow-non-loopback-app takes an inbound app elsewhere than on loopback,
// but never one of its own listeners.
func TestNonLoopbackAppWhenAllowed(t *testing.T) {
	v := validator()
	v.AllowNonLoopbackApp = true
	for _, host := range []string{"10.1.2.3", "app.shop.svc"} {
		r := goodResources(t)
		setApp(r, host, 8080)
		cfg, err := build(v, r)
		if err != nil {
			t.Fatalf("app on %s: %v", host, err)
		}
		if got, want := cfg.Inbound[0].App, host+":8080"; got != want {
			t.Errorf("app = %s, want %s", got, want)
		}
	}
	r := goodResources(t)
	setApp(r, "127.0.0.1", 9001)
	if _, err := build(v, r); err == nil || !strings.Contains(err.Error(), "own listener") {
		t.Errorf("app on the sidecar's own outbound listener: %v, want refused", err)
	}
}

// editValidator edits the SPIFFE certificate validator of an inbound
// listener (federated in testDecl).
func editValidator(l *listener.Listener, f func(*tlsv3.SPIFFECertValidatorConfig)) {
	editDownstream(l, func(d *tlsv3.DownstreamTlsContext) {
		tec := d.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.CustomValidatorConfig
		editTyped(&tec.TypedConfig, &tlsv3.SPIFFECertValidatorConfig{}, f)
	})
}

func principals(r *rbac.RBAC) *[]*rbacconfig.Principal {
	return &r.Rules.Policies["allow"].Principals
}

func authPrincipal(m *matcher.StringMatcher) *rbacconfig.Principal {
	return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_Authenticated_{Authenticated: &rbacconfig.Principal_Authenticated{PrincipalName: m}}}
}

const (
	in   = "inbound|8443"
	out  = "outbound|9001"
	outD = "outbound|9002"
	outP = "outbound|9003"
	app  = "inbound|8443|app"
)

// hostileCases are resources outside the subset latch implements, or weaker
// than its profile. Each must be refused with the resource and field named.
var hostileCases = []struct {
	name     string
	edit     func(r *translate.Resources)
	resource string // `listener "inbound|8443"` etc.
	field    string // substring of the message naming the field
}{
	// A control plane choosing where an inbound listener's plain TCP goes.
	{"inbound app is the sidecar's own outbound listener", func(r *translate.Resources) {
		setApp(*r, "127.0.0.1", 9001)
	}, `listener "inbound|8443"`, `(latch config) app: "127.0.0.1:9001" is this sidecar's own listener outbound[0] "outbound|9001"`},
	{"inbound app is its own outbound listener, as localhost", func(r *translate.Resources) {
		setApp(*r, "localhost", 9001)
	}, `listener "inbound|8443"`, `(latch config) app: "localhost:9001" is this sidecar's own listener outbound[0] "outbound|9001"`},
	{"inbound app is the inbound listener itself", func(r *translate.Resources) {
		setApp(*r, "127.0.0.1", 8443)
	}, `listener "inbound|8443"`, `(latch config) app: "127.0.0.1:8443" is this sidecar's own listener inbound[0] "inbound|8443"`},
	{"inbound app on another address", func(r *translate.Resources) {
		setApp(*r, "10.1.2.3", 8080)
	}, `cluster "inbound|8443|app"`, `load_assignment: the app of inbound listener "inbound|8443" is 10.1.2.3:8080, not a loopback address`},
	{"inbound app by DNS name", func(r *translate.Resources) {
		setApp(*r, "app.shop.svc", 8080)
	}, `cluster "inbound|8443|app"`, `load_assignment: the app of inbound listener "inbound|8443" is app.shop.svc:8080, not a loopback address`},
	{"listener name with a control character", func(r *translate.Resources) {
		listenerNamed(*r, in).Name = "inb\x7fund|8443"
	}, `listener "inb\x7fund|8443"`, "name: \"inb\\x7fund|8443\": only letters"},
	{"unknown filter", func(r *translate.Resources) {
		listenerNamed(*r, in).FilterChains[0].Filters[0].Name = "envoy.filters.network.http_connection_manager"
	}, `listener "inbound|8443"`, "filters[0].name"},
	{"extra filter after tcp_proxy", func(r *translate.Resources) {
		fc := listenerNamed(*r, in).FilterChains[0]
		fc.Filters = append(fc.Filters, fc.Filters[0])
	}, `listener "inbound|8443"`, "filters[2].name"},
	{"inbound without RBAC", func(r *translate.Resources) {
		fc := listenerNamed(*r, in).FilterChains[0]
		fc.Filters = fc.Filters[1:]
	}, `listener "inbound|8443"`, "filters[0].name"},
	{"RBAC on outbound", func(r *translate.Resources) {
		fc := listenerNamed(*r, out).FilterChains[0]
		fc.Filters = append(listenerNamed(*r, in).FilterChains[0].Filters[:1:1], fc.Filters...)
	}, `listener "outbound|9001"`, "filters[0].name"},
	{"RBAC without rules allows everyone", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) { x.Rules = nil })
	}, `listener "inbound|8443"`, "typed_config.rules: missing (Envoy would allow every peer)"},
	{"RBAC DENY action", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) { x.Rules.Action = rbacconfig.RBAC_DENY })
	}, `listener "inbound|8443"`, "rules.action"},
	{"RBAC shadow rules", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) { x.ShadowRules = &rbacconfig.RBAC{} })
	}, `listener "inbound|8443"`, "typed_config.shadow_rules: not supported"},
	{"RBAC continuous enforcement", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) { x.EnforcementType = rbac.RBAC_CONTINUOUS })
	}, `listener "inbound|8443"`, "typed_config.enforcement_type: not supported"},
	{"RBAC permission on port", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			x.Rules.Policies["allow"].Permissions = []*rbacconfig.Permission{{Rule: &rbacconfig.Permission_DestinationPort{DestinationPort: 8443}}}
		})
	}, `listener "inbound|8443"`, `policies["allow"].permissions`},
	{"RBAC principal by source IP", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = append(*principals(x), &rbacconfig.Principal{Identifier: &rbacconfig.Principal_DirectRemoteIp{DirectRemoteIp: &core.CidrRange{AddressPrefix: "10.0.0.0"}}})
		})
	}, `listener "inbound|8443"`, "principals[4]: only authenticated.principal_name"},
	{"RBAC principal any", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = []*rbacconfig.Principal{{Identifier: &rbacconfig.Principal_Any{Any: true}}}
		})
	}, `listener "inbound|8443"`, "principals[0]"},
	{"RBAC regex matcher", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = []*rbacconfig.Principal{authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: ".*"}}})}
		})
	}, `listener "inbound|8443"`, "principal_name.safe_regex: not supported"},
	{"RBAC prefix off a segment boundary", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = []*rbacconfig.Principal{authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://mesh.test/ns/prod"}})}
		})
	}, `listener "inbound|8443"`, "principal_name.prefix"},
	{"RBAC ignore_case", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			(*principals(x))[0].GetAuthenticated().PrincipalName.IgnoreCase = true
		})
	}, `listener "inbound|8443"`, "principal_name.ignore_case: not supported"},
	{"RBAC prefix without its exact principal", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = []*rbacconfig.Principal{authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://mesh.test/ns/ops/"}})}
		})
	}, `listener "inbound|8443"`, "cannot be expressed"},
	// The only xDS spelling of a trust-domain rule is the prefix
	// "spiffe://td/"; nothing else may come out as one.
	{"RBAC trust-domain prefix with a path and a doubled slash", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = []*rbacconfig.Principal{
				authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: "spiffe://mesh.test/ns/prod/sa/db-admin"}}),
				authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://mesh.test/ns/prod/sa/db-admin//"}}),
			}
		})
	}, `listener "inbound|8443"`, "principal_name.prefix"},
	{"RBAC trust-domain prefix with an upper-case scheme", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = []*rbacconfig.Principal{authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "SPIFFE://mesh.test/"}})}
		})
	}, `listener "inbound|8443"`, "principal_name.prefix"},
	{"client certificate not required", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) { d.RequireClientCertificate = wrapperspb.Bool(false) })
	}, `listener "inbound|8443"`, "require_client_certificate: must be true"},
	{"TLS 1.2 under the modern profile", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2}
		})
	}, `listener "inbound|8443"`, "tls_params: minVersion TLS 1.2: outside profile modern"},
	{"TLS 1.1 maximum", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_1}
		})
	}, `listener "inbound|8443"`, "tls_params: maxVersion TLS 1.1"},
	{"CBC cipher suite", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{CipherSuites: []string{"ECDHE-RSA-AES128-SHA"}}
		})
	}, `cluster "outbound|9001"`, "tls_params: cipherSuites"},
	{"curve outside the profile", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{EcdhCurves: []string{"P-384"}}
		})
	}, `listener "inbound|8443"`, "tls_params: curves"},
	{"signature algorithms", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{SignatureAlgorithms: []string{"rsa_pkcs1_sha1"}}
		})
	}, `listener "inbound|8443"`, "tls_params.signature_algorithms: not supported"},
	{"inline private key over xDS", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsCertificates = []*tlsv3.TlsCertificate{{}}
		})
	}, `listener "inbound|8443"`, "common_tls_context.tls_certificates: not supported"},
	{"another workload's SVID", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].Name = "spiffe://mesh.test/ns/shop/sa/other"
		})
	}, `listener "inbound|8443"`, "tls_certificate_sds_secret_configs[0].name"},
	{"foreign trust bundle", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: "spiffe://evil.test"}}
		})
	}, `listener "inbound|8443"`, "validation_context_sds_secret_config.name"},
	{"inline trusted CA", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{}}
		})
	}, `listener "inbound|8443"`, "common_tls_context.validation_context: not supported"},
	{"session tickets", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.SessionTicketKeysType = &tlsv3.DownstreamTlsContext_DisableStatelessSessionResumption{DisableStatelessSessionResumption: true}
		})
	}, `listener "inbound|8443"`, "disable_stateless_session_resumption: not supported"},
	{"other transport socket", func(r *translate.Resources) {
		listenerNamed(*r, in).FilterChains[0].TransportSocket.Name = "envoy.transport_sockets.raw_buffer"
	}, `listener "inbound|8443"`, "transport_socket.name"},
	{"outbound listener off loopback", func(r *translate.Resources) {
		listenerNamed(*r, out).Address.GetSocketAddress().Address = "0.0.0.0"
	}, `listener "outbound|9001"`, "address.socket_address.address: outbound (plain) listener on 0.0.0.0: must be a loopback address"},
	{"outbound listener on every IPv6 address", func(r *translate.Resources) {
		sa := listenerNamed(*r, out).Address.GetSocketAddress()
		sa.Address, sa.Ipv4Compat = "::", true
	}, `listener "outbound|9001"`, "outbound (plain) listener on ::: must be a loopback address"},
	{"listener on a host name", func(r *translate.Resources) {
		listenerNamed(*r, in).Address.GetSocketAddress().Address = "localhost"
	}, `listener "inbound|8443"`, "is not an IP address"},
	{"UDP listener", func(r *translate.Resources) {
		listenerNamed(*r, in).Address.GetSocketAddress().Protocol = core.SocketAddress_UDP
	}, `listener "inbound|8443"`, "protocol: only TCP"},
	{"two filter chains", func(r *translate.Resources) {
		l := listenerNamed(*r, in)
		l.FilterChains = append(l.FilterChains, l.FilterChains[0])
	}, `listener "inbound|8443"`, "filter_chains: want exactly one"},
	{"filter chain match", func(r *translate.Resources) {
		listenerNamed(*r, in).FilterChains[0].FilterChainMatch = &listener.FilterChainMatch{ServerNames: []string{"x"}}
	}, `listener "inbound|8443"`, "filter_chains[0].filter_chain_match: not supported"},
	{"original destination", func(r *translate.Resources) {
		listenerNamed(*r, in).UseOriginalDst = wrapperspb.Bool(true)
	}, `listener "inbound|8443"`, "use_original_dst: not supported"},
	{"listener filters", func(r *translate.Resources) {
		listenerNamed(*r, in).ListenerFilters = []*listener.ListenerFilter{{Name: "envoy.filters.listener.tls_inspector"}}
	}, `listener "inbound|8443"`, "listener_filters: not supported"},
	{"outbound marked inbound", func(r *translate.Resources) {
		listenerNamed(*r, out).TrafficDirection = core.TrafficDirection_INBOUND
	}, `listener "outbound|9001"`, "transport_socket: an INBOUND listener must terminate TLS"},
	{"tcp_proxy weighted clusters", func(r *translate.Resources) {
		editTCP(listenerNamed(*r, in), func(x *tcpproxy.TcpProxy) {
			x.ClusterSpecifier = &tcpproxy.TcpProxy_WeightedClusters{WeightedClusters: &tcpproxy.TcpProxy_WeightedCluster{
				Clusters: []*tcpproxy.TcpProxy_WeightedCluster_ClusterWeight{{Name: app, Weight: 1}},
			}}
		})
	}, `listener "inbound|8443"`, "typed_config.weighted_clusters: not supported"},
	{"tcp_proxy idle timeout disabled", func(r *translate.Resources) {
		editTCP(listenerNamed(*r, in), func(x *tcpproxy.TcpProxy) { x.IdleTimeout = durationpb.New(0) })
	}, `listener "inbound|8443"`, "idle_timeout: 0s: must be positive"},
	{"tcp_proxy typed config of another type", func(r *translate.Resources) {
		l := listenerNamed(*r, in)
		l.FilterChains[0].Filters[1].ConfigType = &listener.Filter_TypedConfig{TypedConfig: mustAny(&rbac.RBAC{StatPrefix: "x"})}
	}, `listener "inbound|8443"`, "filters[1].typed_config: type type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC is not supported here"},
	// Envoy's own rules (protoc-gen-validate, go-control-plane's
	// ValidateAll), checked first: on the resource and on every typed
	// config inside it, which ValidateAll alone does not open.
	{"Envoy: tcp_proxy without stat_prefix", func(r *translate.Resources) {
		editTCP(listenerNamed(*r, in), func(x *tcpproxy.TcpProxy) { x.StatPrefix = "" })
	}, `listener "inbound|8443"`, "filter_chains[0].filters[1].typed_config.stat_prefix: value length must be at least 1 runes (Envoy's rule)"},
	{"Envoy: RBAC without stat_prefix", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) { x.StatPrefix = "" })
	}, `listener "inbound|8443"`, "filter_chains[0].filters[0].typed_config.stat_prefix: value length must be at least 1 runes (Envoy's rule)"},
	{"Envoy: tcp_proxy weighted clusters empty", func(r *translate.Resources) {
		editTCP(listenerNamed(*r, in), func(x *tcpproxy.TcpProxy) {
			x.ClusterSpecifier = &tcpproxy.TcpProxy_WeightedClusters{WeightedClusters: &tcpproxy.TcpProxy_WeightedCluster{}}
		})
	}, `listener "inbound|8443"`, "typed_config.weighted_clusters.clusters: value must contain at least 1 item(s) (Envoy's rule)"},
	{"Envoy: TLS version outside the enum", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{TlsMinimumProtocolVersion: 42}
		})
	}, `listener "inbound|8443"`, "transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version: value must be one of the defined enum values (Envoy's rule)"},
	{"Envoy: SAN type unspecified", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].SanType = tlsv3.SubjectAltNameMatcher_SAN_TYPE_UNSPECIFIED
		})
	}, `cluster "outbound|9001"`, "match_typed_subject_alt_names[0].san_type: value must not be in list [SAN_TYPE_UNSPECIFIED] (Envoy's rule)"},
	{"Envoy: port above 65535", func(r *translate.Resources) {
		listenerNamed(*r, in).Address.GetSocketAddress().PortSpecifier = &core.SocketAddress_PortValue{PortValue: 70000}
	}, `listener "inbound|8443"`, "address.socket_address.port_value: value must be less than or equal to 65535 (Envoy's rule)"},
	{"Envoy: negative connect timeout", func(r *translate.Resources) {
		clusterNamed(*r, out).ConnectTimeout = durationpb.New(-time.Second)
	}, `cluster "outbound|9001"`, "connect_timeout: value must be greater than 0s (Envoy's rule)"},
	{"Envoy: endpoint priority above 128", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints[1].Priority = 129
	}, `endpoints "outbound|9001"`, "endpoints[1].priority: value must be less than or equal to 128 (Envoy's rule)"},
	{"Envoy: cluster load balancing policy outside the enum", func(r *translate.Resources) {
		clusterNamed(*r, outD).LbPolicy = 99
	}, `cluster "outbound|9002"`, "lb_policy: value must be one of the defined enum values (Envoy's rule)"},
	{"Envoy: unspecified RBAC principal", func(r *translate.Resources) {
		editRBAC(listenerNamed(*r, in), func(x *rbac.RBAC) {
			*principals(x) = append(*principals(x), &rbacconfig.Principal{})
		})
	}, `listener "inbound|8443"`, `filter_chains[0].filters[0].typed_config.rules.policies[allow].principals[4].identifier: value is required (Envoy's rule)`},
	{"unknown proto fields", func(r *translate.Resources) {
		l := listenerNamed(*r, in)
		l.ProtoReflect().SetUnknown([]byte{0xf8, 0xff, 0x3f, 0x01}) // field 1048575, varint 1
	}, `listener "inbound|8443"`, "carries fields unknown"},
	{"outbound cluster in plaintext", func(r *translate.Resources) {
		clusterNamed(*r, out).TransportSocket = nil
	}, `cluster "outbound|9001"`, "transport_socket: missing: outbound listener \"outbound|9001\" must originate mTLS"},
	{"server SAN of DNS type", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].SanType = tlsv3.SubjectAltNameMatcher_DNS
		})
	}, `cluster "outbound|9001"`, "match_typed_subject_alt_names[0].san_type"},
	{"server SAN by prefix", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://mesh.test/"}}
		})
	}, `cluster "outbound|9001"`, "matcher.prefix: not supported"},
	{"no server SAN", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames = nil
		})
	}, `cluster "outbound|9001"`, "match_typed_subject_alt_names: want exactly one"},
	{"server in a foreign trust domain", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: "spiffe://evil.test/db"}}
		})
	}, `cluster "outbound|9001"`, "outside the trust domain"},
	{"upstream SNI", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, out), func(u *tlsv3.UpstreamTlsContext) { u.Sni = "db" })
	}, `cluster "outbound|9001"`, "typed_config.sni: not supported"},
	{"TLS towards the app", func(r *translate.Resources) {
		clusterNamed(*r, app).TransportSocket = clusterNamed(*r, out).TransportSocket
	}, `cluster "inbound|8443|app"`, "transport_socket: used by inbound listener"},
	// Federation: the SPIFFE validator names trust domains, nothing else.
	{"federated trust bundle inline", func(r *translate.Resources) {
		editValidator(listenerNamed(*r, in), func(v *tlsv3.SPIFFECertValidatorConfig) {
			v.TrustDomains[1].TrustBundle = &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "-----BEGIN CERTIFICATE-----"}}
		})
	}, `listener "inbound|8443"`, "trust_domains[1].trust_bundle: not supported: trust bundles come from the Workload API"},
	{"federated trust bundle map", func(r *translate.Resources) {
		editValidator(listenerNamed(*r, in), func(v *tlsv3.SPIFFECertValidatorConfig) {
			v.TrustBundles = &core.DataSource{Specifier: &core.DataSource_Filename{Filename: "/etc/bundles.json"}}
		})
	}, `listener "inbound|8443"`, "typed_config.trust_bundles: not supported"},
	{"validator without the workload's own trust domain", func(r *translate.Resources) {
		editValidator(listenerNamed(*r, in), func(v *tlsv3.SPIFFECertValidatorConfig) { v.TrustDomains = v.TrustDomains[1:] })
	}, `listener "inbound|8443"`, "trust_domains: does not name the workload's own trust domain mesh.test"},
	{"validator naming a trust domain twice", func(r *translate.Resources) {
		editValidator(listenerNamed(*r, in), func(v *tlsv3.SPIFFECertValidatorConfig) {
			v.TrustDomains = append(v.TrustDomains, v.TrustDomains[1])
		})
	}, `listener "inbound|8443"`, "trust_domains[2].name: partner.test listed twice"},
	{"validator naming a SPIFFE ID as trust domain", func(r *translate.Resources) {
		editValidator(listenerNamed(*r, in), func(v *tlsv3.SPIFFECertValidatorConfig) { v.TrustDomains[1].Name = "spiffe://partner.test/ns/x" })
	}, `listener "inbound|8443"`, "trust_domains[1].name"},
	{"validator with a workload trust domain selector", func(r *translate.Resources) {
		editValidator(listenerNamed(*r, in), func(v *tlsv3.SPIFFECertValidatorConfig) { v.TrustDomains[1].WorkloadTrustDomain = "mesh.test" })
	}, `listener "inbound|8443"`, "trust_domains[1].workload_trust_domain: not supported"},
	{"another certificate validator", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.CustomValidatorConfig.Name = "envoy.tls.cert_validator.default"
		})
	}, `listener "inbound|8443"`, "custom_validator_config.name"},
	{"inbound combined validation without the validator", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.CustomValidatorConfig = nil
		})
	}, `listener "inbound|8443"`, "custom_validator_config: missing"},
	{"inbound combined validation with SAN matchers", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames = []*tlsv3.SubjectAltNameMatcher{{SanType: tlsv3.SubjectAltNameMatcher_URI, Matcher: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: "spiffe://partner.test/x"}}}}
		})
	}, `listener "inbound|8443"`, "match_typed_subject_alt_names: not supported"},
	{"federated bundle by SDS reference", func(r *translate.Resources) {
		editDownstream(listenerNamed(*r, in), func(d *tlsv3.DownstreamTlsContext) {
			d.CommonTlsContext.GetCombinedValidationContext().ValidationContextSdsSecretConfig.Name = "spiffe://partner.test"
		})
	}, `listener "inbound|8443"`, "validation_context_sds_secret_config.name"},
	{"server of a trust domain the validator does not name", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, outP), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: "spiffe://third.test/pay"}}
		})
	}, `cluster "outbound|9003"`, "spiffe://third.test/pay is outside the trust domain mesh.test and of no trust domain the cluster's envoy.tls.cert_validator.spiffe names"},
	{"server of a federated trust domain without the validator", func(r *translate.Resources) {
		editUpstream(clusterNamed(*r, outP), func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.CustomValidatorConfig = nil
		})
	}, `cluster "outbound|9003"`, "is outside the trust domain mesh.test"},
	// The PROXY protocol header: exactly the socket the translation emits.
	{"PROXY protocol v1", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) { p.Config.Version = core.ProxyProtocolConfig_V1 })
	}, `cluster "inbound|8443|app"`, "config.version: V1 is not supported"},
	{"PROXY protocol TLV with a static value", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) {
			p.Config.AddedTlvs = append(p.Config.AddedTlvs, &core.TlvEntry{Type: 0xE0, Value: []byte("spiffe://mesh.test/ns/shop/sa/admin")})
		})
	}, `cluster "inbound|8443|app"`, "config.added_tlvs[2]: type 0xe0"},
	{"PROXY protocol SPIFFE ID TLV filled with something else", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) {
			p.Config.AddedTlvs[0].FormatString = inlineFormat("%REQ(x-spiffe-id)%")
		})
	}, `cluster "inbound|8443|app"`, "config.added_tlvs[0]: type 0xe0"},
	{"PROXY protocol TLV twice", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) {
			p.Config.AddedTlvs[1] = p.Config.AddedTlvs[0]
		})
	}, `cluster "inbound|8443|app"`, "config.added_tlvs[1]: type 0xe0 given twice"},
	{"PROXY protocol without the fingerprint TLV", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) {
			p.Config.AddedTlvs = p.Config.AddedTlvs[:1]
		})
	}, `cluster "inbound|8443|app"`, "config.added_tlvs: want exactly latch's TLVs"},
	{"PROXY protocol pass-through TLVs", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) {
			p.Config.PassThroughTlvs = &core.ProxyProtocolPassThroughTLVs{}
		})
	}, `cluster "inbound|8443|app"`, "config.pass_through_tlvs: not supported"},
	{"PROXY protocol with unspecified addresses", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) { p.AllowUnspecifiedAddress = true })
	}, `cluster "inbound|8443|app"`, "allow_unspecified_address: not supported"},
	{"PROXY protocol over TLS to the app", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) {
			p.TransportSocket = clusterNamed(*r, out).TransportSocket
		})
	}, `cluster "inbound|8443|app"`, "typed_config.transport_socket.name"},
	{"PROXY protocol without a config", func(r *translate.Resources) {
		editProxyProtocol(clusterNamed(*r, app), func(p *proxyprotocol.ProxyProtocolUpstreamTransport) { p.Config = nil })
	}, `cluster "inbound|8443|app"`, "typed_config.config: missing"},
	{"PROXY protocol towards an upstream", func(r *translate.Resources) {
		clusterNamed(*r, out).TransportSocket = clusterNamed(*r, app).TransportSocket
	}, `cluster "outbound|9001"`, "transport_socket: used by outbound listener \"outbound|9001\": the PROXY protocol header is for the app"},
	{"original destination cluster", func(r *translate.Resources) {
		clusterNamed(*r, outD).ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST}
	}, `cluster "outbound|9002"`, "type: ORIGINAL_DST is not supported"},
	{"EDS from another source", func(r *translate.Resources) {
		clusterNamed(*r, out).EdsClusterConfig.EdsConfig = &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Self{Self: &core.SelfConfigSource{}}}
	}, `cluster "outbound|9001"`, "eds_config: only ADS"},
	{"cluster circuit breakers", func(r *translate.Resources) {
		clusterNamed(*r, out).CircuitBreakers = &cluster.CircuitBreakers{}
	}, `cluster "outbound|9001"`, "circuit_breakers: not supported"},
	{"endpoint over a pipe", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints[0].LbEndpoints[0].GetEndpoint().Address = &core.Address{Address: &core.Address_Pipe{Pipe: &core.Pipe{Path: "/x"}}}
	}, `endpoints "outbound|9001"`, "endpoints[0].lb_endpoints[0].endpoint.address.pipe: not supported"},
	// Found by FuzzBuild: hosts the sidecar's config refuses must be
	// NACKed here, naming the resource and field.
	{"endpoint host with a space", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().Address = "db local"
	}, `endpoints "outbound|9001"`, `endpoint.address.socket_address.address: host "db local" is not a host name or IP address`},
	{"endpoint host with a slash", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().Address = "10.0.0.0/8"
	}, `endpoints "outbound|9001"`, `address: host "10.0.0.0/8" is not a host name or IP address`},
	{"endpoint with ipv4_compat", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().Ipv4Compat = true
	}, `endpoints "outbound|9001"`, "endpoint.address.socket_address.ipv4_compat: not supported"},
	{"endpoint health check config", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints[0].LbEndpoints[0].GetEndpoint().HealthCheckConfig = &endpoint.Endpoint_HealthCheckConfig{PortValue: 1}
	}, `endpoints "outbound|9001"`, "endpoint.health_check_config: not supported"},
	// Found by FuzzUpdate: an empty assignment left an outbound listener
	// without upstreams, which the proxy refused only after the ACK.
	{"endpoints empty", func(r *translate.Resources) {
		r.Endpoints[0].Endpoints = nil
	}, `endpoints "outbound|9001"`, `endpoints: no usable endpoint (none listed, or all unhealthy, draining or timed out) for outbound listener`},
	// Found by reading Build against proxy.Config.Validate while fixing the
	// above: two listeners on one address passed and the proxy refused it.
	{"inbound listener on the outbound listener's address", func(r *translate.Resources) {
		o := listenerNamed(*r, out).Address.GetSocketAddress()
		i := listenerNamed(*r, in).Address.GetSocketAddress()
		i.Address, i.PortSpecifier = o.Address, o.PortSpecifier
	}, `listener "outbound|9001"`, `address: 127.0.0.1:9001 is also the address of listener "inbound|8443"`},
	{"endpoints all unhealthy", func(r *translate.Resources) {
		for _, g := range r.Endpoints[0].Endpoints {
			for _, e := range g.LbEndpoints {
				e.HealthStatus = core.HealthStatus_UNHEALTHY
			}
		}
	}, `endpoints "outbound|9001"`, "endpoints: no usable endpoint"},
}

func TestValidationHostile(t *testing.T) {
	if len(hostileCases) < 20 {
		t.Fatalf("only %d hostile cases", len(hostileCases))
	}
	for _, tc := range hostileCases {
		t.Run(tc.name, func(t *testing.T) {
			r := goodResources(t)
			tc.edit(&r)
			cfg, err := build(validator(), r)
			if err == nil {
				t.Fatalf("accepted: %+v", cfg)
			}
			if errors.Is(err, ErrIncomplete) {
				t.Fatalf("treated as incomplete, not refused: %v", err)
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error %T is not a *ValidationError: %v", err, err)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, tc.resource+": ") || !strings.Contains(msg, tc.field) {
				t.Errorf("error does not name %s and %q:\n%s", tc.resource, tc.field, msg)
			}
		})
	}
}

// FuzzValidate: arbitrary bytes as any resource type never panic the
// validator, and whatever it accepts builds a config whose outbound
// listeners are on loopback and whose clusters name a server.
func FuzzValidate(f *testing.F) {
	r := goodResources(f)
	for _, l := range r.Listeners {
		b, _ := proto.Marshal(l)
		f.Add(uint8(0), b)
	}
	for _, c := range r.Clusters {
		b, _ := proto.Marshal(c)
		f.Add(uint8(1), b)
	}
	for _, e := range r.Endpoints {
		b, _ := proto.Marshal(e)
		f.Add(uint8(2), b)
	}
	types := []string{ListenerType, ClusterType, EndpointType}
	f.Fuzz(func(t *testing.T, typ uint8, b []byte) {
		v := validator()
		a := &anypb.Any{TypeUrl: types[int(typ)%3], Value: b}
		switch int(typ) % 3 {
		case 0:
			l, err := v.Listener(a)
			if err == nil && !l.Inbound {
				if host := l.Listen[:strings.LastIndex(l.Listen, ":")]; host != "127.0.0.1" && !strings.HasPrefix(host, "127.") && host != "[::1]" && host != "::1" {
					t.Fatalf("accepted outbound listener on %s", l.Listen)
				}
			}
		case 1:
			_, _ = v.Cluster(a)
		case 2:
			_, _ = v.Endpoints(a)
		}
	})
}

// TestListenerErrorNamesTheListener: should Build's checks and the proxy's
// ever drift apart, the NACK still names the xDS listener, not an index into
// the proxy's config.
func TestListenerErrorNamesTheListener(t *testing.T) {
	cfg := &proxy.Config{
		Inbound:  []proxy.Inbound{{Name: "inbound|8443"}},
		Outbound: []proxy.Outbound{{Name: "outbound|9001"}, {Name: "outbound|9002"}},
	}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&proxy.FieldError{Field: "outbound[1].upstreams", Err: errors.New("at least one upstream is required")},
			`listener "outbound|9002": (latch config) upstreams: at least one upstream is required`},
		{&proxy.FieldError{Field: "inbound[0].app", Err: errors.New("bad")}, `listener "inbound|8443": (latch config) app: bad`},
		{errors.New("profile too weak"), `listener "": the resulting config is refused: profile too weak`},
	} {
		err := listenerError(cfg, tc.err)
		if _, ok := errors.AsType[*ValidationError](err); !ok || err.Error() != tc.want {
			t.Errorf("listenerError(%v) = %v (%T), want %s", tc.err, err, err, tc.want)
		}
	}
}

// TestRBACWorkloadPrefixStaysAPathPrefix: a principal prefix below a
// workload's ID (with its exact principal) becomes a pathPrefix rule, and
// never one that admits the rest of the trust domain.
func TestRBACWorkloadPrefixStaysAPathPrefix(t *testing.T) {
	r := goodResources(t)
	editRBAC(listenerNamed(r, translate.InboundName(8443)), func(x *rbac.RBAC) {
		*principals(x) = []*rbacconfig.Principal{
			authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: "spiffe://mesh.test/ns/prod/sa/db-admin"}}),
			authPrincipal(&matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://mesh.test/ns/prod/sa/db-admin/"}}),
		}
	})
	cfg, err := build(validator(), r)
	if err != nil {
		t.Fatal(err)
	}
	allow := cfg.Inbound[0].Allow
	want := identity.NewAllowList(identity.AllowPathPrefix(spiffeid.RequireFromString("spiffe://mesh.test/ns/prod/sa/db-admin")))
	if !allow.Equal(want) {
		t.Fatalf("allow = %v, want %v", allow, want)
	}
	if allow.Allows(spiffeid.RequireFromString("spiffe://mesh.test/ns/dev/sa/web")) {
		t.Error("a workload outside the prefix is admitted")
	}
}

// TestInboundOnEveryAddress: an inbound listener on an unspecified address,
// IPv6 or IPv4, with or without ipv4_compat, is bound as Go's empty host:
// every address of the pod, both families.
func TestInboundOnEveryAddress(t *testing.T) {
	for _, tc := range []struct {
		host   string
		compat bool
		listen string
	}{
		{"::", true, ":8443"},
		{"::", false, ":8443"},
		{"0.0.0.0", false, ":8443"},
		{"::1", false, "[::1]:8443"},
		{"127.0.0.1", false, "127.0.0.1:8443"},
	} {
		r := goodResources(t)
		sa := listenerNamed(r, translate.InboundName(8443)).Address.GetSocketAddress()
		sa.Address, sa.Ipv4Compat = tc.host, tc.compat
		cfg, err := build(validator(), r)
		if err != nil {
			t.Fatalf("%s (ipv4_compat %v): %v", tc.host, tc.compat, err)
		}
		if got := cfg.Inbound[0].Listen; got != tc.listen {
			t.Errorf("%s (ipv4_compat %v): listen %q, want %q", tc.host, tc.compat, got, tc.listen)
		}
	}
}
