package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.yaml.in/yaml/v3"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
)

// Declaration is one validated ServicePolicy.
type Declaration struct {
	Name      string
	Namespace string
	// File and Line locate the document the declaration came from.
	File string
	Line int
	// ID is the SPIFFE ID of the workload whose sidecar serves this policy.
	ID       spiffeid.ID
	Inbound  []Inbound
	Outbound []Outbound
}

// Inbound is a port on which the sidecar accepts peers.
type Inbound struct {
	Port uint32
	// App is the host:port of the application.
	App string
	// Allow lists the peers allowed, in declaration order. Empty denies all.
	Allow       []identity.Rule
	IdleTimeout time.Duration // zero: the proxy's default
	// ProxyProtocol sends the app a PROXY protocol v2 header naming the
	// peer (proxy.Inbound.ProxyProtocol).
	ProxyProtocol bool
	// FederatesWith are foreign trust domains whose peers are accepted
	// (proxy.Inbound.FederatesWith); Allow may name IDs in them.
	FederatesWith []spiffeid.TrustDomain
}

// Outbound is a loopback port through which the application reaches an
// upstream that must prove ServerID.
type Outbound struct {
	Port uint32
	// Endpoints are the upstream's host:port addresses, tried in order.
	Endpoints   []string
	ServerID    spiffeid.ID
	IdleTimeout time.Duration
	// FederatesWith are foreign trust domains whose servers are accepted
	// (proxy.Outbound.FederatesWith); ServerID may be in one of them.
	FederatesWith []spiffeid.TrustDomain
}

// Options says what a declaration may name.
type Options struct {
	// TrustDomains are the trust domains declarations may refer to: the
	// workload's own ID, allowed peers and upstream server IDs must all be
	// in one of them. It must not be empty.
	TrustDomains []spiffeid.TrustDomain
	// Owners, if set, says which workload IDs a ServicePolicy object may
	// declare: those the template gives its namespace. Files are the
	// operator's and may declare any ID. Allow-lists and server IDs may
	// name workloads anywhere.
	Owners *IDTemplate
}

func (o Options) check() error {
	if len(o.TrustDomains) == 0 {
		return errors.New("no trust domain configured: declarations could name none")
	}
	return nil
}

// Error is one refusal, located in its file, or for an API object naming the
// object and (in Reason) the field.
type Error struct {
	// File is the file's path, or "ServicePolicy namespace/name".
	File string
	// Line is the line in the file; 0 for an object or the file as a whole.
	Line   int
	Reason string
	// Err, if set, classifies the refusal (ErrNotOwned, ErrConflict).
	Err error
}

// Unwrap returns the refusal's class, if any.
func (e *Error) Unwrap() error { return e.Err }

func (e *Error) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Reason)
	}
	return fmt.Sprintf("%s: %s", e.File, e.Reason)
}

// FileError holds every refusal found in one file (or object). A file with
// any refusal is rejected as a whole.
type FileError struct {
	File   string
	Errors []*Error
}

func (e *FileError) Error() string {
	s := make([]string, len(e.Errors))
	for i, err := range e.Errors {
		s[i] = err.Error()
	}
	return strings.Join(s, "\n")
}

// Unwrap exposes the individual refusals to errors.As.
func (e *FileError) Unwrap() []error {
	out := make([]error, len(e.Errors))
	for i, err := range e.Errors {
		out[i] = err
	}
	return out
}

// Parse decodes and validates every ServicePolicy document in data, read from
// file (used in messages only). Either all declarations of the file are
// returned, or a *FileError and none: a file is accepted or refused whole.
func Parse(file string, data []byte, opts Options) ([]Declaration, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	d := &decoder{file: file, opts: opts}
	var out []Declaration
	dec := yaml.NewDecoder(bytes.NewReader(data))
	lastDoc := 0 // line of the last document decoded
	for {
		var doc yaml.Node
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			reason := "YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")
			line := yamlErrorLine(err)
			if line == 0 {
				// yaml.v3's reader errors (control characters, bad UTF-8)
				// carry no line: find the character, else name the
				// document the error is in.
				if line = badCharLine(data); line > 0 {
					reason += " (first one on this line)"
				} else {
					line = nextDocumentLine(data, lastDoc)
					reason += " (in the document starting at this line)"
				}
			}
			d.errs = append(d.errs, &Error{File: file, Line: line, Reason: reason})
			break // the decoder cannot resynchronise after a syntax error
		}
		lastDoc = max(doc.Line, 1)
		if len(doc.Content) == 0 || (doc.Content[0].Kind == yaml.ScalarNode && doc.Content[0].Tag == "!!null") {
			continue // an empty document between separators
		}
		if decl, ok := d.document(doc.Content[0]); ok {
			out = append(out, decl)
		}
	}
	seen := map[spiffeid.ID]Declaration{}
	for _, decl := range out {
		if prev, dup := seen[decl.ID]; dup {
			d.errs = append(d.errs, &Error{File: file, Line: decl.Line, Reason: fmt.Sprintf("spec.spiffeID %s: conflicts with ServicePolicy %q at line %d of the same file", decl.ID, prev.Name, prev.Line)})
			continue
		}
		seen[decl.ID] = decl
	}
	if len(d.errs) > 0 {
		return nil, &FileError{File: file, Errors: d.errs}
	}
	return out, nil
}

// badCharLine is the line of the first character YAML does not allow in a
// stream (YAML 1.2 §5.1: printable Unicode, tab, line breaks), 0 if none.
func badCharLine(data []byte) int {
	line := 1
	for i, r := range string(data) {
		switch {
		case r == '\n':
			line++
			continue
		case r == '\t' || r == '\r' || r == 0x85:
			continue
		case r == utf8.RuneError:
			if _, size := utf8.DecodeRune(data[i:]); size <= 1 {
				return line
			}
		case r < 0x20 || (r >= 0x7f && r < 0xa0) || (r >= 0xd800 && r <= 0xdfff) || r == 0xfffe || r == 0xffff:
			return line
		}
	}
	return 0
}

// nextDocumentLine is the line where the document after the one at line
// prev starts (prev 0: the first document), by its "---" separator.
func nextDocumentLine(data []byte, prev int) int {
	if prev == 0 {
		return 1
	}
	for i, l := range strings.Split(string(data), "\n") {
		if i+1 > prev && strings.HasPrefix(l, "---") {
			return i + 1
		}
	}
	return prev
}

var yamlLine = regexp.MustCompile(`line (\d+)`)

// yamlErrorLine digs the line number out of a yaml.v3 syntax error, which
// carries it only in its text.
func yamlErrorLine(err error) int {
	if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
		n, _ := strconv.Atoi(m[1])
		return n
	}
	return 0
}

type decoder struct {
	file string
	opts Options
	errs []*Error
	// self is the trust domain of the declaration being decoded, and
	// federated the foreign trust domains of the listener being decoded:
	// its allow rules and server ID may name them besides opts.TrustDomains.
	self      spiffeid.TrustDomain
	federated []spiffeid.TrustDomain
}

func (d *decoder) fail(n *yaml.Node, format string, args ...any) {
	d.errs = append(d.errs, &Error{File: d.file, Line: n.Line, Reason: fmt.Sprintf(format, args...)})
}

// object checks that n is a mapping holding only the schema's fields, each at
// most once, and every required one; it returns the value nodes by key.
func (d *decoder) object(n *yaml.Node, s *schema, path string) (map[string]*yaml.Node, bool) {
	if n.Kind == yaml.AliasNode {
		d.fail(n, "%s: YAML aliases are not supported", path)
		return nil, false
	}
	if n.Kind != yaml.MappingNode {
		d.fail(n, "%s: want a mapping, got %s", path, kindName(n))
		return nil, false
	}
	ok := true
	fields := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		name := k.Value
		switch {
		case k.Kind != yaml.ScalarNode:
			d.fail(k, "%s: field names must be plain strings", path)
			ok = false
		case s.prop(name) == nil:
			d.fail(k, "%s: unknown field %q (known: %s)", path, name, strings.Join(s.keys(), ", "))
			ok = false
		case fields[name] != nil:
			d.fail(k, "%s: field %q given twice", path, name)
			ok = false
		default:
			fields[name] = v
		}
	}
	for _, r := range s.required {
		if fields[r] == nil {
			d.fail(n, "%s: missing required field %q", path, r)
			ok = false
		}
	}
	return fields, ok
}

func (d *decoder) str(n *yaml.Node, path string) (string, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		d.fail(n, "%s: want a string, got %s", path, kindName(n))
		return "", false
	}
	if n.Value == "" {
		d.fail(n, "%s: must not be empty", path)
		return "", false
	}
	return n.Value, true
}

func (d *decoder) port(n *yaml.Node, path string) (uint32, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		d.fail(n, "%s: want a port number, got %s", path, kindName(n))
		return 0, false
	}
	p, err := strconv.ParseUint(n.Value, 10, 32)
	if err != nil || p < 1 || p > 65535 {
		d.fail(n, "%s: port %s out of range 1..65535", path, n.Value)
		return 0, false
	}
	return uint32(p), true
}

// list returns the items of the list n, whose schema is s.
func (d *decoder) list(n *yaml.Node, s *schema, path string) ([]*yaml.Node, bool) {
	if n.Kind != yaml.SequenceNode {
		d.fail(n, "%s: want a list, got %s", path, kindName(n))
		return nil, false
	}
	if s.maxItems != nil && int64(len(n.Content)) > *s.maxItems {
		d.fail(n, "%s: %d items, at most %d allowed", path, len(n.Content), *s.maxItems)
		return nil, false
	}
	return n.Content, true
}

// tooLong refuses a string longer than max bytes.
func (d *decoder) tooLong(n *yaml.Node, path, s string, max int) bool {
	if len(s) > max {
		d.fail(n, "%s: %d bytes long, at most %d allowed", path, len(s), max)
		return true
	}
	return false
}

func (d *decoder) duration(n *yaml.Node, path string) (time.Duration, bool) {
	s, ok := d.str(n, path)
	if !ok {
		return 0, false
	}
	v, err := time.ParseDuration(s)
	if err != nil || v <= 0 {
		d.fail(n, "%s: %q is not a positive duration such as 30s or 1h", path, s)
		return 0, false
	}
	return v, true
}

func (d *decoder) hostPort(n *yaml.Node, path string) (string, bool) {
	s, ok := d.str(n, path)
	if !ok || d.tooLong(n, path, s, maxHostLength) {
		return "", false
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		d.fail(n, "%s: %q is not host:port: %v", path, s, err)
		return "", false
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if host == "" || err != nil || p == 0 {
		d.fail(n, "%s: %q needs a host and a port in 1..65535", path, s)
		return "", false
	}
	// The sidecar's own rule: a host the sidecar would refuse must be
	// refused here, with its line, not NACKed later.
	if err := proxy.CheckHost(host); err != nil {
		d.fail(n, "%s: %v", path, err)
		return "", false
	}
	return s, true
}

// spiffeID parses a workload ID (with a path) in a configured trust domain.
func (d *decoder) spiffeID(n *yaml.Node, path string) (spiffeid.ID, bool) {
	s, ok := d.str(n, path)
	if !ok || d.tooLong(n, path, s, maxIDLength) {
		return spiffeid.ID{}, false
	}
	id, err := spiffeid.FromString(s)
	if err != nil {
		d.fail(n, "%s: %q is not a SPIFFE ID: %v", path, s, err)
		return spiffeid.ID{}, false
	}
	if id.Path() == "" {
		d.fail(n, "%s: %q names a trust domain, not a workload", path, s)
		return spiffeid.ID{}, false
	}
	return id, d.inTrustDomains(n, path, id.TrustDomain())
}

func (d *decoder) inTrustDomains(n *yaml.Node, path string, td spiffeid.TrustDomain) bool {
	if slices.Contains(d.opts.TrustDomains, td) || slices.Contains(d.federated, td) {
		return true
	}
	names := make([]string, len(d.opts.TrustDomains))
	for i, t := range d.opts.TrustDomains {
		names[i] = t.Name()
	}
	hint := ""
	if strings.Contains(path, ".allow[") || strings.HasSuffix(path, ".serverID") {
		hint = "; a foreign trust domain must be in the listener's federatesWith"
	}
	d.fail(n, "%s: trust domain %q is not one of the configured trust domains (%s)%s", path, td.Name(), strings.Join(names, ", "), hint)
	return false
}

var dns1123 = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

func (d *decoder) document(n *yaml.Node) (Declaration, bool) {
	before := len(d.errs)
	decl := Declaration{File: d.file, Line: n.Line}
	f, _ := d.object(n, documentSchema, "document")
	if f == nil {
		return decl, false
	}
	if v := f["apiVersion"]; v != nil {
		if s, ok := d.str(v, "apiVersion"); ok && s != APIVersion {
			d.fail(v, "apiVersion: %q is not supported (want %s)", s, APIVersion)
		}
	}
	if v := f["kind"]; v != nil {
		if s, ok := d.str(v, "kind"); ok && s != Kind {
			d.fail(v, "kind: %q is not supported (want %s)", s, Kind)
		}
	}
	if v := f["metadata"]; v != nil {
		d.metadata(v, &decl)
	}
	if v := f["spec"]; v != nil {
		d.spec(v, &decl)
	}
	return decl, len(d.errs) == before
}

func (d *decoder) metadata(n *yaml.Node, decl *Declaration) {
	f, _ := d.object(n, metadataSchema, "metadata")
	if v := f["name"]; v != nil {
		if s, ok := d.str(v, "metadata.name"); ok {
			if len(s) > 253 || !dns1123.MatchString(s) {
				d.fail(v, "metadata.name: %q is not a lowercase DNS name (RFC 1123)", s)
			}
			decl.Name = s
		}
	}
	if v := f["namespace"]; v != nil {
		if s, ok := d.str(v, "metadata.namespace"); ok {
			if len(s) > 63 || !dns1123.MatchString(s) || strings.Contains(s, ".") {
				d.fail(v, "metadata.namespace: %q is not a DNS label (RFC 1123)", s)
			}
			decl.Namespace = s
		}
	}
	for _, key := range []string{"labels", "annotations"} {
		v := f[key]
		if v == nil {
			continue
		}
		if v.Kind != yaml.MappingNode {
			d.fail(v, "metadata.%s: want a mapping of strings, got %s", key, kindName(v))
			continue
		}
		for i := 1; i < len(v.Content); i += 2 {
			if c := v.Content[i]; c.Kind != yaml.ScalarNode {
				d.fail(c, "metadata.%s.%s: want a string, got %s", key, v.Content[i-1].Value, kindName(c))
			}
		}
	}
}

func (d *decoder) spec(n *yaml.Node, decl *Declaration) {
	f, _ := d.object(n, specSchema, "spec")
	if f == nil {
		return
	}
	if v := f["spiffeID"]; v != nil {
		decl.ID, _ = d.spiffeID(v, "spec.spiffeID")
		d.self = decl.ID.TrustDomain()
	}
	ports := map[uint32]string{} // port → where it was first used
	usePort := func(n *yaml.Node, p uint32, path string) {
		if prev, dup := ports[p]; dup {
			d.fail(n, "%s: port %d is already used by %s", path, p, prev)
			return
		}
		ports[p] = fmt.Sprintf("%s (line %d)", strings.TrimSuffix(path, ".port"), n.Line)
	}
	var inboundNodes []*yaml.Node
	if v := f["inbound"]; v != nil {
		items, _ := d.list(v, specSchema.prop("inbound"), "spec.inbound")
		for i, it := range items {
			path := fmt.Sprintf("spec.inbound[%d]", i)
			in, ok := d.inbound(it, path)
			if ok {
				usePort(it, in.Port, path+".port")
			}
			decl.Inbound = append(decl.Inbound, in)
			inboundNodes = append(inboundNodes, it)
		}
	}
	if v := f["outbound"]; v != nil {
		items, _ := d.list(v, specSchema.prop("outbound"), "spec.outbound")
		for i, it := range items {
			path := fmt.Sprintf("spec.outbound[%d]", i)
			out, ok := d.outbound(it, path)
			if ok {
				usePort(it, out.Port, path+".port")
			}
			decl.Outbound = append(decl.Outbound, out)
		}
	}
	// The sidecar refuses an app address that reaches one of its own
	// listeners (proxy.Config.Validate): refused here, with its line.
	for i, in := range decl.Inbound {
		host, port, err := net.SplitHostPort(in.App)
		if err != nil {
			continue
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			continue
		}
		ip, _ := netip.ParseAddr(host)
		if own, ok := ports[uint32(p)]; ok && (proxy.IsLoopbackHost(host) || strings.EqualFold(host, "localhost") || ip.Unmap().IsUnspecified()) {
			n := inboundNodes[i]
			for j := 0; j+1 < len(n.Content); j += 2 {
				if n.Content[j].Value == "appAddress" {
					n = n.Content[j+1]
				}
			}
			d.fail(n, "spec.inbound[%d].appAddress: %s is this workload's own listener %s: a peer admitted here would reach it through the sidecar", i, in.App, own)
		}
		// The sidecar refuses two inbound listeners that share an app and
		// disagree on the PROXY protocol header (proxy.Config.Validate).
		for j, o := range decl.Inbound[:i] {
			if in.App != "" && o.ProxyProtocol != in.ProxyProtocol && proxy.Reaches(in.App, o.App) {
				n := inboundNodes[i]
				for k := 0; k+1 < len(n.Content); k += 2 {
					if n.Content[k].Value == "proxyProtocol" {
						n = n.Content[k+1]
					}
				}
				d.fail(n, "spec.inbound[%d].proxyProtocol: spec.inbound[%d] shares the app %s and only one of them sends it a PROXY protocol header: a peer of the other could write a header of its own, naming any SPIFFE ID, where the app reads latch's", i, j, in.App)
			}
		}
	}
}

func (d *decoder) inbound(n *yaml.Node, path string) (Inbound, bool) {
	before := len(d.errs)
	var in Inbound
	f, _ := d.object(n, inboundSchema, path)
	if f == nil {
		return in, false
	}
	if v := f["port"]; v != nil {
		in.Port, _ = d.port(v, path+".port")
	}
	if v := f["appAddress"]; v != nil {
		in.App, _ = d.hostPort(v, path+".appAddress")
	}
	if v := f["idleTimeout"]; v != nil {
		in.IdleTimeout, _ = d.duration(v, path+".idleTimeout")
	}
	if v := f["proxyProtocol"]; v != nil {
		if s, ok := d.str(v, path+".proxyProtocol"); ok {
			if s != "v2" {
				d.fail(v, "%s.proxyProtocol: %q: the only PROXY protocol version latch sends is v2 (leave the field out for none)", path, s)
			} else {
				in.ProxyProtocol = true
			}
		}
	}
	if v := f["federatesWith"]; v != nil {
		in.FederatesWith, _ = d.federation(v, inboundSchema.prop("federatesWith"), path+".federatesWith")
	}
	d.federated = in.FederatesWith
	defer func() { d.federated = nil }()
	if v := f["allow"]; v != nil {
		items, _ := d.list(v, inboundSchema.prop("allow"), path+".allow")
		for j, it := range items {
			if r, ok := d.allow(it, fmt.Sprintf("%s.allow[%d]", path, j)); ok {
				in.Allow = append(in.Allow, r)
			}
		}
	}
	return in, len(d.errs) == before
}

// federation reads a listener's federatesWith: bare names of foreign trust
// domains, each once, none the workload's own.
func (d *decoder) federation(n *yaml.Node, s *schema, path string) ([]spiffeid.TrustDomain, bool) {
	items, ok := d.list(n, s, path)
	var out []spiffeid.TrustDomain
	for j, it := range items {
		p := fmt.Sprintf("%s[%d]", path, j)
		v, good := d.str(it, p)
		if !good || d.tooLong(it, p, v, maxTDLength) {
			ok = false
			continue
		}
		td, err := identity.ParseTrustDomain(v)
		switch {
		case err != nil:
			d.fail(it, "%s: %v", p, err)
		case td == d.self:
			d.fail(it, "%s: %s is the workload's own trust domain, whose peers are always accepted: list only foreign trust domains", p, td.Name())
		case slices.Contains(out, td):
			d.fail(it, "%s: %s listed twice", p, td.Name())
		default:
			out = append(out, td)
			continue
		}
		ok = false
	}
	return out, ok
}

func (d *decoder) allow(n *yaml.Node, path string) (identity.Rule, bool) {
	f, ok := d.object(n, allowSchema, path)
	if !ok {
		return identity.Rule{}, false
	}
	if len(f) != 1 {
		d.fail(n, "%s: give exactly one of id, trustDomain, pathPrefix (got %d)", path, len(f))
		return identity.Rule{}, false
	}
	for kind, v := range f {
		s, ok := d.str(v, path+"."+kind)
		if !ok {
			return identity.Rule{}, false
		}
		limit := maxIDLength
		if kind == "trustDomain" {
			limit = maxTDLength
		}
		if d.tooLong(v, path+"."+kind, s, limit) {
			return identity.Rule{}, false
		}
		r, err := identity.ParseRule(kind, s)
		if err != nil {
			d.fail(v, "%s: %v", path, err)
			return identity.Rule{}, false
		}
		if !d.inTrustDomains(v, path+"."+kind, r.TrustDomain()) {
			return identity.Rule{}, false
		}
		if r.Kind() == identity.MatchID {
			// An exact rule must name a workload, as spec.spiffeID does.
			if _, ok := d.spiffeID(v, path+"."+kind); !ok {
				return identity.Rule{}, false
			}
		}
		return r, true
	}
	return identity.Rule{}, false
}

func (d *decoder) outbound(n *yaml.Node, path string) (Outbound, bool) {
	before := len(d.errs)
	var out Outbound
	f, _ := d.object(n, outboundSchema, path)
	if f == nil {
		return out, false
	}
	if v := f["port"]; v != nil {
		out.Port, _ = d.port(v, path+".port")
	}
	if v := f["federatesWith"]; v != nil {
		out.FederatesWith, _ = d.federation(v, outboundSchema.prop("federatesWith"), path+".federatesWith")
	}
	if v := f["serverID"]; v != nil {
		d.federated = out.FederatesWith
		var ok bool
		out.ServerID, ok = d.spiffeID(v, path+".serverID")
		d.federated = nil
		// The sidecar verifies servers of its own trust domain, and of those
		// this listener federates with: a server of another trust domain
		// the control plane serves would be refused at every handshake.
		if td := out.ServerID.TrustDomain(); ok && !d.self.IsZero() && td != d.self && !slices.Contains(out.FederatesWith, td) {
			d.fail(v, "%s.serverID: %s is in trust domain %s, not the workload's own (%s): add %s to federatesWith to verify it against that trust domain's federated bundle",
				path, out.ServerID, td.Name(), d.self.Name(), td.Name())
		}
	}
	if v := f["idleTimeout"]; v != nil {
		out.IdleTimeout, _ = d.duration(v, path+".idleTimeout")
	}
	target, endpoints := f["target"], f["endpoints"]
	switch {
	case target != nil && endpoints != nil:
		d.fail(endpoints, "%s: give target or endpoints, not both", path)
	case target != nil:
		if s, ok := d.hostPort(target, path+".target"); ok {
			out.Endpoints = []string{s}
		}
	case endpoints != nil:
		items, _ := d.list(endpoints, outboundSchema.prop("endpoints"), path+".endpoints")
		if len(items) == 0 && endpoints.Kind == yaml.SequenceNode {
			d.fail(endpoints, "%s.endpoints: must not be empty", path)
		}
		seen := map[string]bool{}
		for j, it := range items {
			s, ok := d.hostPort(it, fmt.Sprintf("%s.endpoints[%d]", path, j))
			if !ok {
				continue
			}
			if seen[s] {
				d.fail(it, "%s.endpoints[%d]: %q listed twice", path, j, s)
				continue
			}
			seen[s] = true
			out.Endpoints = append(out.Endpoints, s)
		}
	default:
		d.fail(n, "%s: missing target or endpoints", path)
	}
	return out, len(d.errs) == before
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		switch n.Tag {
		case "!!null":
			return "null"
		case "!!int":
			return "a number (" + n.Value + ")"
		case "!!bool":
			return "a boolean (" + n.Value + ")"
		case "!!float":
			return "a number (" + n.Value + ")"
		}
		return fmt.Sprintf("the string %q", n.Value)
	}
	return "nothing"
}
