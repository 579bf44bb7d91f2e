package translate

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	proxyprotocol "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/proxy_protocol/v3"
	rawbuffer "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
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
)

// Names of the Envoy extensions in the subset latch speaks.
const (
	RBACFilter         = "envoy.filters.network.rbac"
	TCPProxyFilter     = "envoy.filters.network.tcp_proxy"
	TLSTransportSocket = "envoy.transport_sockets.tls"
	// ProxyProtocolTransportSocket sends a PROXY protocol header on an
	// upstream connection; on an inbound listener's app cluster it is
	// latch's proxyProtocol: v2. It wraps RawBufferTransportSocket: the
	// connection to the app is plain TCP.
	ProxyProtocolTransportSocket = "envoy.transport_sockets.upstream_proxy_protocol"
	RawBufferTransportSocket     = "envoy.transport_sockets.raw_buffer"
	// SPIFFECertValidator is Envoy's SPIFFE certificate validator; its
	// trust_domains list says which trust domains a listener or cluster
	// accepts peers of: the workload's own and those it federates with.
	// Their bundles come from the Workload API, never over xDS.
	SPIFFECertValidator = "envoy.tls.cert_validator.spiffe"
)

// ProxyProtocolTLVs are the added_tlvs of an app cluster's PROXY protocol
// transport socket: the TLVs latch adds besides PP2_TYPE_SSL, each with the
// Envoy format string that fills it with the same value (docs/configuration.md
// lists them). Envoy itself sends no PP2_TYPE_SSL on upstream connections;
// a latch sidecar always does, the connection it carries being TLS.
func ProxyProtocolTLVs() []*core.TlvEntry {
	entry := func(typ byte, format string) *core.TlvEntry {
		return &core.TlvEntry{Type: uint32(typ), FormatString: &core.SubstitutionFormatString{
			Format: &core.SubstitutionFormatString_TextFormatSource{TextFormatSource: &core.DataSource{
				Specifier: &core.DataSource_InlineString{InlineString: format},
			}},
		}}
	}
	return []*core.TlvEntry{
		entry(proxy.TLVSPIFFEID, "%DOWNSTREAM_PEER_URI_SAN%"),
		entry(proxy.TLVPeerCertSHA256, "%DOWNSTREAM_PEER_FINGERPRINT_256%"),
	}
}

// DefaultSDSCluster is the Envoy cluster name SPIRE's documentation gives the
// agent's SDS service; latch resolves the secrets from the Workload API and
// only keeps the reference so Envoy could consume the same resources.
const DefaultSDSCluster = "spire_agent"

// DefaultInboundHost binds inbound listeners on every address of the pod,
// IPv4 and IPv6: in Envoy's reading "::" with ipv4_compat, which the
// translation sets on it. ("0.0.0.0" would say IPv4 only to Envoy, although a
// latch sidecar, binding through Go, takes every unspecified address for both
// families.)
const DefaultInboundHost = "::"

// Options shape the resources; the zero value is the production default.
type Options struct {
	// InboundHost is the address inbound listeners bind (DefaultInboundHost
	// if empty).
	InboundHost string
	// SDSCluster names the SDS cluster in secret references (DefaultSDSCluster
	// if empty).
	SDSCluster string
}

// Resources are the Envoy resources of one node, each list sorted by name.
type Resources struct {
	Listeners []*listener.Listener
	Clusters  []*cluster.Cluster
	Endpoints []*endpoint.ClusterLoadAssignment
}

// Listener and cluster names. They are stable across translations, so a
// sidecar keeps a listener's socket while its port does not change.
func InboundName(port uint32) string    { return "inbound|" + strconv.FormatUint(uint64(port), 10) }
func AppClusterName(port uint32) string { return InboundName(port) + "|app" }
func OutboundName(port uint32) string   { return "outbound|" + strconv.FormatUint(uint64(port), 10) }

// BundleSecretName is the SDS name SPIRE gives a trust domain's bundle.
func BundleSecretName(td spiffeid.TrustDomain) string { return td.IDString() }

// Translate turns one declaration into the resources its sidecar serves. It
// is a pure function of its arguments.
func Translate(d policy.Declaration, opts Options) Resources {
	if opts.InboundHost == "" {
		opts.InboundHost = DefaultInboundHost
	}
	if opts.SDSCluster == "" {
		opts.SDSCluster = DefaultSDSCluster
	}
	t := translator{decl: d, opts: opts}
	var r Resources
	for _, in := range d.Inbound {
		r.Listeners = append(r.Listeners, t.inboundListener(in))
		app := plainCluster(AppClusterName(in.Port), in.App)
		if in.ProxyProtocol {
			app.TransportSocket = proxyProtocolSocket()
		}
		r.Clusters = append(r.Clusters, app)
	}
	for _, out := range d.Outbound {
		r.Listeners = append(r.Listeners, t.outboundListener(out))
		c, cla := t.outboundCluster(out)
		r.Clusters = append(r.Clusters, c)
		if cla != nil {
			r.Endpoints = append(r.Endpoints, cla)
		}
	}
	slices.SortFunc(r.Listeners, func(a, b *listener.Listener) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(r.Clusters, func(a, b *cluster.Cluster) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(r.Endpoints, func(a, b *endpoint.ClusterLoadAssignment) int {
		return strings.Compare(a.ClusterName, b.ClusterName)
	})
	return r
}

// Hash is a content hash of the resources, used as the snapshot version: the
// same declarations give the same version on every control-plane replica.
func (r Resources) Hash() string {
	det := proto.MarshalOptions{Deterministic: true}
	marshal := func(kind string, m proto.Message) []byte {
		b, err := det.Marshal(m)
		if err != nil {
			panic(fmt.Sprintf("marshalling %s: %v", kind, err)) // resources built here always marshal
		}
		return b
	}
	var e Encoded
	for _, l := range r.Listeners {
		e.Listeners = append(e.Listeners, marshal("listener", l))
	}
	for _, c := range r.Clusters {
		e.Clusters = append(e.Clusters, marshal("cluster", c))
	}
	for _, ep := range r.Endpoints {
		e.Endpoints = append(e.Endpoints, marshal("endpoints", ep))
	}
	return e.Hash()
}

// Encoded is Resources, each already marshalled deterministically, in the
// same order.
type Encoded struct {
	Listeners, Clusters, Endpoints [][]byte
}

// Hash is the Hash of the Resources e was marshalled from: a server that
// holds resources marshalled needs not marshal them again to version them.
func (e Encoded) Hash() string {
	h := sha256.New()
	add := func(kind string, b []byte) {
		fmt.Fprintf(h, "%s %d\n", kind, len(b))
		h.Write(b)
	}
	for _, b := range e.Listeners {
		add("listener", b)
	}
	for _, b := range e.Clusters {
		add("cluster", b)
	}
	for _, b := range e.Endpoints {
		add("endpoints", b)
	}
	// 16 hex digits: only the first 8 bytes are encoded, so the version
	// does not keep the other 48 digits of the sum alive with it.
	return hex.EncodeToString(h.Sum(nil)[:8])
}

type translator struct {
	decl policy.Declaration
	opts Options
}

func (t translator) sdsConfig() *core.ConfigSource {
	return &core.ConfigSource{
		ResourceApiVersion: core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_ApiConfigSource{ApiConfigSource: &core.ApiConfigSource{
			ApiType:             core.ApiConfigSource_GRPC,
			TransportApiVersion: core.ApiVersion_V3,
			GrpcServices: []*core.GrpcService{{
				TargetSpecifier: &core.GrpcService_EnvoyGrpc_{EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: t.opts.SDSCluster}},
			}},
		}},
	}
}

// svidSecret references the workload's own SVID, named by its SPIFFE ID.
func (t translator) svidSecret() []*tlsv3.SdsSecretConfig {
	return []*tlsv3.SdsSecretConfig{{Name: t.decl.ID.String(), SdsConfig: t.sdsConfig()}}
}

func (t translator) bundleSecret(td spiffeid.TrustDomain) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: BundleSecretName(td), SdsConfig: t.sdsConfig()}
}

// spiffeValidator is the SPIFFE certificate validator accepting the
// workload's own trust domain and those of federated, by name only.
func (t translator) spiffeValidator(federated []spiffeid.TrustDomain) *core.TypedExtensionConfig {
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	for _, td := range append([]spiffeid.TrustDomain{t.decl.ID.TrustDomain()}, federated...) {
		cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{Name: td.Name()})
	}
	return &core.TypedExtensionConfig{Name: SPIFFECertValidator, TypedConfig: mustAny(cfg)}
}

func (t translator) inboundListener(in policy.Inbound) *listener.Listener {
	name := InboundName(in.Port)
	tlsCtx := &tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: t.svidSecret(),
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: t.bundleSecret(t.decl.ID.TrustDomain()),
			},
		},
	}
	if len(in.FederatesWith) > 0 {
		// Federation: Envoy's SPIFFE validator lists the accepted trust
		// domains next to the reference to the workload's own bundle.
		tlsCtx.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{CustomValidatorConfig: t.spiffeValidator(in.FederatesWith)},
				ValidationContextSdsSecretConfig: t.bundleSecret(t.decl.ID.TrustDomain()),
			},
		}
	}
	return &listener.Listener{
		Name:             name,
		Address:          inboundAddress(t.opts.InboundHost, in.Port),
		TrafficDirection: core.TrafficDirection_INBOUND,
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{
				filter(RBACFilter, &rbac.RBAC{StatPrefix: name, Rules: allowRules(in.Allow)}),
				filter(TCPProxyFilter, tcpProxy(name, AppClusterName(in.Port), in.IdleTimeout)),
			},
			TransportSocket: transportSocket(tlsCtx),
		}},
	}
}

func (t translator) outboundListener(out policy.Outbound) *listener.Listener {
	name := OutboundName(out.Port)
	return &listener.Listener{
		Name:             name,
		Address:          socketAddress("127.0.0.1", out.Port),
		TrafficDirection: core.TrafficDirection_OUTBOUND,
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{filter(TCPProxyFilter, tcpProxy(name, name, out.IdleTimeout))},
		}},
	}
}

// outboundCluster returns the mTLS cluster of an upstream and, when its
// endpoints are IP addresses, the ClusterLoadAssignment served over EDS.
// Host names go in a STRICT_DNS cluster's inline assignment instead, as EDS
// endpoints must be addresses.
func (t translator) outboundCluster(out policy.Outbound) (*cluster.Cluster, *endpoint.ClusterLoadAssignment) {
	name := OutboundName(out.Port)
	tlsCtx := &tlsv3.UpstreamTlsContext{
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: t.svidSecret(),
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
				CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
					DefaultValidationContext: &tlsv3.CertificateValidationContext{
						MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
							SanType: tlsv3.SubjectAltNameMatcher_URI,
							Matcher: exact(out.ServerID.String()),
						}},
					},
					ValidationContextSdsSecretConfig: t.bundleSecret(t.decl.ID.TrustDomain()),
				},
			},
		},
	}
	if len(out.FederatesWith) > 0 {
		tlsCtx.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.CustomValidatorConfig = t.spiffeValidator(out.FederatesWith)
	}
	cla := loadAssignment(name, out.Endpoints)
	c := &cluster.Cluster{
		Name:            name,
		ConnectTimeout:  durationpb.New(5 * time.Second),
		TransportSocket: transportSocket(tlsCtx),
	}
	if allIPs(out.Endpoints) {
		c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_EDS}
		c.EdsClusterConfig = &cluster.Cluster_EdsClusterConfig{EdsConfig: &core.ConfigSource{
			ResourceApiVersion:    core.ApiVersion_V3,
			ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
		}}
		return c, cla
	}
	c.ClusterDiscoveryType = &cluster.Cluster_Type{Type: cluster.Cluster_STRICT_DNS}
	c.LoadAssignment = cla
	return c, nil
}

// plainCluster is the application behind an inbound listener: plain TCP.
func plainCluster(name, addr string) *cluster.Cluster {
	typ := cluster.Cluster_STATIC
	if !allIPs([]string{addr}) {
		typ = cluster.Cluster_STRICT_DNS
	}
	return &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(5 * time.Second),
		LoadAssignment:       loadAssignment(name, []string{addr}),
	}
}

// loadAssignment puts each endpoint at its own priority, in order: Envoy then
// fails over in the declared order, which is what the latch proxy does.
func loadAssignment(name string, addrs []string) *endpoint.ClusterLoadAssignment {
	cla := &endpoint.ClusterLoadAssignment{ClusterName: name}
	for i, a := range addrs {
		host, port, _ := net.SplitHostPort(a) // validated by the policy decoder
		p, _ := strconv.ParseUint(port, 10, 32)
		cla.Endpoints = append(cla.Endpoints, &endpoint.LocalityLbEndpoints{
			Priority: uint32(i),
			LbEndpoints: []*endpoint.LbEndpoint{{
				HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: socketAddress(host, uint32(p))}},
			}},
		})
	}
	return cla
}

// allowRules renders an allow-list as an RBAC ALLOW policy on the peer's
// certificate URI SAN. No rules at all would make Envoy's filter allow
// everyone; an ALLOW action with no policy denies everyone, which is what an
// empty allow-list means.
func allowRules(rules []identity.Rule) *rbacconfig.RBAC {
	out := &rbacconfig.RBAC{Action: rbacconfig.RBAC_ALLOW, Policies: map[string]*rbacconfig.Policy{}}
	if len(rules) == 0 {
		return out
	}
	var principals []*rbacconfig.Principal
	for _, r := range rules {
		switch r.Kind() {
		case identity.MatchID:
			principals = append(principals, principal(exact(r.Value())))
		case identity.MatchTrustDomain:
			principals = append(principals, principal(prefix(r.TrustDomain().IDString()+"/")))
		case identity.MatchPathPrefix:
			// The prefix itself, and everything below it segment by segment:
			// a bare string prefix would let /ns/prod match /ns/production.
			principals = append(principals, principal(exact(r.Value())), principal(prefix(r.Value()+"/")))
		}
	}
	out.Policies["allow"] = &rbacconfig.Policy{
		Permissions: []*rbacconfig.Permission{{Rule: &rbacconfig.Permission_Any{Any: true}}},
		Principals:  principals,
	}
	return out
}

func principal(m *matcher.StringMatcher) *rbacconfig.Principal {
	return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_Authenticated_{
		Authenticated: &rbacconfig.Principal_Authenticated{PrincipalName: m},
	}}
}

func exact(s string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: s}}
}

func prefix(s string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: s}}
}

func tcpProxy(statPrefix, clusterName string, idle time.Duration) *tcpproxy.TcpProxy {
	tp := &tcpproxy.TcpProxy{
		StatPrefix:       statPrefix,
		ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: clusterName},
	}
	if idle > 0 {
		tp.IdleTimeout = durationpb.New(idle)
	}
	return tp
}

func filter(name string, cfg proto.Message) *listener.Filter {
	return &listener.Filter{Name: name, ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(cfg)}}
}

// proxyProtocolSocket is the app cluster's transport socket of a listener
// with proxyProtocol: v2: Envoy's upstream PROXY protocol socket, version 2
// with latch's TLVs, over plain TCP.
func proxyProtocolSocket() *core.TransportSocket {
	return &core.TransportSocket{Name: ProxyProtocolTransportSocket, ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: mustAny(
		&proxyprotocol.ProxyProtocolUpstreamTransport{
			Config: &core.ProxyProtocolConfig{Version: core.ProxyProtocolConfig_V2, AddedTlvs: ProxyProtocolTLVs()},
			TransportSocket: &core.TransportSocket{Name: RawBufferTransportSocket,
				ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: mustAny(&rawbuffer.RawBuffer{})}},
		})}}
}

func transportSocket(cfg proto.Message) *core.TransportSocket {
	return &core.TransportSocket{Name: TLSTransportSocket, ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: mustAny(cfg)}}
}

// inboundAddress is socketAddress with ipv4_compat set on the IPv6
// unspecified address, so that Envoy too reads it as both families.
func inboundAddress(host string, port uint32) *core.Address {
	a := socketAddress(host, port)
	if ip, err := netip.ParseAddr(host); err == nil && ip.Is6() && ip.IsUnspecified() {
		a.GetSocketAddress().Ipv4Compat = true
	}
	return a
}

func socketAddress(host string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address:       host,
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

func allIPs(addrs []string) bool {
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if err != nil || net.ParseIP(host) == nil {
			return false
		}
	}
	return true
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("packing %T: %v", m, err)) // only fails for nil
	}
	return a
}
