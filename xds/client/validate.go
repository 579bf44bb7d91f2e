package client

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
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
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/translate"
)

// Type URLs of the resources the client subscribes to.
const (
	ListenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	ClusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	EndpointType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
)

// ValidationError is why an update was refused (NACKed). It names the
// resource and the field, and is sent back to the control plane verbatim as
// the NACK's error_detail.
type ValidationError struct {
	Type     string // "listener", "cluster", "endpoints"
	Resource string // resource name ("" when the resource could not be decoded)
	Field    string // proto field path within the resource
	Reason   string
}

func (e *ValidationError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("%s %q: %s", e.Type, e.Resource, e.Reason)
	}
	return fmt.Sprintf("%s %q: %s: %s", e.Type, e.Resource, e.Field, e.Reason)
}

// ErrIncomplete means the resources refer to others not received yet (a
// listener's cluster, an EDS cluster's endpoints). Not a reason to refuse:
// the rest of the update is on its way.
var ErrIncomplete = errors.New("update incomplete")

// Validator holds what resources are checked against: the sidecar's own
// identity (the only SVID it can present), the TLS profile xDS may narrow
// but never widen, and whether an inbound listener's app may be anywhere but
// on loopback.
type Validator struct {
	NodeID  spiffeid.ID
	Profile identity.Profile
	// AllowNonLoopbackApp lets an inbound listener's app be a non-loopback
	// address. Off, the control plane can only point inbound listeners at
	// the pod's own loopback: an app elsewhere receives admitted peers in
	// plain TCP, so a control plane that could choose it could relay them
	// to any address the pod reaches.
	AllowNonLoopbackApp bool
}

// Listener is a validated listener.
type Listener struct {
	Name    string
	Inbound bool
	Listen  string
	Cluster string
	Allow   identity.AllowList // inbound only
	Idle    time.Duration
	TLS     *identity.Profile // narrowed profile, when tls_params were given
	// FederatesWith are the foreign trust domains the listener's SPIFFE
	// certificate validator names (inbound only).
	FederatesWith []spiffeid.TrustDomain
	resource      string
}

// Cluster is a validated cluster.
type Cluster struct {
	Name           string
	ServerID       spiffeid.ID // zero for a plain (app) cluster
	EDSName        string      // the ClusterLoadAssignment to wait for; "" for inline endpoints
	Endpoints      []string
	ConnectTimeout time.Duration
	TLS            *identity.Profile
	// ProxyProtocol: a plain cluster whose connections start with latch's
	// PROXY protocol v2 header (an inbound listener's app only).
	ProxyProtocol bool
	// FederatesWith are the foreign trust domains the cluster's SPIFFE
	// certificate validator names: ServerID may be in one of them.
	FederatesWith []spiffeid.TrustDomain
	// DisableSessionResumption: the UpstreamTlsContext keeps no session
	// (max_session_keys: 0).
	DisableSessionResumption bool
}

// Endpoints is a validated ClusterLoadAssignment.
type Endpoints struct {
	Name  string
	Addrs []string
}

type checker struct {
	v    Validator
	typ  string
	name string
}

func (c *checker) fail(field, format string, args ...any) error {
	return &ValidationError{Type: c.typ, Resource: c.name, Field: field, Reason: fmt.Sprintf(format, args...)}
}

// only refuses any populated field of m not in allowed, and any field this
// build of the Envoy API does not know: something latch does not implement
// could change what the resource means for security, so it is never ignored.
func (c *checker) only(m proto.Message, path string, allowed ...string) error {
	r := m.ProtoReflect()
	if len(r.GetUnknown()) > 0 {
		return c.fail(path, "carries fields unknown to latch's Envoy API version")
	}
	var bad string
	r.Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		if !slices.Contains(allowed, string(fd.Name())) {
			bad = string(fd.Name())
			return false
		}
		return true
	})
	if bad != "" {
		return c.fail(join(path, bad), "not supported by latch")
	}
	return nil
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

func unpack[T proto.Message](c *checker, a *anypb.Any, path string, into T) (T, error) {
	if a == nil {
		return into, c.fail(path, "missing")
	}
	want := "type.googleapis.com/" + string(into.ProtoReflect().Descriptor().FullName())
	if a.GetTypeUrl() != want {
		return into, c.fail(path, "type %s is not supported here (want %s)", a.GetTypeUrl(), want)
	}
	if err := a.UnmarshalTo(into); err != nil {
		return into, c.fail(path, "decoding: %v", err)
	}
	return into, nil
}

// Listener validates one Listener resource.
func (v Validator) Listener(a *anypb.Any) (Listener, error) {
	c := &checker{v: v, typ: "listener"}
	l, err := unpack(c, a, "", &listener.Listener{})
	if err != nil {
		return Listener{}, err
	}
	c.name = l.GetName()
	if err := c.envoyRules(l); err != nil {
		return Listener{}, err
	}
	if err := proxy.CheckName(c.name); err != nil {
		return Listener{}, c.fail("name", "%v", err)
	}
	if err := c.only(l, "", "name", "address", "filter_chains", "traffic_direction", "stat_prefix"); err != nil {
		return Listener{}, err
	}
	out := Listener{Name: l.GetName(), resource: l.GetName()}
	host, port, err := c.socketAddress(l.GetAddress(), "address", "ipv4_compat")
	if err != nil {
		return Listener{}, err
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return Listener{}, c.fail("address.socket_address.address", "%q is not an IP address", host)
	}
	bind := host
	if ip.IsUnspecified() {
		// "::" or "0.0.0.0": every address of the pod. Go binds the empty
		// host as one socket for IPv4 and IPv6 where the kernel has IPv6, and
		// as IPv4 where IPv6 is disabled at boot, where "[::]" would not bind
		// at all. Envoy's ipv4_compat asks for the same; latch always does it.
		bind = ""
	}
	out.Listen = net.JoinHostPort(bind, strconv.Itoa(int(port)))

	if len(l.GetFilterChains()) != 1 {
		return Listener{}, c.fail("filter_chains", "want exactly one filter chain, got %d", len(l.GetFilterChains()))
	}
	fc := l.GetFilterChains()[0]
	if err := c.only(fc, "filter_chains[0]", "filters", "transport_socket", "name"); err != nil {
		return Listener{}, err
	}
	out.Inbound = fc.GetTransportSocket() != nil
	switch dir := l.GetTrafficDirection(); {
	case dir == core.TrafficDirection_INBOUND && !out.Inbound:
		return Listener{}, c.fail("filter_chains[0].transport_socket", "an INBOUND listener must terminate TLS")
	case dir == core.TrafficDirection_OUTBOUND && out.Inbound:
		return Listener{}, c.fail("traffic_direction", "an OUTBOUND listener cannot terminate TLS")
	}
	if !out.Inbound && !ip.IsLoopback() {
		// A plain listener reachable from the network would relay anyone
		// into the mesh with this workload's identity.
		return Listener{}, c.fail("address.socket_address.address", "outbound (plain) listener on %s: must be a loopback address", host)
	}

	filters := fc.GetFilters()
	want := []string{translate.TCPProxyFilter}
	if out.Inbound {
		want = []string{translate.RBACFilter, translate.TCPProxyFilter}
	}
	for i, f := range filters {
		path := fmt.Sprintf("filter_chains[0].filters[%d]", i)
		if err := c.only(f, path, "name", "typed_config"); err != nil {
			return Listener{}, err
		}
		if i >= len(want) || f.GetName() != want[i] {
			return Listener{}, c.fail(path+".name", "filter %q is not supported here (want the filters %s, in that order)", f.GetName(), strings.Join(want, ", "))
		}
		switch f.GetName() {
		case translate.RBACFilter:
			cfg, err := unpack(c, f.GetTypedConfig(), path+".typed_config", &rbac.RBAC{})
			if err != nil {
				return Listener{}, err
			}
			if out.Allow, err = c.rbac(cfg, path+".typed_config"); err != nil {
				return Listener{}, err
			}
		case translate.TCPProxyFilter:
			cfg, err := unpack(c, f.GetTypedConfig(), path+".typed_config", &tcpproxy.TcpProxy{})
			if err != nil {
				return Listener{}, err
			}
			if err := c.only(cfg, path+".typed_config", "stat_prefix", "cluster", "idle_timeout"); err != nil {
				return Listener{}, err
			}
			if out.Cluster = cfg.GetCluster(); out.Cluster == "" {
				return Listener{}, c.fail(path+".typed_config.cluster", "missing")
			}
			if it := cfg.GetIdleTimeout(); it != nil {
				if d := it.AsDuration(); it.CheckValid() != nil || d <= 0 {
					// Envoy reads 0 as "never time out"; latch always does.
					return Listener{}, c.fail(path+".typed_config.idle_timeout", "%v: must be positive", d)
				}
				out.Idle = it.AsDuration()
			}
		}
	}
	if len(filters) != len(want) {
		return Listener{}, c.fail("filter_chains[0].filters", "want the filters %s, in that order; got %d filters", strings.Join(want, ", "), len(filters))
	}

	if out.Inbound {
		ts := fc.GetTransportSocket()
		if err := c.transportSocket(ts, "filter_chains[0].transport_socket"); err != nil {
			return Listener{}, err
		}
		path := "filter_chains[0].transport_socket.typed_config"
		dtc, err := unpack(c, ts.GetTypedConfig(), path, &tlsv3.DownstreamTlsContext{})
		if err != nil {
			return Listener{}, err
		}
		if err := c.only(dtc, path, "common_tls_context", "require_client_certificate"); err != nil {
			return Listener{}, err
		}
		if !dtc.GetRequireClientCertificate().GetValue() {
			return Listener{}, c.fail(path+".require_client_certificate", "must be true: every peer proves its SPIFFE ID")
		}
		ctx := dtc.GetCommonTlsContext()
		cp := path + ".common_tls_context"
		if out.TLS, err = c.commonTLS(ctx, cp, "validation_context_sds_secret_config", "combined_validation_context", "tls_params", "tls_certificate_sds_secret_configs"); err != nil {
			return Listener{}, err
		}
		// Either the workload's own bundle alone, or (federation) that
		// bundle with the SPIFFE validator naming the accepted trust
		// domains.
		cvc := ctx.GetCombinedValidationContext()
		if cvc == nil {
			if err := c.bundleSecret(ctx.GetValidationContextSdsSecretConfig(), cp+".validation_context_sds_secret_config", v.NodeID.TrustDomain()); err != nil {
				return Listener{}, err
			}
			return out, nil
		}
		vp := cp + ".combined_validation_context"
		if err := c.only(cvc, vp, "default_validation_context", "validation_context_sds_secret_config"); err != nil {
			return Listener{}, err
		}
		dvc := cvc.GetDefaultValidationContext()
		dp := vp + ".default_validation_context"
		if err := c.only(dvc, dp, "custom_validator_config"); err != nil {
			return Listener{}, err
		}
		if dvc.GetCustomValidatorConfig() == nil {
			return Listener{}, c.fail(dp+".custom_validator_config", "missing: a combined validation context on an inbound listener is for federation (%s)", translate.SPIFFECertValidator)
		}
		if out.FederatesWith, err = c.spiffeValidator(dvc.GetCustomValidatorConfig(), dp+".custom_validator_config"); err != nil {
			return Listener{}, err
		}
		if err := c.bundleSecret(cvc.GetValidationContextSdsSecretConfig(), vp+".validation_context_sds_secret_config", v.NodeID.TrustDomain()); err != nil {
			return Listener{}, err
		}
	}
	return out, nil
}

// spiffeValidator accepts Envoy's SPIFFE certificate validator naming the
// trust domains whose peers are accepted: the workload's own (which must be
// listed: it is always accepted) and the foreign ones, which it returns. By
// name only: every bundle comes from the Workload API, so a trust bundle
// given here is refused, as is anything else of the validator.
func (c *checker) spiffeValidator(tec *core.TypedExtensionConfig, path string) ([]spiffeid.TrustDomain, error) {
	if err := c.only(tec, path, "name", "typed_config"); err != nil {
		return nil, err
	}
	if tec.GetName() != translate.SPIFFECertValidator {
		return nil, c.fail(path+".name", "validator %q is not supported (want %s)", tec.GetName(), translate.SPIFFECertValidator)
	}
	tp := path + ".typed_config"
	cfg, err := unpack(c, tec.GetTypedConfig(), tp, &tlsv3.SPIFFECertValidatorConfig{})
	if err != nil {
		return nil, err
	}
	if cfg.GetTrustBundles() != nil {
		return nil, c.fail(tp+".trust_bundles", "not supported: trust bundles come from the Workload API, never over xDS")
	}
	if err := c.only(cfg, tp, "trust_domains"); err != nil {
		return nil, err
	}
	self := c.v.NodeID.TrustDomain()
	var names []spiffeid.TrustDomain
	for i, d := range cfg.GetTrustDomains() {
		dp := fmt.Sprintf("%s.trust_domains[%d]", tp, i)
		if d.GetTrustBundle() != nil {
			return nil, c.fail(dp+".trust_bundle", "not supported: trust bundles come from the Workload API, never over xDS")
		}
		if err := c.only(d, dp, "name"); err != nil {
			return nil, err
		}
		td, err := identity.ParseTrustDomain(d.GetName())
		if err != nil {
			return nil, c.fail(dp+".name", "%v", err)
		}
		if slices.Contains(names, td) {
			return nil, c.fail(dp+".name", "%s listed twice", td.Name())
		}
		names = append(names, td)
	}
	if !slices.Contains(names, self) {
		return nil, c.fail(tp+".trust_domains", "does not name the workload's own trust domain %s, whose peers latch always accepts", self.Name())
	}
	return slices.DeleteFunc(names, func(td spiffeid.TrustDomain) bool { return td == self }), nil
}

func (c *checker) transportSocket(ts *core.TransportSocket, path string) error {
	if err := c.only(ts, path, "name", "typed_config"); err != nil {
		return err
	}
	if ts.GetName() != translate.TLSTransportSocket {
		return c.fail(path+".name", "transport socket %q is not supported (want %s)", ts.GetName(), translate.TLSTransportSocket)
	}
	return nil
}

// proxyProtocol accepts exactly the PROXY protocol socket the translation
// emits: version 2, latch's TLVs with their format strings (in any order,
// each once), over a raw buffer. Anything else would have the sidecar send
// the app a header other than the one its owner declared, so it is refused
// rather than approximated.
func (c *checker) proxyProtocol(ts *core.TransportSocket, path string) error {
	if err := c.only(ts, path, "name", "typed_config"); err != nil {
		return err
	}
	tp := path + ".typed_config"
	pp, err := unpack(c, ts.GetTypedConfig(), tp, &proxyprotocol.ProxyProtocolUpstreamTransport{})
	if err != nil {
		return err
	}
	if err := c.only(pp, tp, "config", "transport_socket"); err != nil {
		return err
	}
	cfg := pp.GetConfig()
	cp := tp + ".config"
	if cfg == nil {
		return c.fail(cp, "missing")
	}
	if err := c.only(cfg, cp, "version", "added_tlvs"); err != nil {
		return err
	}
	if cfg.GetVersion() != core.ProxyProtocolConfig_V2 {
		return c.fail(cp+".version", "%v is not supported (latch sends PROXY protocol v2 only)", cfg.GetVersion())
	}
	want := translate.ProxyProtocolTLVs()
	got := cfg.GetAddedTlvs()
	seen := make([]bool, len(want))
	for i, tlv := range got {
		match := slices.IndexFunc(want, func(w *core.TlvEntry) bool { return proto.Equal(w, tlv) })
		switch {
		case match < 0:
			return c.fail(fmt.Sprintf("%s.added_tlvs[%d]", cp, i), "type %#x with %v is not one of the TLVs latch sends (%s)", tlv.GetType(), tlv.GetFormatString(), describeTLVs(want))
		case seen[match]:
			return c.fail(fmt.Sprintf("%s.added_tlvs[%d]", cp, i), "type %#x given twice", tlv.GetType())
		}
		seen[match] = true
	}
	if len(got) != len(want) {
		return c.fail(cp+".added_tlvs", "want exactly latch's TLVs (%s), got %d", describeTLVs(want), len(got))
	}
	inner := pp.GetTransportSocket()
	ip := tp + ".transport_socket"
	if inner == nil {
		return c.fail(ip, "missing (want %s: the app is reached in plain TCP)", translate.RawBufferTransportSocket)
	}
	if err := c.only(inner, ip, "name", "typed_config"); err != nil {
		return err
	}
	if inner.GetName() != translate.RawBufferTransportSocket {
		return c.fail(ip+".name", "transport socket %q is not supported under the PROXY protocol (want %s: the app is reached in plain TCP)", inner.GetName(), translate.RawBufferTransportSocket)
	}
	if inner.GetTypedConfig() != nil {
		rb, err := unpack(c, inner.GetTypedConfig(), ip+".typed_config", &rawbuffer.RawBuffer{})
		if err != nil {
			return err
		}
		if err := c.only(rb, ip+".typed_config"); err != nil {
			return err
		}
	}
	return nil
}

func describeTLVs(tlvs []*core.TlvEntry) string {
	s := make([]string, len(tlvs))
	for i, t := range tlvs {
		s[i] = fmt.Sprintf("%#x %s", t.GetType(), t.GetFormatString().GetTextFormatSource().GetInlineString())
	}
	return strings.Join(s, ", ")
}

// commonTLS checks the SVID reference and narrows the profile by tls_params.
func (c *checker) commonTLS(ctx *tlsv3.CommonTlsContext, path string, allowed ...string) (*identity.Profile, error) {
	if ctx == nil {
		return nil, c.fail(path, "missing")
	}
	if err := c.only(ctx, path, allowed...); err != nil {
		return nil, err
	}
	certs := ctx.GetTlsCertificateSdsSecretConfigs()
	if len(certs) != 1 {
		return nil, c.fail(path+".tls_certificate_sds_secret_configs", "want exactly one SVID reference, got %d", len(certs))
	}
	sp := path + ".tls_certificate_sds_secret_configs[0]"
	if err := c.only(certs[0], sp, "name", "sds_config"); err != nil {
		return nil, err
	}
	if certs[0].GetName() != c.v.NodeID.String() {
		// The only SVID the sidecar holds is its own.
		return nil, c.fail(sp+".name", "%q is not this workload's SVID (%s)", certs[0].GetName(), c.v.NodeID)
	}
	tp := ctx.GetTlsParams()
	if tp == nil {
		return nil, nil
	}
	pp := path + ".tls_params"
	if err := c.only(tp, pp, "tls_minimum_protocol_version", "tls_maximum_protocol_version", "cipher_suites", "ecdh_curves"); err != nil {
		return nil, err
	}
	var params identity.Params
	versions := map[tlsv3.TlsParameters_TlsProtocol]uint16{
		tlsv3.TlsParameters_TLS_AUTO: 0, tlsv3.TlsParameters_TLSv1_0: tls.VersionTLS10, tlsv3.TlsParameters_TLSv1_1: tls.VersionTLS11,
		tlsv3.TlsParameters_TLSv1_2: tls.VersionTLS12, tlsv3.TlsParameters_TLSv1_3: tls.VersionTLS13,
	}
	var ok bool
	if params.MinVersion, ok = versions[tp.GetTlsMinimumProtocolVersion()]; !ok {
		return nil, c.fail(pp+".tls_minimum_protocol_version", "unknown version %v", tp.GetTlsMinimumProtocolVersion())
	}
	if params.MaxVersion, ok = versions[tp.GetTlsMaximumProtocolVersion()]; !ok {
		return nil, c.fail(pp+".tls_maximum_protocol_version", "unknown version %v", tp.GetTlsMaximumProtocolVersion())
	}
	for i, s := range tp.GetCipherSuites() {
		id, err := identity.ParseCipherSuite(s)
		if err != nil {
			return nil, c.fail(fmt.Sprintf("%s.cipher_suites[%d]", pp, i), "%v", err)
		}
		params.CipherSuites = append(params.CipherSuites, id)
	}
	for i, s := range tp.GetEcdhCurves() {
		id, err := identity.ParseCurve(s)
		if err != nil {
			return nil, c.fail(fmt.Sprintf("%s.ecdh_curves[%d]", pp, i), "%v", err)
		}
		params.Curves = append(params.Curves, id)
	}
	p, err := c.v.Profile.Narrow(params)
	if err != nil {
		return nil, c.fail(pp, "%v (xDS may only narrow the %s profile)", err, c.v.Profile.Name)
	}
	return &p, nil
}

// bundleSecret checks a trust bundle reference: SPIRE's name for the bundle
// of td, the workload's own trust domain. Federated bundles are named by the
// SPIFFE validator's trust domains, not by more references.
func (c *checker) bundleSecret(s *tlsv3.SdsSecretConfig, path string, td spiffeid.TrustDomain) error {
	if s == nil {
		return c.fail(path, "missing: peers must be verified against the trust bundle")
	}
	if err := c.only(s, path, "name", "sds_config"); err != nil {
		return err
	}
	if want := translate.BundleSecretName(td); s.GetName() != want {
		return c.fail(path+".name", "%q: want %q (only the workload's own trust domain is trusted)", s.GetName(), want)
	}
	return nil
}

// rbac accepts exactly what an allow-list can express: ALLOW policies that
// permit everything to peers matched by their certificate's SPIFFE ID.
func (c *checker) rbac(cfg *rbac.RBAC, path string) (identity.AllowList, error) {
	if err := c.only(cfg, path, "stat_prefix", "rules"); err != nil {
		return identity.AllowList{}, err
	}
	rules := cfg.GetRules()
	if rules == nil {
		// Envoy reads "no rules" as "filter disabled": everyone allowed.
		return identity.AllowList{}, c.fail(path+".rules", "missing (Envoy would allow every peer)")
	}
	if err := c.only(rules, path+".rules", "action", "policies"); err != nil {
		return identity.AllowList{}, err
	}
	if rules.GetAction() != rbacconfig.RBAC_ALLOW {
		return identity.AllowList{}, c.fail(path+".rules.action", "%v is not supported (only ALLOW)", rules.GetAction())
	}
	names := make([]string, 0, len(rules.GetPolicies()))
	for n := range rules.GetPolicies() {
		names = append(names, n)
	}
	slices.Sort(names)
	var out []identity.Rule
	for _, n := range names {
		pol := rules.GetPolicies()[n]
		pp := fmt.Sprintf("%s.rules.policies[%q]", path, n)
		if err := c.only(pol, pp, "permissions", "principals"); err != nil {
			return identity.AllowList{}, err
		}
		perms := pol.GetPermissions()
		if len(perms) != 1 || !perms[0].GetAny() {
			return identity.AllowList{}, c.fail(pp+".permissions", "only [{any: true}] is supported: latch authorizes whole connections by peer")
		}
		if err := c.only(perms[0], pp+".permissions[0]", "any"); err != nil {
			return identity.AllowList{}, err
		}
		rs, err := c.principals(pol.GetPrincipals(), pp+".principals")
		if err != nil {
			return identity.AllowList{}, err
		}
		out = append(out, rs...)
	}
	return identity.NewAllowList(out...), nil
}

func (c *checker) principals(ps []*rbacconfig.Principal, path string) ([]identity.Rule, error) {
	var exacts []string
	prefixes := map[string]bool{}
	var order []string // values in order, "=" exact, "/" prefix
	for i, p := range ps {
		pp := fmt.Sprintf("%s[%d]", path, i)
		auth := p.GetAuthenticated()
		if auth == nil {
			return nil, c.fail(pp, "only authenticated.principal_name is supported (the peer's SPIFFE ID)")
		}
		if err := c.only(auth, pp+".authenticated", "principal_name"); err != nil {
			return nil, err
		}
		m := auth.GetPrincipalName()
		mp := pp + ".authenticated.principal_name"
		if m == nil {
			return nil, c.fail(mp, "missing")
		}
		if err := c.only(m, mp, "exact", "prefix"); err != nil {
			return nil, err
		}
		switch pat := m.GetMatchPattern().(type) {
		case *matcher.StringMatcher_Exact:
			if _, err := spiffeid.FromString(pat.Exact); err != nil {
				return nil, c.fail(mp+".exact", "%q is not a SPIFFE ID: %v", pat.Exact, err)
			}
			exacts = append(exacts, pat.Exact)
			order = append(order, "="+pat.Exact)
		case *matcher.StringMatcher_Prefix:
			// A prefix is only safe on a segment boundary: "spiffe://td/ns/prod"
			// would also match spiffe://td/ns/production.
			if !strings.HasSuffix(pat.Prefix, "/") {
				return nil, c.fail(mp+".prefix", "%q does not end in '/': it would match IDs that merely start with the same letters", pat.Prefix)
			}
			base := strings.TrimSuffix(pat.Prefix, "/")
			if _, err := spiffeid.FromString(base); err != nil {
				return nil, c.fail(mp+".prefix", "%q is not a SPIFFE ID followed by '/': %v", pat.Prefix, err)
			}
			prefixes[base] = true
			order = append(order, "/"+base)
		default:
			return nil, c.fail(mp, "only exact and prefix matchers are supported")
		}
	}
	var out []identity.Rule
	used := map[string]bool{}
	for _, o := range order {
		kind, val := o[0], o[1:]
		if used[o] {
			continue
		}
		used[o] = true
		id, _ := spiffeid.FromString(val)
		switch {
		case kind == '/' && id.Path() == "":
			out = append(out, identity.AllowTrustDomain(id.TrustDomain()))
		case kind == '/':
			// "below the prefix" alone is not an allow-list rule; together
			// with the exact ID it is a path prefix. Alone, refuse rather
			// than widen.
			if !slices.Contains(exacts, val) {
				return nil, c.fail(path, "prefix %q/ without the exact principal %q cannot be expressed (latch path prefixes include the prefix itself)", val, val)
			}
			out = append(out, identity.AllowPathPrefix(id))
			used["="+val] = true
		case kind == '=' && prefixes[val]:
			out = append(out, identity.AllowPathPrefix(id))
			used["/"+val] = true
		default:
			out = append(out, identity.AllowID(id))
		}
	}
	return out, nil
}

// socketAddress checks a TCP socket address; extra names the optional
// fields the caller gives a meaning to.
func (c *checker) socketAddress(a *core.Address, path string, extra ...string) (string, uint32, error) {
	if a == nil {
		return "", 0, c.fail(path, "missing")
	}
	if err := c.only(a, path, "socket_address"); err != nil {
		return "", 0, err
	}
	sa := a.GetSocketAddress()
	sp := path + ".socket_address"
	if err := c.only(sa, sp, append([]string{"address", "port_value", "protocol"}, extra...)...); err != nil {
		return "", 0, err
	}
	if sa.GetProtocol() != core.SocketAddress_TCP {
		return "", 0, c.fail(sp+".protocol", "only TCP is supported")
	}
	if sa.GetAddress() == "" {
		return "", 0, c.fail(sp+".address", "missing")
	}
	// The sidecar's rule, checked here so the NACK names the resource and
	// field rather than the config built from it.
	if err := proxy.CheckHost(sa.GetAddress()); err != nil {
		return "", 0, c.fail(sp+".address", "%v", err)
	}
	if p := sa.GetPortValue(); p == 0 || p > 65535 {
		return "", 0, c.fail(sp+".port_value", "%d is not a port", p)
	}
	return sa.GetAddress(), sa.GetPortValue(), nil
}

// Cluster validates one Cluster resource.
func (v Validator) Cluster(a *anypb.Any) (Cluster, error) {
	c := &checker{v: v, typ: "cluster"}
	cl, err := unpack(c, a, "", &cluster.Cluster{})
	if err != nil {
		return Cluster{}, err
	}
	c.name = cl.GetName()
	if err := c.envoyRules(cl); err != nil {
		return Cluster{}, err
	}
	if c.name == "" {
		return Cluster{}, c.fail("name", "missing")
	}
	if err := c.only(cl, "", "name", "type", "eds_cluster_config", "connect_timeout", "load_assignment", "transport_socket"); err != nil {
		return Cluster{}, err
	}
	out := Cluster{Name: cl.GetName()}
	if ct := cl.GetConnectTimeout(); ct != nil {
		if ct.CheckValid() != nil || ct.AsDuration() <= 0 {
			return Cluster{}, c.fail("connect_timeout", "must be positive")
		}
		out.ConnectTimeout = ct.AsDuration()
	}
	switch cl.GetType() {
	case cluster.Cluster_EDS:
		eds := cl.GetEdsClusterConfig()
		if err := c.only(eds, "eds_cluster_config", "eds_config", "service_name"); err != nil {
			return Cluster{}, err
		}
		if eds.GetEdsConfig().GetAds() == nil {
			return Cluster{}, c.fail("eds_cluster_config.eds_config", "only ADS is supported as the EDS source")
		}
		if cl.GetLoadAssignment() != nil {
			return Cluster{}, c.fail("load_assignment", "an EDS cluster takes its endpoints from EDS")
		}
		out.EDSName = eds.GetServiceName()
		if out.EDSName == "" {
			out.EDSName = out.Name
		}
	case cluster.Cluster_STATIC, cluster.Cluster_STRICT_DNS, cluster.Cluster_LOGICAL_DNS:
		if cl.GetEdsClusterConfig() != nil {
			return Cluster{}, c.fail("eds_cluster_config", "only for EDS clusters")
		}
		e, err := c.loadAssignment(cl.GetLoadAssignment(), "load_assignment")
		if err != nil {
			return Cluster{}, err
		}
		out.Endpoints = e.Addrs
	default:
		return Cluster{}, c.fail("type", "%v is not supported", cl.GetType())
	}

	ts := cl.GetTransportSocket()
	if ts == nil {
		return out, nil // plain: only valid behind an inbound listener (checked in Build)
	}
	if ts.GetName() == translate.ProxyProtocolTransportSocket {
		// Plain too, with the PROXY protocol header first.
		if err := c.proxyProtocol(ts, "transport_socket"); err != nil {
			return Cluster{}, err
		}
		out.ProxyProtocol = true
		return out, nil
	}
	if err := c.transportSocket(ts, "transport_socket"); err != nil {
		return Cluster{}, err
	}
	path := "transport_socket.typed_config"
	utc, err := unpack(c, ts.GetTypedConfig(), path, &tlsv3.UpstreamTlsContext{})
	if err != nil {
		return Cluster{}, err
	}
	if err := c.only(utc, path, "common_tls_context", "max_session_keys"); err != nil {
		return Cluster{}, err
	}
	// Envoy's spelling of "no session resumption" is max_session_keys: 0
	// (unset means 1). Any other count means on: latch keeps one session
	// cache for all upstreams (1,024 tickets), not a count per cluster.
	if k := utc.GetMaxSessionKeys(); k != nil && k.GetValue() == 0 {
		out.DisableSessionResumption = true
	}
	ctx := utc.GetCommonTlsContext()
	cp := path + ".common_tls_context"
	if out.TLS, err = c.commonTLS(ctx, cp, "combined_validation_context", "tls_params", "tls_certificate_sds_secret_configs"); err != nil {
		return Cluster{}, err
	}
	cvc := ctx.GetCombinedValidationContext()
	vp := cp + ".combined_validation_context"
	if cvc == nil {
		return Cluster{}, c.fail(vp, "missing: the upstream's SPIFFE ID must be named")
	}
	if err := c.only(cvc, vp, "default_validation_context", "validation_context_sds_secret_config"); err != nil {
		return Cluster{}, err
	}
	dvc := cvc.GetDefaultValidationContext()
	dp := vp + ".default_validation_context"
	if err := c.only(dvc, dp, "match_typed_subject_alt_names", "custom_validator_config"); err != nil {
		return Cluster{}, err
	}
	if tec := dvc.GetCustomValidatorConfig(); tec != nil {
		if out.FederatesWith, err = c.spiffeValidator(tec, dp+".custom_validator_config"); err != nil {
			return Cluster{}, err
		}
	}
	sans := dvc.GetMatchTypedSubjectAltNames()
	if len(sans) != 1 {
		return Cluster{}, c.fail(dp+".match_typed_subject_alt_names", "want exactly one URI SAN (the server's SPIFFE ID), got %d", len(sans))
	}
	sp := dp + ".match_typed_subject_alt_names[0]"
	if err := c.only(sans[0], sp, "san_type", "matcher"); err != nil {
		return Cluster{}, err
	}
	if sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI {
		return Cluster{}, c.fail(sp+".san_type", "%v is not supported (only URI)", sans[0].GetSanType())
	}
	if err := c.only(sans[0].GetMatcher(), sp+".matcher", "exact"); err != nil {
		return Cluster{}, err
	}
	id, err := spiffeid.FromString(sans[0].GetMatcher().GetExact())
	if err != nil {
		return Cluster{}, c.fail(sp+".matcher.exact", "%q is not a SPIFFE ID: %v", sans[0].GetMatcher().GetExact(), err)
	}
	out.ServerID = id
	if err := c.bundleSecret(cvc.GetValidationContextSdsSecretConfig(), vp+".validation_context_sds_secret_config", v.NodeID.TrustDomain()); err != nil {
		return Cluster{}, err
	}
	if td := id.TrustDomain(); td != v.NodeID.TrustDomain() && !slices.Contains(out.FederatesWith, td) {
		return Cluster{}, c.fail(sp+".matcher.exact", "%s is outside the trust domain %s and of no trust domain the cluster's %s names", id, v.NodeID.TrustDomain(), translate.SPIFFECertValidator)
	}
	return out, nil
}

// Endpoints validates one ClusterLoadAssignment resource.
func (v Validator) Endpoints(a *anypb.Any) (Endpoints, error) {
	c := &checker{v: v, typ: "endpoints"}
	cla, err := unpack(c, a, "", &endpoint.ClusterLoadAssignment{})
	if err != nil {
		return Endpoints{}, err
	}
	c.name = cla.GetClusterName()
	if err := c.envoyRules(cla); err != nil {
		return Endpoints{}, err
	}
	if c.name == "" {
		return Endpoints{}, c.fail("cluster_name", "missing")
	}
	return c.loadAssignment(cla, "")
}

// loadAssignment returns the endpoints in failover order: by priority, then
// as listed. Endpoints reported unhealthy, draining or timed out are left out.
func (c *checker) loadAssignment(cla *endpoint.ClusterLoadAssignment, path string) (Endpoints, error) {
	if cla == nil {
		return Endpoints{}, c.fail(path, "missing")
	}
	if err := c.only(cla, path, "cluster_name", "endpoints"); err != nil {
		return Endpoints{}, err
	}
	out := Endpoints{Name: cla.GetClusterName()}
	groups := slices.Clone(cla.GetEndpoints())
	slices.SortStableFunc(groups, func(a, b *endpoint.LocalityLbEndpoints) int { return int(a.GetPriority()) - int(b.GetPriority()) })
	for i, g := range cla.GetEndpoints() {
		gp := join(path, fmt.Sprintf("endpoints[%d]", i))
		if err := c.only(g, gp, "lb_endpoints", "priority", "locality", "load_balancing_weight"); err != nil {
			return Endpoints{}, err
		}
		for j, e := range g.GetLbEndpoints() {
			ep := fmt.Sprintf("%s.lb_endpoints[%d]", gp, j)
			if err := c.only(e, ep, "endpoint", "health_status", "load_balancing_weight"); err != nil {
				return Endpoints{}, err
			}
			if err := c.only(e.GetEndpoint(), ep+".endpoint", "address"); err != nil {
				return Endpoints{}, err
			}
			if _, _, err := c.socketAddress(e.GetEndpoint().GetAddress(), ep+".endpoint.address"); err != nil {
				return Endpoints{}, err
			}
		}
	}
	for _, g := range groups {
		for _, e := range g.GetLbEndpoints() {
			switch e.GetHealthStatus() {
			case core.HealthStatus_UNHEALTHY, core.HealthStatus_DRAINING, core.HealthStatus_TIMEOUT:
				continue
			}
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			out.Addrs = append(out.Addrs, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
		}
	}
	return out, nil
}

// Set is one validated update: the resources of each type last received.
type Set struct {
	Listeners map[string]Listener
	Clusters  map[string]Cluster
	Endpoints map[string]Endpoints
}

// Build assembles a proxy configuration from a validated set. It returns an
// error wrapping ErrIncomplete when a reference is not resolved yet, and a
// *ValidationError when resources do not fit together.
func (v Validator) Build(s Set, version string) (*proxy.Config, error) {
	cfg := &proxy.Config{Version: version, Source: "xds", TLS: v.Profile}
	var profile *identity.Profile
	narrow := func(typ, name string, p *identity.Profile) error {
		if p == nil {
			return nil
		}
		if profile != nil && !sameProfile(*profile, *p) {
			return &ValidationError{Type: typ, Resource: name, Field: "tls_params", Reason: "differs from the tls_params of other resources; latch runs one profile"}
		}
		profile = p
		return nil
	}
	names := make([]string, 0, len(s.Listeners))
	for n := range s.Listeners {
		names = append(names, n)
	}
	slices.Sort(names)
	listens := make(map[string]string, len(names)) // address → listener name
	for _, n := range names {
		l := s.Listeners[n]
		if prev, ok := listens[l.Listen]; ok {
			return nil, &ValidationError{Type: "listener", Resource: n, Field: "address", Reason: fmt.Sprintf("%s is also the address of listener %q", l.Listen, prev)}
		}
		listens[l.Listen] = n
		if err := narrow("listener", n, l.TLS); err != nil {
			return nil, err
		}
		cl, ok := s.Clusters[l.Cluster]
		if !ok {
			return nil, fmt.Errorf("listener %q: cluster %q: %w", n, l.Cluster, ErrIncomplete)
		}
		if err := narrow("cluster", cl.Name, cl.TLS); err != nil {
			return nil, err
		}
		addrs := cl.Endpoints
		if cl.EDSName != "" {
			e, ok := s.Endpoints[cl.EDSName]
			if !ok {
				return nil, fmt.Errorf("cluster %q: endpoints %q: %w", cl.Name, cl.EDSName, ErrIncomplete)
			}
			addrs = e.Addrs
		}
		if l.Inbound {
			if !cl.ServerID.IsZero() {
				return nil, &ValidationError{Type: "cluster", Resource: cl.Name, Field: "transport_socket", Reason: fmt.Sprintf("used by inbound listener %q, which forwards plain TCP to the app: TLS towards the app is not supported", n)}
			}
			if len(addrs) != 1 {
				return nil, &ValidationError{Type: "cluster", Resource: cl.Name, Field: "load_assignment", Reason: fmt.Sprintf("the app behind inbound listener %q needs exactly one endpoint, got %d", n, len(addrs))}
			}
			if host, _, _ := net.SplitHostPort(addrs[0]); !v.AllowNonLoopbackApp && !proxy.IsLoopbackHost(host) {
				typ, res, field := "cluster", cl.Name, "load_assignment"
				if cl.EDSName != "" {
					typ, res, field = "endpoints", cl.EDSName, "endpoints"
				}
				return nil, &ValidationError{Type: typ, Resource: res, Field: field, Reason: fmt.Sprintf("the app of inbound listener %q is %s, not a loopback address: admitted peers reach the app in plain TCP, so the sidecar takes an app elsewhere only when started with --allow-non-loopback-app", n, addrs[0])}
			}
			cfg.Inbound = append(cfg.Inbound, proxy.Inbound{
				Name: n, Listen: l.Listen, App: addrs[0], Allow: l.Allow, FederatesWith: l.FederatesWith,
				IdleTimeout: l.Idle, ConnectTimeout: cl.ConnectTimeout, ProxyProtocol: cl.ProxyProtocol,
			})
			continue
		}
		if cl.ProxyProtocol {
			return nil, &ValidationError{Type: "cluster", Resource: cl.Name, Field: "transport_socket", Reason: fmt.Sprintf("used by outbound listener %q: the PROXY protocol header is for the app behind an inbound listener, an upstream gets mTLS", n)}
		}
		if len(addrs) == 0 {
			// proxy.Config refuses an outbound listener without upstreams; say
			// which resource left it empty, so the NACK names it.
			typ, res, field := "cluster", cl.Name, "load_assignment"
			if cl.EDSName != "" {
				typ, res, field = "endpoints", cl.EDSName, "endpoints"
			}
			return nil, &ValidationError{Type: typ, Resource: res, Field: field, Reason: fmt.Sprintf("no usable endpoint (none listed, or all unhealthy, draining or timed out) for outbound listener %q", n)}
		}
		if cl.ServerID.IsZero() {
			// No plaintext fallback: an outbound listener always originates mTLS.
			return nil, &ValidationError{Type: "cluster", Resource: cl.Name, Field: "transport_socket", Reason: fmt.Sprintf("missing: outbound listener %q must originate mTLS", n)}
		}
		cfg.Outbound = append(cfg.Outbound, proxy.Outbound{
			Name: n, Listen: l.Listen, Upstreams: addrs, ServerID: cl.ServerID, FederatesWith: cl.FederatesWith,
			IdleTimeout: l.Idle, ConnectTimeout: cl.ConnectTimeout,
			DisableSessionResumption: cl.DisableSessionResumption,
		})
	}
	if profile != nil {
		cfg.TLS = *profile
	}
	// The checks above are meant to refuse everything proxy.Config refuses,
	// so this should never fire; if the two drift apart, the update is still
	// NACKed here naming the listener, not ACKed and then refused by the proxy.
	if err := cfg.Validate(); err != nil {
		return nil, listenerError(cfg, err)
	}
	return cfg, nil
}

// listenerError turns a proxy.Config error ("outbound[0].upstreams: ...")
// into one that names the xDS listener it came from.
func listenerError(cfg *proxy.Config, err error) error {
	fe, ok := errors.AsType[*proxy.FieldError](err)
	if ok {
		for i, in := range cfg.Inbound {
			if rest, ok := strings.CutPrefix(fe.Field, fmt.Sprintf("inbound[%d].", i)); ok {
				return &ValidationError{Type: "listener", Resource: in.Name, Field: "(latch config) " + rest, Reason: fe.Err.Error()}
			}
		}
		for i, out := range cfg.Outbound {
			if rest, ok := strings.CutPrefix(fe.Field, fmt.Sprintf("outbound[%d].", i)); ok {
				return &ValidationError{Type: "listener", Resource: out.Name, Field: "(latch config) " + rest, Reason: fe.Err.Error()}
			}
		}
	}
	return &ValidationError{Type: "listener", Reason: "the resulting config is refused: " + err.Error()}
}

func sameProfile(a, b identity.Profile) bool {
	return a.MinVersion == b.MinVersion && a.MaxVersion == b.MaxVersion &&
		slices.Equal(a.CipherSuites, b.CipherSuites) && slices.Equal(a.Curves, b.Curves)
}
