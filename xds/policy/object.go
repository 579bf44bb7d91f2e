package policy

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ParseObject decodes a ServicePolicy object read from the Kubernetes API
// server with the decoder files go through: one set of rules, one set of
// messages. Refusals name the object, and the field in their reason. Only
// the object's name, namespace and spec are read: the rest of its metadata
// and its status belong to the API server and the control plane.
//
// With opts.Owners set, the declared workload ID must be one the template
// gives the object's namespace; a refusal for that wraps ErrNotOwned.
func ParseObject(o Object, opts Options) ([]Declaration, error) {
	src := ObjectSource(o.Namespace, o.Name).String()
	doc := map[string]any{
		"apiVersion": APIVersion,
		"kind":       Kind,
		"metadata":   map[string]string{"name": o.Name, "namespace": o.Namespace},
	}
	if len(o.Spec) > 0 && string(o.Spec) != "null" {
		if !json.Valid(o.Spec) {
			return nil, &FileError{File: src, Errors: []*Error{{File: src, Reason: "spec: not valid JSON"}}}
		}
		doc["spec"] = json.RawMessage(o.Spec)
	}
	// JSON is YAML: the document goes through Parse as it is.
	data, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", src, err)
	}
	decls, err := Parse(src, data, opts)
	if err != nil {
		// Lines of a document made here mean nothing to the object's
		// author; the reasons name the fields.
		var fe *FileError
		if errors.As(err, &fe) {
			for _, e := range fe.Errors {
				e.Line = 0
			}
		}
		return nil, err
	}
	for i := range decls {
		decls[i].File, decls[i].Line = src, 0
		if opts.Owners != nil && !opts.Owners.Owns(o.Namespace, decls[i].ID) {
			return nil, &FileError{File: src, Errors: []*Error{{File: src, Err: ErrNotOwned, Reason: fmt.Sprintf(
				"spec.spiffeID: %s is not a workload of namespace %q: a ServicePolicy may only declare the IDs of its own namespace (%s)",
				decls[i].ID, o.Namespace, opts.Owners.For(o.Namespace))}}}
		}
	}
	return decls, nil
}

// DefaultIDTemplate is the IDs a namespace owns by default: SPIRE's
// ClusterSPIFFEID default and Istio's convention.
const DefaultIDTemplate = "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"

// IDTemplate says which workload IDs belong to a namespace: a SPIFFE ID in
// which {trustDomain} stands for any trust domain, {namespace} for the
// namespace and {serviceAccount} for any one path segment.
type IDTemplate struct {
	raw string
	re  *regexp.Regexp
	ns  []int // indexes of the {namespace} groups in re
}

var placeholder = regexp.MustCompile(`\{[^{}]*\}`)

// ParseIDTemplate parses a template such as DefaultIDTemplate.
func ParseIDTemplate(s string) (*IDTemplate, error) {
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return nil, fmt.Errorf("ID template %q: must start with spiffe://", s)
	}
	var (
		expr    strings.Builder
		groups  int
		nsGroup []int
		sample  = placeholder.ReplaceAllStringFunc(rest, func(p string) string {
			if p == "{trustDomain}" {
				return "td.example"
			}
			return "x"
		})
	)
	if strings.ContainsAny(sample, "{}") {
		return nil, fmt.Errorf("ID template %q: unbalanced braces", s)
	}
	expr.WriteString("^spiffe://")
	last := 0
	for _, m := range placeholder.FindAllStringIndex(rest, -1) {
		expr.WriteString(regexp.QuoteMeta(rest[last:m[0]]))
		switch p := rest[m[0]:m[1]]; p {
		case "{trustDomain}":
			if m[0] != 0 {
				return nil, fmt.Errorf("ID template %q: {trustDomain} may only stand for the whole trust domain", s)
			}
			expr.WriteString(`[^/]+`)
		case "{namespace}":
			groups++
			nsGroup = append(nsGroup, groups)
			expr.WriteString(`([^/]+)`)
		case "{serviceAccount}":
			expr.WriteString(`[^/]+`)
		default:
			return nil, fmt.Errorf("ID template %q: unknown placeholder %s (known: {trustDomain}, {namespace}, {serviceAccount})", s, p)
		}
		last = m[1]
	}
	expr.WriteString(regexp.QuoteMeta(rest[last:]))
	expr.WriteString("$")
	if len(nsGroup) == 0 {
		return nil, fmt.Errorf("ID template %q: must contain {namespace}, or every namespace could declare every workload", s)
	}
	if id, err := spiffeid.FromString("spiffe://" + sample); err != nil || id.Path() == "" {
		return nil, fmt.Errorf("ID template %q: does not make a workload SPIFFE ID (spiffe://%s): %v", s, sample, err)
	}
	return &IDTemplate{raw: s, re: regexp.MustCompile(expr.String()), ns: nsGroup}, nil
}

// String is the template as written.
func (t *IDTemplate) String() string { return t.raw }

// For is the template with namespace filled in, to show what IDs look like.
func (t *IDTemplate) For(namespace string) string {
	return strings.ReplaceAll(t.raw, "{namespace}", namespace)
}

// Owns reports whether id is a workload of namespace.
func (t *IDTemplate) Owns(namespace string, id spiffeid.ID) bool {
	m := t.re.FindStringSubmatch(id.String())
	if m == nil {
		return false
	}
	for _, g := range t.ns {
		if m[g] != namespace {
			return false
		}
	}
	return true
}
