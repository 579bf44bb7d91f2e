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
	minProps    *int64
	maxProps    *int64
	pattern     string
	enum        []string
	// stringMap marks a map of strings (labels, annotations).
	stringMap bool
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
const durationPattern = `^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`

// trustDomainPattern is a bare trust domain name (SPIFFE-ID section 2.1), so
// the API server refuses a trustDomain written as a SPIFFE ID before the
// decoder has to.
const trustDomainPattern = `^[a-z0-9._-]+$`

func portSchema(desc string) *schema {
	return &schema{typ: "integer", description: desc, min: i64(1), max: i64(65535)}
}

var (
	allowSchema = &schema{
		typ:         "object",
		description: "One allowed peer: exactly one of id, trustDomain or pathPrefix.",
		props: []field{
			{"id", &schema{typ: "string", description: "Exactly this SPIFFE ID.", pattern: `^spiffe://`}},
			{"trustDomain", &schema{typ: "string", description: "Every SPIFFE ID of this trust domain: a bare name such as example.org, never a SPIFFE ID (use id or pathPrefix for those).", pattern: trustDomainPattern}},
			{"pathPrefix", &schema{typ: "string", description: "This SPIFFE ID and every ID below it, segment by segment (spiffe://td/ns/prod allows spiffe://td/ns/prod/sa/x, not spiffe://td/ns/production).", pattern: `^spiffe://`}},
		},
		minProps: i64(1),
		maxProps: i64(1),
	}

	inboundSchema = &schema{
		typ:         "object",
		description: "A port on which the sidecar accepts mTLS from peers and forwards plain TCP to the application.",
		props: []field{
			{"port", portSchema("Port the sidecar listens on for peers.")},
			{"appAddress", &schema{typ: "string", description: "host:port of the application, normally on loopback."}},
			{"allow", &schema{typ: "array", description: "Peers allowed to connect. Empty denies everyone.", items: allowSchema}},
			{"idleTimeout", &schema{typ: "string", description: "Close a connection idle this long (Go duration, e.g. 30m).", pattern: durationPattern}},
		},
		required: []string{"port", "appAddress"},
	}

	outboundSchema = &schema{
		typ:         "object",
		description: "A loopback port on which the application reaches an upstream through the sidecar, which originates mTLS.",
		props: []field{
			{"port", portSchema("Loopback port the application connects to.")},
			{"target", &schema{typ: "string", description: "host:port of the upstream (exclusive with endpoints)."}},
			{"endpoints", &schema{typ: "array", description: "host:port endpoints of the upstream, tried in order (exclusive with target).", items: &schema{typ: "string"}, minItems: i64(1)}},
			{"serverID", &schema{typ: "string", description: "SPIFFE ID the upstream must prove.", pattern: `^spiffe://`}},
			{"idleTimeout", &schema{typ: "string", description: "Close a connection idle this long (Go duration, e.g. 30m).", pattern: durationPattern}},
		},
		required: []string{"port", "serverID"},
	}

	specSchema = &schema{
		typ:         "object",
		description: "What the workload's sidecar serves.",
		props: []field{
			{"spiffeID", &schema{typ: "string", description: "SPIFFE ID of the workload this policy is for.", pattern: `^spiffe://`}},
			{"inbound", &schema{typ: "array", description: "Ports the sidecar accepts peers on.", items: inboundSchema}},
			{"outbound", &schema{typ: "array", description: "Upstreams the workload calls.", items: outboundSchema}},
		},
		required: []string{"spiffeID"},
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
