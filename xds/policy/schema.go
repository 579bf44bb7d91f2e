package policy

// The schema below is the single description of a ServicePolicy. The decoder
// takes its field names from it (so an unknown field is refused by the same
// table the CRD publishes), and CRD renders it as an OpenAPI v3 schema.

// API group, version and kind of a declaration.
const (
	Group      = "latch.dev"
	Version    = "v1alpha1"
	APIVersion = Group + "/" + Version
	Kind       = "ServicePolicy"
)

// field is one property of an object in the schema, kept in declaration order
// so the emitted CRD is stable and reads in a sensible order.
type field struct {
	name string
	s    *schema
}

type schema struct {
	typ         string // object, array, string, integer
	description string
	props       []field
	required    []string
	items       *schema
	min, max    *int64 // integer bounds
	minItems    *int64
	maxItems    *int64 // the decoder enforces it too; CEL needs it to bound a rule's cost
	maxLength   *int64
	minProps    *int64
	maxProps    *int64
	pattern     string
	enum        []string
	// stringMap marks a map of strings (labels, annotations).
	stringMap bool
	// listMapKeys makes a list of objects a map keyed by these fields in
	// the CRD: the API server refuses two items with the same key. The
	// decoder checks the same in code, with the place of the first use.
	listMapKeys []string
	// listSet makes a list of strings a set in the CRD (no duplicates).
	listSet bool
	// rules are CEL validations (x-kubernetes-validations) for what
	// OpenAPI cannot say. Each restates a check the decoder makes in code,
	// so an object the API server admits is refused only for what depends
	// on the control plane's configuration (trust domains, namespace
	// ownership) or on other objects (conflicts).
	rules []celRule
}

type celRule struct {
	rule, message string
}

func (s *schema) prop(name string) *schema {
	for _, f := range s.props {
		if f.name == name {
			return f.s
		}
	}
	return nil
}

func (s *schema) keys() []string {
	k := make([]string, len(s.props))
	for i, f := range s.props {
		k[i] = f.name
	}
	return k
}

func i64(v int64) *int64 { return &v }

// durationPattern is what time.ParseDuration accepts, without signs: a
// timeout is never negative.
const durationPattern = `^(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+$`

// trustDomainPattern is a bare trust domain name (SPIFFE-ID section 2.1), so
// the API server refuses a trustDomain written as a SPIFFE ID before the
// decoder has to.
const trustDomainPattern = `^` + tdExpr + `$`

func portSchema(desc string) *schema {
	return &schema{typ: "integer", description: desc, min: i64(1), max: i64(65535)}
}

// Limits on list lengths and strings. They bound what one object can make
// the control plane build, and let the API server estimate the cost of the
// CEL rules below.
const (
	maxInbound    = 256
	maxOutbound   = 1024 // a workload may call many upstreams
	maxAllow      = 256
	maxEndpoints  = 32
	maxFederation = 16   // foreign trust domains one listener accepts
	maxIDLength   = 2048 // SPIFFE: a SPIFFE ID is at most 2048 bytes
	maxTDLength   = 255  // SPIFFE: a trust domain name is at most 255 bytes
	maxHostLength = 261  // a 253-byte host name, ':' and a port (IPv6 with a zone is shorter)
)

// The SPIFFE ID grammar: a lowercase trust domain of letters, digits, '.',
// '-' and '_', and a path of one or more segments of letters, digits, '.',
// '-' and '_', none of them empty, "." or "..". go-spiffe enforces the same
// in the decoder. These are OpenAPI patterns rather than CEL rules: a CEL
// regular expression on every allow entry of every port exceeds the API
// server's cost budget, a pattern has none.
const (
	tdExpr      = `[a-z0-9._-]+`
	segmentExpr = `([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)`
	idPattern   = `^spiffe://` + tdExpr + `(/` + segmentExpr + `)+$`
	// host:port, the host a DNS name, an IPv4 address or [an IPv6 one].
	hostPattern = `^(\[[0-9A-Za-z:.%_-]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$`
)

func idSchema(desc string) *schema {
	return &schema{typ: "string", description: desc, maxLength: i64(maxIDLength), pattern: idPattern}
}

func federationSchema(desc string) *schema {
	return &schema{typ: "array", description: desc, maxItems: i64(maxFederation), listSet: true,
		items: &schema{typ: "string", description: "A bare trust domain name such as partner.example.", maxLength: i64(maxTDLength), pattern: trustDomainPattern}}
}

func hostPortSchema(desc string) *schema {
	return &schema{typ: "string", description: desc, maxLength: i64(maxHostLength), pattern: hostPattern}
}

var (
	allowSchema = &schema{
		typ:         "object",
		description: "One allowed peer: exactly one of id, trustDomain or pathPrefix.",
		props: []field{
			{"id", idSchema("Exactly this SPIFFE ID.")},
			{"trustDomain", &schema{typ: "string", description: "Every SPIFFE ID of this trust domain: a bare name such as example.org, never a SPIFFE ID (use id or pathPrefix for those).",
				maxLength: i64(maxTDLength), pattern: trustDomainPattern}},
			{"pathPrefix", idSchema("This SPIFFE ID and every ID below it, segment by segment (spiffe://td/ns/prod allows spiffe://td/ns/prod/sa/x, not spiffe://td/ns/production).")},
		},
		rules: []celRule{{"(has(self.id) ? 1 : 0) + (has(self.trustDomain) ? 1 : 0) + (has(self.pathPrefix) ? 1 : 0) == 1",
			"give exactly one of id, trustDomain, pathPrefix"}},
	}

	inboundSchema = &schema{
		typ:         "object",
		description: "A port on which the sidecar accepts mTLS from peers and forwards plain TCP to the application.",
		props: []field{
			{"port", portSchema("Port the sidecar listens on for peers.")},
			{"appAddress", hostPortSchema("host:port of the application, normally on loopback.")},
			{"allow", &schema{typ: "array", description: "Peers allowed to connect. Empty denies everyone.", items: allowSchema, maxItems: i64(maxAllow)}},
			{"idleTimeout", &schema{typ: "string", description: "Close a connection idle this long (Go duration, e.g. 30m).", pattern: durationPattern}},
			{"federatesWith", federationSchema("Foreign trust domains whose workloads may connect besides the workload's own, each verified against its federated bundle from the Workload API; allow may then name their IDs. Empty (the default): none.")},
			{"proxyProtocol", &schema{typ: "string", description: "v2: send the application a PROXY protocol v2 header with the peer's address, SPIFFE ID and TLS parameters before its bytes. Leave out for none.",
				enum: []string{"v2"}}},
		},
		required: []string{"port", "appAddress"},
	}

	outboundSchema = &schema{
		typ:         "object",
		description: "A loopback port on which the application reaches an upstream through the sidecar, which originates mTLS.",
		props: []field{
			{"port", portSchema("Loopback port the application connects to.")},
			{"target", hostPortSchema("host:port of the upstream (exclusive with endpoints).")},
			{"endpoints", &schema{typ: "array", description: "host:port endpoints of the upstream, tried in order (exclusive with target).",
				items: hostPortSchema(""), minItems: i64(1), maxItems: i64(maxEndpoints), listSet: true}},
			{"serverID", idSchema("SPIFFE ID the upstream must prove.")},
			{"federatesWith", federationSchema("Foreign trust domains whose servers are accepted, each verified against its federated bundle from the Workload API; serverID may be in one of them. Empty (the default): none.")},
			{"idleTimeout", &schema{typ: "string", description: "Close a connection idle this long (Go duration, e.g. 30m).", pattern: durationPattern}},
		},
		required: []string{"port", "serverID"},
		rules:    []celRule{{"has(self.target) != has(self.endpoints)", "give target or endpoints, not both"}},
	}

	specSchema = &schema{
		typ:         "object",
		description: "What the workload's sidecar serves.",
		props: []field{
			{"spiffeID", idSchema("SPIFFE ID of the workload this policy is for.")},
			{"inbound", &schema{typ: "array", description: "Ports the sidecar accepts peers on.", items: inboundSchema,
				maxItems: i64(maxInbound), listMapKeys: []string{"port"}}},
			{"outbound", &schema{typ: "array", description: "Upstreams the workload calls.", items: outboundSchema,
				maxItems: i64(maxOutbound), listMapKeys: []string{"port"}}},
		},
		required: []string{"spiffeID"},
		rules: []celRule{{
			"!has(self.inbound) || !has(self.outbound) || self.inbound.all(i, self.outbound.all(o, o.port != i.port))",
			"a port is used by both an inbound and an outbound entry: each port serves one of them",
		}},
	}

	metadataSchema = &schema{
		typ: "object",
		props: []field{
			{"name", &schema{typ: "string"}},
			{"namespace", &schema{typ: "string"}},
			{"labels", &schema{typ: "object", stringMap: true}},
			{"annotations", &schema{typ: "object", stringMap: true}},
		},
		required: []string{"name"},
	}

	documentSchema = &schema{
		typ:         "object",
		description: "ServicePolicy declares which peers may call a workload and which upstreams it calls.",
		props: []field{
			{"apiVersion", &schema{typ: "string", enum: []string{APIVersion}}},
			{"kind", &schema{typ: "string", enum: []string{Kind}}},
			{"metadata", metadataSchema},
			{"spec", specSchema},
		},
		required: []string{"apiVersion", "kind", "metadata", "spec"},
	}
)
