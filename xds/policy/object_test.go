package policy

import (
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var ownedOpts = func() Options {
	o := testOpts
	t, err := ParseIDTemplate(DefaultIDTemplate)
	if err != nil {
		panic(err)
	}
	o.Owners = t
	return o
}()

const goodSpec = `{"spiffeID":"spiffe://mesh.test/ns/shop/sa/backend","inbound":[{"port":8443,"appAddress":"127.0.0.1:8080","allow":[{"id":"spiffe://mesh.test/ns/web/sa/frontend"}]}]}`

func TestParseObject(t *testing.T) {
	decls, err := ParseObject(Object{Namespace: "shop", Name: "backend", Generation: 3, Spec: []byte(goodSpec)}, ownedOpts)
	if err != nil {
		t.Fatal(err)
	}
	if len(decls) != 1 {
		t.Fatalf("%d declarations", len(decls))
	}
	d := decls[0]
	if d.Name != "backend" || d.Namespace != "shop" || d.File != "ServicePolicy shop/backend" || d.Line != 0 ||
		d.ID.String() != "spiffe://mesh.test/ns/shop/sa/backend" || len(d.Inbound) != 1 || d.Inbound[0].Port != 8443 {
		t.Errorf("declaration: %+v", d)
	}
	// The same spec in a file decodes to the same policy.
	fromFile, err := Parse("f.yaml", []byte("apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: backend, namespace: shop}\nspec: "+goodSpec+"\n"), testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fromFile[0].Inbound[0].Allow[0].String(), d.Inbound[0].Allow[0].String(); got != want {
		t.Errorf("file and object disagree: %s vs %s", got, want)
	}
}

// TestParseObjectHostile: an object is refused with the object and the
// field named, the same reasons as a file, and no line numbers (there are
// none the author could look up).
func TestParseObjectHostile(t *testing.T) {
	tests := []struct {
		name, ns, spec string
		reason         string
		notOwned       bool
	}{
		{"unknown field", "shop", strings.Replace(goodSpec, `"inbound"`, `"replicas":3,"inbound"`, 1), `spec: unknown field "replicas"`, false},
		{"bad ID", "shop", strings.Replace(goodSpec, "spiffe://mesh.test/ns/shop/sa/backend", "spiffe://MESH/x", 1), "spec.spiffeID: \"spiffe://MESH/x\" is not a SPIFFE ID", false},
		{"port out of range", "shop", strings.Replace(goodSpec, "8443", "70000", 1), "spec.inbound[0].port: port 70000 out of range", false},
		{"unconfigured trust domain", "shop", strings.Replace(goodSpec, "spiffe://mesh.test/ns/shop/sa/backend", "spiffe://evil.test/ns/shop/sa/backend", 1), `trust domain "evil.test" is not one of the configured`, false},
		{"another namespace's workload", "web", goodSpec, `spec.spiffeID: spiffe://mesh.test/ns/shop/sa/backend is not a workload of namespace "web"`, true},
		{"no spec", "shop", "", `missing required field "spec"`, false},
		{"null spec", "shop", "null", `missing required field "spec"`, false},
		{"spec not JSON", "shop", "{", "spec: not valid JSON", false},
		{"spec a list", "shop", "[1]", "spec: want a mapping", false},
		{"too many allow entries", "shop", strings.Replace(goodSpec, `"allow":[`, `"allow":[`+strings.Repeat(`{"trustDomain":"mesh.test"},`, maxAllow), 1), "at most 256 allowed", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseObject(Object{Namespace: tt.ns, Name: "backend", Spec: []byte(tt.spec)}, ownedOpts)
			if err == nil {
				t.Fatal("accepted")
			}
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("error %T: %v", err, err)
			}
			found := false
			for _, e := range fe.Errors {
				if e.Line != 0 {
					t.Errorf("an object's error carries line %d: %v", e.Line, e)
				}
				if e.File == "ServicePolicy "+tt.ns+"/backend" && strings.Contains(e.Reason, tt.reason) {
					found = true
				}
			}
			if !found {
				t.Errorf("want %q, got %v", tt.reason, err)
			}
			if got := errors.Is(err, ErrNotOwned); got != tt.notOwned {
				t.Errorf("errors.Is(ErrNotOwned) = %v, want %v", got, tt.notOwned)
			}
		})
	}
}

func TestIDTemplate(t *testing.T) {
	for _, bad := range []string{
		"",
		"https://{trustDomain}/ns/{namespace}",
		"spiffe://{trustDomain}/sa/{serviceAccount}",        // no namespace: everyone owns everything
		"spiffe://{trustDomain}/ns/{namespace}/{pod}",       // unknown placeholder
		"spiffe://td-{trustDomain}/ns/{namespace}",          // a trust domain is whole
		"spiffe://{trustDomain}/ns/{namespace",              // unbalanced
		"spiffe://{trustDomain}",                            // no path
		"spiffe://{trustDomain}/ns/{namespace}/../x",        // not a SPIFFE ID
		"spiffe://{trustDomain}/ns/{namespace}/sa/{}/x",     // empty placeholder
		"spiffe://{trustDomain}/ns/{namespace}/sa/x}{y",     // braces in a literal
		"spiffe://UPPER/ns/{namespace}/sa/{serviceAccount}", // not a trust domain
	} {
		if _, err := ParseIDTemplate(bad); err == nil {
			t.Errorf("ParseIDTemplate(%q) accepted", bad)
		}
	}
	def, err := ParseIDTemplate(DefaultIDTemplate)
	if err != nil {
		t.Fatal(err)
	}
	custom, err := ParseIDTemplate("spiffe://mesh.test/k8s/{namespace}/workload/{serviceAccount}")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		tmpl *IDTemplate
		ns   string
		id   string
		want bool
	}{
		{def, "shop", "spiffe://mesh.test/ns/shop/sa/backend", true},
		{def, "shop", "spiffe://partner.test/ns/shop/sa/backend", true},
		{def, "shop", "spiffe://mesh.test/ns/shopping/sa/backend", false},
		{def, "shop", "spiffe://mesh.test/ns/sho/sa/backend", false},
		{def, "shop", "spiffe://mesh.test/ns/shop/sa/backend/extra", false},
		{def, "shop", "spiffe://mesh.test/ns/shop/backend", false},
		{def, "shop", "spiffe://mesh.test/x/ns/shop/sa/backend", false},
		{def, "shop", "spiffe://mesh.test/ns/web/sa/shop", false},
		{custom, "shop", "spiffe://mesh.test/k8s/shop/workload/api", true},
		{custom, "shop", "spiffe://other.test/k8s/shop/workload/api", false},
		{custom, "shop", "spiffe://mesh.test/k8s/web/workload/api", false},
	}
	for _, tt := range tests {
		if got := tt.tmpl.Owns(tt.ns, spiffeid.RequireFromString(tt.id)); got != tt.want {
			t.Errorf("%s: Owns(%q, %s) = %v, want %v", tt.tmpl, tt.ns, tt.id, got, tt.want)
		}
	}
	if got := def.For("shop"); got != "spiffe://{trustDomain}/ns/shop/sa/{serviceAccount}" {
		t.Errorf("For = %q", got)
	}
}

func objectFor(ns, name string, gen int64, id string, port int) Object {
	return Object{Namespace: ns, Name: name, Generation: gen, Spec: []byte(`{"spiffeID":"` + id + `","inbound":[{"port":` + itoa(port) + `,"appAddress":"127.0.0.1:8080"}]}`)}
}

func changed(c Change) string {
	var s []string
	for _, id := range c.IDs {
		s = append(s, id.String())
	}
	return strings.Join(s, " ")
}

// TestStoreAcrossSources: files and objects share one set of IDs under the
// incumbency rule; the loser says who keeps the ID and takes it when the
// holder lets go; a bad update keeps the last good generation; each update
// reports only the IDs it changed.
func TestStoreAcrossSources(t *testing.T) {
	st, err := NewStore(ownedOpts, nil)
	if err != nil {
		t.Fatal(err)
	}
	const backend, frontend = "spiffe://mesh.test/ns/shop/sa/backend", "spiffe://mesh.test/ns/shop/sa/frontend"
	fileSrc, objSrc := FileSource("/decl/backend.yaml"), ObjectSource("shop", "backend")

	ch := st.SetFile("/decl/backend.yaml", []byte(policyFor("backend", backend, 1001)))
	if changed(ch) != backend {
		t.Fatalf("file added: changed %q", changed(ch))
	}
	// The object comes second: the file keeps the ID.
	ch = st.SetObject(objectFor("shop", "backend", 1, backend, 2002))
	if changed(ch) != "" || len(ch.Sources) != 1 || ch.Sources[0] != objSrc {
		t.Fatalf("conflicting object: change %+v", ch)
	}
	s, _ := st.State(objSrc)
	if s.Reason != ReasonConflict || s.Serving != nil || !strings.Contains(s.Errors[0].Reason, `conflicts with ServicePolicy "backend" at /decl/backend.yaml:1, which keeps it`) ||
		!errors.Is(s.Errors[0], ErrConflict) || !strings.Contains(s.Errors[len(s.Errors)-1].Reason, "serves nothing until fixed") {
		t.Errorf("loser's state: %+v", s)
	}
	if got := ids(st.Snapshot()); got != backend+"@1001" {
		t.Fatalf("served %q", got)
	}
	// An unrelated object changes only its own ID.
	ch = st.SetObject(objectFor("shop", "frontend", 1, frontend, 3003))
	if changed(ch) != frontend {
		t.Fatalf("unrelated object: changed %q", changed(ch))
	}
	// The same generation again is not parsed or changed.
	if ch = st.SetObject(objectFor("shop", "frontend", 1, frontend, 3003)); !ch.Empty() {
		t.Fatalf("same generation: change %+v", ch)
	}
	// The file goes: the waiting object takes the ID.
	ch = st.Remove(fileSrc)
	if changed(ch) != backend || !sameSources(ch.Sources, fileSrc, objSrc) {
		t.Fatalf("holder removed: change %+v", ch)
	}
	if got := ids(st.Snapshot()); got != backend+"@2002 "+frontend+"@3003" {
		t.Fatalf("served %q", got)
	}
	if s, _ = st.State(objSrc); !s.Accepted() || s.ServingGeneration != 1 {
		t.Errorf("winner's state: %+v", s)
	}
	// The file comes back: now it is the newcomer, and it loses.
	st.SetFile("/decl/backend.yaml", []byte(policyFor("backend", backend, 1001)))
	if s, _ = st.State(fileSrc); s.Reason != ReasonConflict || !strings.Contains(s.Errors[0].Reason, "conflicts with ServicePolicy shop/backend, which keeps it") {
		t.Errorf("returning file: %+v", s)
	}
	// A bad generation keeps generation 1 serving and says so.
	bad := objectFor("shop", "backend", 2, backend, 70000)
	if ch = st.SetObject(bad); changed(ch) != "" {
		t.Fatalf("bad generation changed %q", changed(ch))
	}
	s, _ = st.State(objSrc)
	if s.Reason != ReasonInvalid || s.Generation != 2 || s.ServingGeneration != 1 || !strings.Contains(s.Errors[len(s.Errors)-1].Reason, "serving generation 1") {
		t.Errorf("bad generation: %+v", s)
	}
	if got := ids(st.Snapshot()); got != backend+"@2002 "+frontend+"@3003" {
		t.Fatalf("served %q", got)
	}
	// An object may not move to another namespace's workload.
	ch = st.SetObject(objectFor("shop", "backend", 3, "spiffe://mesh.test/ns/bank/sa/vault", 2002))
	if s, _ = st.State(objSrc); s.Reason != ReasonNotOwned || changed(ch) != "" {
		t.Errorf("foreign ID: %+v, change %+v", s, ch)
	}
	// The object moves to another ID of its namespace: the old one is
	// released and the waiting file takes it.
	ch = st.SetObject(objectFor("shop", "backend", 4, "spiffe://mesh.test/ns/shop/sa/backend-v2", 2002))
	if changed(ch) != "spiffe://mesh.test/ns/shop/sa/backend-v2 "+backend {
		t.Fatalf("moved: changed %q", changed(ch))
	}
	if got := ids(st.Snapshot()); got != backend+"@1001 spiffe://mesh.test/ns/shop/sa/backend-v2@2002 "+frontend+"@3003" {
		t.Fatalf("served %q", got)
	}
	if s, _ = st.State(fileSrc); !s.Accepted() {
		t.Errorf("file after the object moved: %+v", s)
	}
	// Deleting an object removes its workload's policy.
	ch = st.Remove(ObjectSource("shop", "frontend"))
	if changed(ch) != frontend {
		t.Fatalf("deleted: changed %q", changed(ch))
	}
	if _, ok := st.Snapshot().Lookup(spiffeid.RequireFromString(frontend)); ok {
		t.Error("a deleted object's policy is still served")
	}
}

func sameSources(got []Source, want ...Source) bool {
	if len(got) != len(want) {
		return false
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || g == w
		}
		if !found {
			return false
		}
	}
	return true
}

// FuzzParseObject: whatever an object's spec holds, ParseObject returns
// declarations of the object's namespace or errors that name the object,
// without a line; it never panics.
func FuzzParseObject(f *testing.F) {
	f.Add([]byte(goodSpec), "shop")
	f.Add([]byte(`{"spiffeID":"spiffe://mesh.test/ns/web/sa/x"}`), "web")
	f.Add([]byte(`{"spiffeID":1e400,"inbound":[{"port":-1}]}`), "shop")
	f.Add([]byte(`{"spiffeID":"spiffe://mesh.test/ns/shop/sa/a","outbound":[{"port":1,"target":"a:1","endpoints":["b:2"],"serverID":"spiffe://mesh.test/x"}]}`), "shop")
	f.Fuzz(func(t *testing.T, spec []byte, ns string) {
		decls, err := ParseObject(Object{Namespace: ns, Name: "n", Spec: spec}, ownedOpts)
		if err != nil {
			var fe *FileError
			if !errors.As(err, &fe) || len(fe.Errors) == 0 {
				t.Fatalf("error without location: %v", err)
			}
			for _, e := range fe.Errors {
				if e.Line != 0 || e.File != "ServicePolicy "+ns+"/n" {
					t.Fatalf("error located at %s:%d", e.File, e.Line)
				}
			}
			return
		}
		for _, d := range decls {
			if !ownedOpts.Owners.Owns(ns, d.ID) {
				t.Fatalf("accepted %s for namespace %q", d.ID, ns)
			}
		}
	})
}
