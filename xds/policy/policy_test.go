package policy

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/identity"
)

var update = flag.Bool("update", false, "rewrite the committed CRD manifest")

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var testOpts = Options{TrustDomains: []spiffeid.TrustDomain{
	spiffeid.RequireTrustDomainFromString("mesh.test"),
	spiffeid.RequireTrustDomainFromString("partner.test"),
}}

const good = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata:
  name: backend
  namespace: shop
spec:
  spiffeID: spiffe://mesh.test/ns/shop/sa/backend
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      idleTimeout: 30m
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - pathPrefix: spiffe://mesh.test/ns/ops
        - trustDomain: partner.test
  outbound:
    - port: 9001
      endpoints: ["10.0.0.1:8443", "db.shop.svc:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
`

func TestParseGood(t *testing.T) {
	decls, err := Parse("backend.yaml", []byte(good+"---\n---\n"+strings.ReplaceAll(good, "backend", "other")), testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if len(decls) != 2 {
		t.Fatalf("got %d declarations, want 2", len(decls))
	}
	d := decls[0]
	if d.Name != "backend" || d.Namespace != "shop" || d.ID.String() != "spiffe://mesh.test/ns/shop/sa/backend" || d.Line != 1 {
		t.Errorf("header: %+v", d)
	}
	if len(d.Inbound) != 1 || d.Inbound[0].Port != 8443 || d.Inbound[0].App != "127.0.0.1:8080" || d.Inbound[0].IdleTimeout != 30*time.Minute {
		t.Errorf("inbound: %+v", d.Inbound)
	}
	want := identity.NewAllowList(
		identity.AllowID(spiffeid.RequireFromString("spiffe://mesh.test/ns/shop/sa/frontend")),
		identity.AllowPathPrefix(spiffeid.RequireFromString("spiffe://mesh.test/ns/ops")),
		identity.AllowTrustDomain(spiffeid.RequireTrustDomainFromString("partner.test")),
	)
	if got := identity.NewAllowList(d.Inbound[0].Allow...); !got.Equal(want) {
		t.Errorf("allow = %v, want %v", got, want)
	}
	if len(d.Outbound) != 1 || d.Outbound[0].Port != 9001 || strings.Join(d.Outbound[0].Endpoints, ",") != "10.0.0.1:8443,db.shop.svc:8443" ||
		d.Outbound[0].ServerID.String() != "spiffe://mesh.test/ns/shop/sa/db" {
		t.Errorf("outbound: %+v", d.Outbound)
	}
	if decls[1].Line != 22 {
		t.Errorf("second document line = %d, want 22", decls[1].Line)
	}
}

// TestParseProxyProtocol: proxyProtocol takes v2 and nothing else, and is
// off where it is not written.
func TestParseProxyProtocol(t *testing.T) {
	with := func(v string) string {
		return strings.Replace(good, "      idleTimeout: 30m\n", "      idleTimeout: 30m\n      proxyProtocol: "+v+"\n", 1)
	}
	decls, err := Parse("p.yaml", []byte(with("v2")), testOpts)
	if err != nil {
		t.Fatal(err)
	}
	if !decls[0].Inbound[0].ProxyProtocol {
		t.Error("proxyProtocol: v2 not read")
	}
	if decls, err = Parse("p.yaml", []byte(good), testOpts); err != nil || decls[0].Inbound[0].ProxyProtocol {
		t.Errorf("without proxyProtocol: %v, %+v", err, decls)
	}
	for _, bad := range []string{"v1", "true", "V2", "[v2]"} {
		_, err := Parse("p.yaml", []byte(with(bad)), testOpts)
		if err == nil || !strings.Contains(err.Error(), "p.yaml:12: spec.inbound[0].proxyProtocol") {
			t.Errorf("proxyProtocol: %s: %v, want a refusal at p.yaml:12", bad, err)
		}
	}
}

// TestParseFederation: a listener's federatesWith lets its allow rules and
// server ID name a foreign trust domain the control plane does not serve;
// nothing else does.
func TestParseFederation(t *testing.T) {
	const doc = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: backend}
spec:
  spiffeID: spiffe://mesh.test/ns/shop/sa/backend
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      federatesWith: [third.test]
      allow:
        - pathPrefix: spiffe://third.test/ns/billing
  outbound:
    - port: 9001
      target: pay.third.test:443
      serverID: spiffe://third.test/pay
      federatesWith: [third.test]
`
	decls, err := Parse("f.yaml", []byte(doc), testOpts)
	if err != nil {
		t.Fatal(err)
	}
	in, out := decls[0].Inbound[0], decls[0].Outbound[0]
	if len(in.FederatesWith) != 1 || in.FederatesWith[0].Name() != "third.test" || len(in.Allow) != 1 || in.Allow[0].TrustDomain().Name() != "third.test" {
		t.Errorf("inbound %+v", in)
	}
	if len(out.FederatesWith) != 1 || out.ServerID.String() != "spiffe://third.test/pay" {
		t.Errorf("outbound %+v", out)
	}

	for _, tc := range []struct {
		name, from, to string
		line           int
		reason         string
	}{
		{"allow rule of a trust domain the listener does not federate with", "      federatesWith: [third.test]\n      allow:", "      allow:", 10, `spec.inbound[0].allow[0].pathPrefix: trust domain "third.test" is not one of the configured trust domains`},
		{"server of a trust domain the listener does not federate with", "      serverID: spiffe://third.test/pay\n      federatesWith: [third.test]", "      serverID: spiffe://third.test/pay", 15, `trust domain "third.test" is not one of the configured trust domains (mesh.test, partner.test); a foreign trust domain must be in the listener's federatesWith`},
		{"server of another served trust domain, not federated", "      serverID: spiffe://third.test/pay\n      federatesWith: [third.test]", "      serverID: spiffe://partner.test/pay", 15, "spec.outbound[0].serverID: spiffe://partner.test/pay is in trust domain partner.test, not the workload's own (mesh.test): add partner.test to federatesWith"},
		{"federating with the workload's own trust domain", "federatesWith: [third.test]\n      allow", "federatesWith: [third.test, mesh.test]\n      allow", 9, "spec.inbound[0].federatesWith[1]: mesh.test is the workload's own trust domain"},
		{"a trust domain listed twice", "federatesWith: [third.test]\n      allow", "federatesWith: [third.test, third.test]\n      allow", 9, "spec.inbound[0].federatesWith[1]: third.test listed twice"},
		{"a SPIFFE ID as trust domain", "federatesWith: [third.test]\n      allow", "federatesWith: [third.test, \"spiffe://third.test/ns/x\"]\n      allow", 9, "spec.inbound[0].federatesWith[1]: \"spiffe://third.test/ns/x\": must be a bare trust domain name"},
		{"not a list", "federatesWith: [third.test]\n      allow", "federatesWith: third.test\n      allow", 9, "spec.inbound[0].federatesWith: want a list"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := strings.Replace(doc, tc.from, tc.to, 1)
			if src == doc {
				t.Fatalf("edit %q did not apply", tc.from)
			}
			_, err := Parse("f.yaml", []byte(src), testOpts)
			want := fmt.Sprintf("f.yaml:%d: ", tc.line)
			if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("got %v\nwant %s…%s", err, want, tc.reason)
			}
		})
	}
}

// TestParseHostile: every refusal names the file, the line and the reason.
func TestParseHostile(t *testing.T) {
	tests := []struct {
		name   string
		edit   func(string) string
		line   int
		reason string
	}{
		{"unknown top field", func(s string) string { return s + "status: {}\n" }, 20, `unknown field "status"`},
		{"unknown spec field", func(s string) string {
			return strings.Replace(s, "  inbound:", "  replicas: 3\n  inbound:", 1)
		}, 8, `spec: unknown field "replicas"`},
		{"unknown inbound field (typo)", func(s string) string { return strings.Replace(s, "appAddress", "appAdress", 1) }, 10, `unknown field "appAdress"`},
		{"unknown allow kind", func(s string) string { return strings.Replace(s, "- trustDomain: partner.test", "- regex: .*", 1) }, 15, `unknown field "regex"`},
		{"two allow kinds in one item", func(s string) string {
			return strings.Replace(s, "- trustDomain: partner.test", "- trustDomain: partner.test\n          id: spiffe://mesh.test/x", 1)
		}, 15, "exactly one of id, trustDomain, pathPrefix"},
		{"bad SPIFFE ID", func(s string) string {
			return strings.Replace(s, "spiffe://mesh.test/ns/shop/sa/backend", "spiffe://MESH/ns", 1)
		}, 7, "is not a SPIFFE ID"},
		{"not a spiffe URI", func(s string) string {
			return strings.Replace(s, "id: spiffe://mesh.test/ns/shop/sa/frontend", "id: https://mesh.test/x", 1)
		}, 13, "scheme is missing or invalid"},
		{"trust domain ID as workload", func(s string) string {
			return strings.Replace(s, "spiffe://mesh.test/ns/shop/sa/backend", "spiffe://mesh.test", 1)
		}, 7, "names a trust domain, not a workload"},
		{"own ID in wrong trust domain", func(s string) string {
			return strings.Replace(s, "spiffe://mesh.test/ns/shop/sa/backend", "spiffe://evil.test/ns/shop/sa/backend", 1)
		}, 7, `trust domain "evil.test" is not one of the configured`},
		{"allowed peer in wrong trust domain", func(s string) string {
			return strings.Replace(s, "trustDomain: partner.test", "trustDomain: evil.test", 1)
		}, 15, `trust domain "evil.test"`},
		{"server ID in wrong trust domain", func(s string) string {
			return strings.Replace(s, "serverID: spiffe://mesh.test/", "serverID: spiffe://evil.test/", 1)
		}, 19, `trust domain "evil.test"`},
		{"trust domain written as a SPIFFE ID", func(s string) string {
			return strings.Replace(s, "trustDomain: partner.test", "trustDomain: spiffe://partner.test/ns/prod/sa/db-admin", 1)
		}, 15, "bare trust domain name, not a SPIFFE ID: use id for exactly spiffe://partner.test/ns/prod/sa/db-admin"},
		{"path prefix without path", func(s string) string {
			return strings.Replace(s, "pathPrefix: spiffe://mesh.test/ns/ops", "pathPrefix: spiffe://mesh.test", 1)
		}, 14, "has no path"},
		{"duplicate port across directions", func(s string) string { return strings.Replace(s, "port: 9001", "port: 8443", 1) }, 17, "port 8443 is already used by spec.inbound[0] (line 9)"},
		{"duplicate inbound port", func(s string) string {
			return strings.Replace(s, "  outbound:", "    - port: 8443\n      appAddress: 127.0.0.1:1\n  outbound:", 1)
		}, 16, "port 8443 is already used"},
		// The sidecar would refuse these (proxy.Config.Validate).
		{"app is the workload's own outbound listener", func(s string) string { return strings.Replace(s, "127.0.0.1:8080", "127.0.0.1:9001", 1) }, 10,
			"spec.inbound[0].appAddress: 127.0.0.1:9001 is this workload's own listener spec.outbound[0] (line 17)"},
		{"app is the workload's own inbound listener, as localhost", func(s string) string { return strings.Replace(s, "127.0.0.1:8080", "localhost:8443", 1) }, 10,
			"localhost:8443 is this workload's own listener spec.inbound[0] (line 9)"},
		{"app is the workload's own listener, as ::", func(s string) string { return strings.Replace(s, "127.0.0.1:8080", `"[::]:9001"`, 1) }, 10,
			"[::]:9001 is this workload's own listener spec.outbound[0]"},
		{"two inbound listeners share an app, only one with the PROXY protocol header", func(s string) string {
			return strings.Replace(s, "  outbound:", "    - port: 9443\n      appAddress: localhost:8080\n      proxyProtocol: v2\n      allow: [{trustDomain: mesh.test}]\n  outbound:", 1)
		}, 18, "spec.inbound[1].proxyProtocol: spec.inbound[0] shares the app localhost:8080 and only one of them sends it a PROXY protocol header"},
		{"port out of range", func(s string) string { return strings.Replace(s, "port: 8443", "port: 70000", 1) }, 9, "out of range"},
		{"port as string", func(s string) string { return strings.Replace(s, "port: 8443", `port: "8443"`, 1) }, 9, "want a port number"},
		{"app address without port", func(s string) string { return strings.Replace(s, "127.0.0.1:8080", "127.0.0.1", 1) }, 10, "is not host:port"},
		// Found by FuzzParse: hosts the sidecar refuses are refused here.
		{"app host with a space", func(s string) string { return strings.Replace(s, "127.0.0.1:8080", "\"127.0.0.1 :8080\"", 1) }, 10, `host "127.0.0.1 " is not a host name or IP address`},
		{"endpoint host with a slash", func(s string) string { return strings.Replace(s, "db.shop.svc:8443", "db/shop:8443", 1) }, 18, `host "db/shop" is not a host name or IP address`},
		{"endpoint host with a non-ASCII letter", func(s string) string { return strings.Replace(s, "db.shop.svc:8443", "dé.shop:8443", 1) }, 18, `host "dé.shop" is not a host name or IP address`},
		{"control character (YAML error without a line)", func(s string) string { return s + "---\nkind: \x00\n" }, 21, "YAML: control characters are not allowed (first one on this line)"},
		{"negative idle timeout", func(s string) string { return strings.Replace(s, "30m", "-1s", 1) }, 11, "not a positive duration"},
		{"target and endpoints", func(s string) string {
			return strings.Replace(s, "      endpoints:", "      target: x:1\n      endpoints:", 1)
		}, 19, "not both"},
		{"neither target nor endpoints", func(s string) string {
			return strings.Replace(s, "      endpoints: [\"10.0.0.1:8443\", \"db.shop.svc:8443\"]\n", "", 1)
		}, 17, "missing target or endpoints"},
		{"missing spiffeID", func(s string) string {
			return strings.Replace(s, "  spiffeID: spiffe://mesh.test/ns/shop/sa/backend\n", "", 1)
		}, 7, `missing required field "spiffeID"`},
		{"wrong kind", func(s string) string { return strings.Replace(s, "kind: ServicePolicy", "kind: Policy", 1) }, 2, `kind: "Policy" is not supported`},
		{"wrong apiVersion", func(s string) string { return strings.Replace(s, "v1alpha1", "v1", 1) }, 1, "is not supported"},
		{"bad metadata name", func(s string) string { return strings.Replace(s, "name: backend", "name: Back_End", 1) }, 4, "not a lowercase DNS name"},
		{"field given twice", func(s string) string {
			return strings.Replace(s, "  namespace: shop\n", "  namespace: shop\n  namespace: other\n", 1)
		}, 6, `"namespace" given twice`},
		{"YAML syntax error", func(s string) string { return strings.Replace(s, "port: 9001", "port: [9001", 1) }, 16, "YAML: line 16: did not find expected ',' or ']'"},
		{"tab indentation", func(s string) string { return strings.Replace(s, "  inbound:", "\tinbound:", 1) }, 7, "YAML: line 7: found a tab character"},
		{"alias", func(s string) string {
			return s + "---\napiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: &m {name: x}\nspec: *m\n"
		}, 24, "spec: YAML aliases are not supported"},
		{"conflict in one file", func(s string) string { return s + "---\n" + strings.Replace(s, "name: backend", "name: backend2", 1) }, 21, "conflicts with ServicePolicy \"backend\" at line 1"},
		{"list where mapping expected", func(s string) string { return strings.Replace(s, "  namespace: shop\n", "", 1) + "---\n- a\n" }, 20, "document: want a mapping, got a list"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := tt.edit(good)
			if src == good {
				t.Fatal("edit changed nothing: the test is broken")
			}
			decls, err := Parse("dir/backend.yaml", []byte(src), testOpts)
			if err == nil {
				t.Fatalf("accepted: %+v", decls)
			}
			if decls != nil {
				t.Errorf("returned declarations along with the error")
			}
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("error %T is not a *FileError: %v", err, err)
			}
			for _, e := range fe.Errors {
				if e.File == "dir/backend.yaml" && e.Line == tt.line && strings.Contains(e.Reason, tt.reason) {
					return
				}
			}
			t.Errorf("want backend.yaml:%d: ...%s..., got:\n%v", tt.line, tt.reason, err)
		})
	}
}

func TestParseNeedsTrustDomain(t *testing.T) {
	if _, err := Parse("x.yaml", []byte(good), Options{}); err == nil {
		t.Fatal("parsed with no trust domain configured")
	}
}

// writeFile writes atomically, as editors and ConfigMap mounts do, so the
// watcher never sees half a file.
func writeFile(t *testing.T, dir, name, content string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func policyFor(name, id string, port int) string {
	return fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata:
  name: %s
spec:
  spiffeID: %s
  inbound:
    - port: %d
      appAddress: 127.0.0.1:8080
      allow:
        - trustDomain: mesh.test
`, name, id, port)
}

// newFiles is a store fed by the files of dir.
func newFiles(dir string, opts Options) (*Files, error) {
	st, err := NewStore(opts, nil)
	if err != nil {
		return nil, err
	}
	return NewFiles(st, dir), nil
}

func itoa(i int) string { return strconv.Itoa(i) }

func ids(s Snapshot) string {
	var out []string
	for _, d := range s.Declarations {
		out = append(out, d.ID.String()+"@"+itoa(int(d.Inbound[0].Port)))
	}
	return strings.Join(out, " ")
}

func TestStoreKeepsGoodVersions(t *testing.T) {
	dir := t.TempDir()
	st, err := newFiles(dir, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "a.yaml", policyFor("a", "spiffe://mesh.test/a", 1001))
	writeFile(t, dir, "b.yaml", policyFor("b", "spiffe://mesh.test/b", 1002))
	writeFile(t, dir, "notes.txt", "not a declaration")
	writeFile(t, dir, "broken.yaml", "kind: [")

	snap, _, err := st.Reload()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := ids(snap), "spiffe://mesh.test/a@1001 spiffe://mesh.test/b@1002"; got != want {
		t.Fatalf("served %q, want %q", got, want)
	}
	if !hasError(snap, "broken.yaml", 1, "YAML") || !hasError(snap, "broken.yaml", 0, "serves nothing") {
		t.Errorf("broken file not reported: %v", snap.Errors)
	}

	// b breaks: a is untouched, b keeps its previous good version.
	writeFile(t, dir, "b.yaml", strings.Replace(policyFor("b", "spiffe://mesh.test/b", 2002), "appAddress", "app", 1))
	snap, _, _ = st.Reload()
	if got, want := ids(snap), "spiffe://mesh.test/a@1001 spiffe://mesh.test/b@1002"; got != want {
		t.Fatalf("after breaking b: served %q, want %q", got, want)
	}
	if !hasError(snap, "b.yaml", 9, `unknown field "app"`) || !hasError(snap, "b.yaml", 0, "serving the previous good version") {
		t.Errorf("b's refusal not reported: %v", snap.Errors)
	}

	// c claims a's ID: a keeps it, c is refused and serves nothing.
	writeFile(t, dir, "c.yaml", policyFor("c", "spiffe://mesh.test/a", 3003))
	snap, _, _ = st.Reload()
	if got, want := ids(snap), "spiffe://mesh.test/a@1001 spiffe://mesh.test/b@1002"; got != want {
		t.Fatalf("after conflicting c: served %q, want %q", got, want)
	}
	if !hasError(snap, "c.yaml", 1, "conflicts with ServicePolicy \"a\" at "+filepath.Join(dir, "a.yaml")+":1") {
		t.Errorf("conflict not reported: %v", snap.Errors)
	}

	// Even when a is edited afterwards, the incumbent keeps the ID.
	writeFile(t, dir, "a.yaml", policyFor("a", "spiffe://mesh.test/a", 1111))
	snap, _, _ = st.Reload()
	if got, want := ids(snap), "spiffe://mesh.test/a@1111 spiffe://mesh.test/b@1002"; got != want {
		t.Fatalf("after editing a: served %q, want %q", got, want)
	}

	// b fixed, a removed: c may now take the ID.
	writeFile(t, dir, "b.yaml", policyFor("b", "spiffe://mesh.test/b", 2002))
	if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	snap, _, _ = st.Reload()
	if got, want := ids(snap), "spiffe://mesh.test/a@3003 spiffe://mesh.test/b@2002"; got != want {
		t.Fatalf("after fixing b and removing a: served %q, want %q", got, want)
	}
	if d, ok := snap.Lookup(spiffeid.RequireFromString("spiffe://mesh.test/a")); !ok || d.Name != "c" {
		t.Errorf("Lookup = %+v, %v", d, ok)
	}
}

func TestStoreUnreadableDirKeepsPolicy(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "decl")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	st, _ := newFiles(dir, testOpts)
	writeFile(t, dir, "a.yaml", policyFor("a", "spiffe://mesh.test/a", 1001))
	if _, _, err := st.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, dir+".gone"); err != nil {
		t.Fatal(err)
	}
	snap, _, err := st.Reload()
	if err == nil {
		t.Fatal("no error for a missing directory")
	}
	if got := ids(snap); got != "spiffe://mesh.test/a@1001" {
		t.Fatalf("served %q after the directory vanished", got)
	}
}

func hasError(s Snapshot, file string, line int, reason string) bool {
	for _, e := range s.Errors {
		if filepath.Base(e.File) == file && e.Line == line && strings.Contains(e.Reason, reason) {
			return true
		}
	}
	return false
}

func TestWatchPropagates(t *testing.T) {
	dir := t.TempDir()
	st, _ := newFiles(dir, testOpts)
	writeFile(t, dir, "a.yaml", policyFor("a", "spiffe://mesh.test/a", 1001))

	snaps := make(chan Snapshot, 16)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := st.Watch(ctx, 20*time.Millisecond, func(s Snapshot, _ Change) { snaps <- s }); err != nil {
			t.Error(err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })

	next := func() Snapshot {
		select {
		case s := <-snaps:
			return s
		case <-time.After(10 * time.Second):
			t.Fatal("no snapshot from Watch")
		}
		return Snapshot{}
	}
	if got := ids(next()); got != "spiffe://mesh.test/a@1001" {
		t.Fatalf("initial: %q", got)
	}
	start := time.Now()
	writeFile(t, dir, "a.yaml", policyFor("a", "spiffe://mesh.test/a", 1002))
	for {
		if got := ids(next()); got == "spiffe://mesh.test/a@1002" {
			break
		}
	}
	t.Logf("file change → new snapshot in %v (debounce 20ms)", time.Since(start))
}

func TestCRDUpToDate(t *testing.T) {
	path := filepath.Join("..", "..", filepath.FromSlash(CRDFile))
	got := CRD()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if string(want) != string(got) {
		t.Fatalf("%s is out of date: run `go test ./xds/policy -run TestCRDUpToDate -update`", CRDFile)
	}
}

func TestExamplesAreValid(t *testing.T) {
	dir := filepath.Join("..", "..", "examples", "declarations")
	if _, err := os.Stat(dir); err != nil {
		t.Skip("no examples yet")
	}
	st, _ := newFiles(dir, Options{TrustDomains: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("demo.latch.test")}})
	snap, _, err := st.Reload()
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Errors) > 0 || len(snap.Declarations) == 0 {
		t.Fatalf("examples: %d declarations, errors %v", len(snap.Declarations), snap.Errors)
	}
}

// FuzzParse: whatever the bytes, Parse either returns declarations that obey
// the rules it enforces, or a located error; it never panics.
func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte(good + "---\n" + good))
	f.Add([]byte("kind: [\n"))
	f.Add([]byte("apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: &m {name: x}\nspec: *m\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		decls, err := Parse("f.yaml", data, testOpts)
		if err != nil {
			var fe *FileError
			if !errors.As(err, &fe) || len(fe.Errors) == 0 {
				t.Fatalf("error without location: %v", err)
			}
			return
		}
		for _, d := range decls {
			if d.ID.IsZero() || d.Name == "" {
				t.Fatalf("accepted a declaration without ID or name: %+v", d)
			}
			for _, in := range d.Inbound {
				if in.Port == 0 || in.App == "" {
					t.Fatalf("accepted inbound without port or app: %+v", in)
				}
			}
			for _, out := range d.Outbound {
				if out.Port == 0 || len(out.Endpoints) == 0 || out.ServerID.IsZero() {
					t.Fatalf("accepted outbound without port, endpoints or server: %+v", out)
				}
			}
		}
	})
}

// TestTrustDomainPatternAgreesWithDecoder: what the CRD's trustDomain pattern
// lets through the API server, the decoder accepts, and a trustDomain written
// as a SPIFFE ID is refused by both.
func TestTrustDomainPatternAgreesWithDecoder(t *testing.T) {
	re := regexp.MustCompile(trustDomainPattern)
	for _, v := range []string{"example.org", "mesh.test", "a_b-c.d", "spiffe://example.org/ns/prod/sa/db-admin", "spiffe://example.org", "example.org/ns", "Example.org", "example.org:443", ""} {
		_, err := identity.ParseRule("trustDomain", v)
		if re.MatchString(v) != (err == nil) {
			t.Errorf("trustDomain %q: pattern match %v, decoder error %v", v, re.MatchString(v), err)
		}
	}
}

// TestStoreSkipsOnlyTheSameContent: the store knows a source's last content
// by its digest alone; content given again is skipped, any other is parsed,
// including the good version again after a refused one, and a file read
// again after it could not be read.
func TestStoreSkipsOnlyTheSameContent(t *testing.T) {
	st, err := NewStore(testOpts, nil)
	if err != nil {
		t.Fatal(err)
	}
	const path = "/decl/a.yaml"
	good := []byte(policyFor("a", "spiffe://mesh.test/a", 1001))
	bad := []byte(strings.Replace(string(good), "appAddress", "app", 1))
	steps := []struct {
		what       string
		set        func() Change
		wantChange bool
		wantReason string
	}{
		{"first", func() Change { return st.SetFile(path, good) }, true, ReasonAccepted},
		{"the same bytes again", func() Change { return st.SetFile(path, bytes.Clone(good)) }, false, ReasonAccepted},
		{"broken", func() Change { return st.SetFile(path, bad) }, true, ReasonInvalid},
		{"broken again", func() Change { return st.SetFile(path, bad) }, false, ReasonInvalid},
		{"the good version back", func() Change { return st.SetFile(path, good) }, true, ReasonAccepted},
		{"unreadable", func() Change { return st.SetFileError(path, errors.New("permission denied")) }, true, ReasonInvalid},
		{"readable again, unchanged", func() Change { return st.SetFile(path, good) }, true, ReasonAccepted},
		{"one byte changed", func() Change {
			return st.SetFile(path, []byte(strings.Replace(string(good), "1001", "1002", 1)))
		}, true, ReasonAccepted},
	}
	for _, step := range steps {
		ch := step.set()
		if ch.Empty() == step.wantChange {
			t.Errorf("%s: change %+v, want a change: %v", step.what, ch, step.wantChange)
		}
		if s, _ := st.State(FileSource(path)); s.Reason != step.wantReason {
			t.Errorf("%s: %s, want %s", step.what, s.Reason, step.wantReason)
		}
	}
	if got := ids(st.Snapshot()); got != "spiffe://mesh.test/a@1002" {
		t.Errorf("served %q", got)
	}
}
