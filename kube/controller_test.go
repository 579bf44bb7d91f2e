package kube_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"

	"latch.dev/latch/xds/policy"
)

var (
	shopBackend  = spiffeid.RequireFromString("spiffe://mesh.test/ns/shop/sa/backend")
	shopFrontend = spiffeid.RequireFromString("spiffe://mesh.test/ns/shop/sa/frontend")
	webIntruder  = spiffeid.RequireFromString("spiffe://mesh.test/ns/web/sa/intruder")
)

// TestServiceOwnerPath is docs/kubernetes.md's walk for a service owner,
// against a real API server: apply a ServicePolicy, see it Accepted and
// Programmed in `kubectl get sp`, traffic from the allowed peer passes and
// from others does not; change the allow-list and the revoked peer's live
// connection is cut; a bad update keeps the last good generation serving
// and says why; deleting the object leaves the sidecar admitting nobody.
func TestServiceOwnerPath(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "shop")
	r := m.replica("cp-0", replicaOptions{lease: "owner-path"})
	app := echoApp(t)
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	sc := m.sidecar(shopBackend, r.addr)
	fe, in := m.peer(shopFrontend, shopBackend), m.peer(webIntruder, shopBackend)

	// 1. Write and apply: the object docs/kubernetes.md shows, in this
	// test's trust domain and on its ports.
	m.applyYAML(docsServicePolicy(t, "mesh.test", port, app))
	m.waitStatus("backend", "Accepted and Programmed at generation 1", func(_ *unstructured.Unstructured, a, p cond) bool {
		return a.Status == "True" && a.Generation == 1 && p.Status == "True" && p.Reason == "Programmed" && p.Generation == 1
	})
	live, err := call(addr, fe)
	if err != nil {
		t.Fatalf("the allowed frontend is refused: %v", err)
	}
	defer live.Close()
	if conn, err := call(addr, in); err == nil {
		conn.Close()
		t.Fatal("a peer the policy does not name got through")
	}

	// 2. kubectl get sp: the printer columns.
	table := getTable(t, c.Config, "shop")
	if got, want := strings.Join(table.columns, ","), "Name,SPIFFE ID,Accepted,Programmed,Age,Reason,Message"; got != want {
		t.Errorf("columns %s, want %s", got, want)
	}
	if len(table.rows) != 1 || table.rows[0][0] != "backend" || table.rows[0][1] != shopBackend.String() ||
		table.rows[0][2] != "True" || table.rows[0][3] != "True" || table.rows[0][5] != "Accepted" {
		t.Errorf("kubectl get sp rows: %v", table.rows)
	}

	// 3. Change the allow-list: the intruder is in, the frontend out, its
	// live connection cut.
	start := time.Now()
	m.apply("backend", inboundSpec(shopBackend, port, app, webIntruder))
	waitFor(t, "the new peer to be admitted", func() bool {
		conn, err := call(addr, in)
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
	admitted := time.Since(start)
	if err := closedByPeer(live, 5*time.Second); err != nil {
		t.Fatalf("the revoked frontend's live connection: %v", err)
	}
	cut := time.Since(start)
	t.Logf("kubectl apply → new peer admitted in %v, revoked live connection cut in %v", admitted.Round(time.Millisecond), cut.Round(time.Millisecond))
	m.waitStatus("backend", "Programmed at generation 2", func(_ *unstructured.Unstructured, a, p cond) bool {
		return a.Status == "True" && p.Status == "True" && p.Generation == 2
	})

	// 4. A bad update: admitted by the API server (it cannot know the
	// configured trust domains), refused by the control plane, which keeps
	// generation 2 serving and says so.
	m.apply("backend", inboundSpec(shopBackend, port, app, spiffeid.RequireFromString("spiffe://partner.test/ns/x/sa/y")))
	u := m.waitStatus("backend", "Accepted=False at generation 3", func(_ *unstructured.Unstructured, a, p cond) bool {
		return a.Status == "False" && a.Generation == 3 && p.Status == "False" && p.Reason == "NotAccepted"
	})
	a, _ := conditionOf(u, "Accepted")
	if a.Reason != policy.ReasonInvalid || !strings.Contains(a.Message, `spec.inbound[0].allow[0].id: trust domain "partner.test" is not one of the configured trust domains (mesh.test)`) ||
		!strings.Contains(a.Message, "serving generation 2, its last good version") {
		t.Errorf("Accepted for a bad update: %+v", a)
	}
	if g, _, _ := unstructured.NestedInt64(u.Object, "status", "servedGeneration"); g != 2 {
		t.Errorf("servedGeneration %d, want 2", g)
	}
	if conn, err := call(addr, in); err != nil {
		t.Errorf("the last good generation stopped serving: %v", err)
	} else {
		conn.Close()
	}
	table = getTable(t, c.Config, "shop")
	if table.rows[0][2] != "False" || table.rows[0][5] != "Invalid" || !strings.Contains(table.rows[0][6], "partner.test") {
		t.Errorf("kubectl get sp -o wide after a bad update: %v", table.rows)
	}

	// 5. Delete: the workload's policy goes, its sidecar admits nobody.
	m.delete("backend")
	waitFor(t, "the sidecar to refuse everyone", func() bool {
		conn, err := call(addr, in)
		if err == nil {
			conn.Close()
		}
		return err != nil
	})
	if _, ok := r.store.Snapshot().Lookup(shopBackend); ok {
		t.Error("a deleted object's policy is still in the store")
	}
	_ = sc
}

// docsServicePolicy is the ServicePolicy of docs/kubernetes.md's walk, with
// the trust domain, port and app address replaced.
func docsServicePolicy(t *testing.T, td string, port int, app string) string {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join("..", "docs", "kubernetes.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "```yaml\n# backend-policy.yaml\n")
	if !ok {
		t.Fatal("docs/kubernetes.md has no backend-policy.yaml block")
	}
	block, _, _ := strings.Cut(rest, "```")
	block = strings.ReplaceAll(block, "example.org", td)
	block = strings.Replace(block, "port: 8443", "port: "+strconv.Itoa(port), 1)
	return strings.Replace(block, "127.0.0.1:8080", app, 1)
}

// table is `kubectl get` output: the API server's Table rendering.
type table struct {
	columns []string
	rows    [][]string
}

// getTable asks for ServicePolicies as a Table, as kubectl get does, with
// the -o wide columns too.
func getTable(t *testing.T, cfg interface{}, ns string) table {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(cluster(t).Config)
	raw, err := cs.Discovery().RESTClient().Get().AbsPath("/apis", policy.Group, policy.Version, "namespaces", ns, "servicepolicies").
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var tb metav1.Table
	if err := json.Unmarshal(raw, &tb); err != nil {
		t.Fatal(err)
	}
	var out table
	for _, c := range tb.ColumnDefinitions {
		out.columns = append(out.columns, c.Name)
	}
	for _, r := range tb.Rows {
		var row []string
		for _, cell := range r.Cells {
			row = append(row, toString(cell))
		}
		out.rows = append(out.rows, row)
	}
	return out
}

func toString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case nil:
		return ""
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// TestStatusOfRefusals: an object naming another namespace's workload is
// refused and never served; two objects of one namespace declaring one ID:
// the first keeps it, the second says who has it and takes over when the
// first is deleted; an object and a declaration file the same.
func TestStatusOfRefusals(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "refusals")
	dir := t.TempDir()
	fileID := spiffeid.RequireFromString("spiffe://mesh.test/ns/refusals/sa/from-file")
	if err := os.WriteFile(filepath.Join(dir, "ops.yaml"), []byte("apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: ops}\nspec:\n"+indent(inboundSpec(fileID, 9443, "127.0.0.1:1"))), 0o644); err != nil {
		t.Fatal(err)
	}
	r := m.replica("cp-0", replicaOptions{lease: "refusals", files: dir})
	api := spiffeid.RequireFromString("spiffe://mesh.test/ns/refusals/sa/api")

	m.apply("foreign", inboundSpec(shopBackend, 8443, "127.0.0.1:1"))
	u := m.waitStatus("foreign", "NotOwned", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Reason == policy.ReasonNotOwned })
	a, _ := conditionOf(u, "Accepted")
	if a.Status != "False" || !strings.Contains(a.Message, `spec.spiffeID: spiffe://mesh.test/ns/shop/sa/backend is not a workload of namespace "refusals"`) ||
		!strings.Contains(a.Message, "spiffe://{trustDomain}/ns/refusals/sa/{serviceAccount}") || !strings.Contains(a.Message, "serves nothing") {
		t.Errorf("foreign: %+v", a)
	}
	if _, ok := r.store.Snapshot().Lookup(shopBackend); ok {
		t.Error("another namespace's workload is served")
	}

	m.apply("first", inboundSpec(api, 8443, "127.0.0.1:1"))
	m.waitStatus("first", "Accepted", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Status == "True" })
	m.apply("second", inboundSpec(api, 8444, "127.0.0.1:1"))
	u = m.waitStatus("second", "Conflict", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Reason == policy.ReasonConflict })
	if a, _ = conditionOf(u, "Accepted"); !strings.Contains(a.Message, "conflicts with ServicePolicy refusals/first, which keeps it") {
		t.Errorf("second: %+v", a)
	}
	m.apply("file-thief", inboundSpec(fileID, 8445, "127.0.0.1:1"))
	u = m.waitStatus("file-thief", "Conflict", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Reason == policy.ReasonConflict })
	if a, _ = conditionOf(u, "Accepted"); !strings.Contains(a.Message, `conflicts with ServicePolicy "ops" at `+filepath.Join(dir, "ops.yaml")+":1, which keeps it") {
		t.Errorf("file-thief: %+v", a)
	}

	m.delete("first")
	m.waitStatus("second", "Accepted after the holder went", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Status == "True" })
	if d, ok := r.store.Snapshot().Lookup(api); !ok || d.Name != "second" || d.Inbound[0].Port != 8444 {
		t.Errorf("served for %s: %+v", api, d)
	}
}

func indent(s string) string {
	return "  " + strings.ReplaceAll(strings.TrimSuffix(s, "\n"), "\n", "\n  ") + "\n"
}

// TestAPIServerRestart: while the API server is down the control plane keeps
// serving what it had (sidecars keep their traffic, the replica stays
// synced); when it is back, changes flow again and status is written.
func TestAPIServerRestart(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "restart")
	id := spiffeid.RequireFromString("spiffe://mesh.test/ns/restart/sa/api")
	r := m.replica("cp-0", replicaOptions{lease: "restart"})
	app := echoApp(t)
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	m.sidecar(id, r.addr)
	fe := m.peer(shopFrontend, id)
	m.apply("api", inboundSpec(id, port, app, shopFrontend))
	m.waitStatus("api", "Programmed", func(_ *unstructured.Unstructured, _, p cond) bool { return p.Status == "True" })

	c.StopAPIServer()
	restarted := false
	defer func() {
		if !restarted {
			_ = c.StartAPIServer(context.Background())
		}
	}()
	time.Sleep(time.Second) // informers notice the lost watch
	if conn, err := call(addr, fe); err != nil {
		t.Fatalf("traffic failed with the API server down: %v", err)
	} else {
		conn.Close()
	}
	if !r.ctl.Synced() {
		t.Error("the replica stopped being synced while the API server was down")
	}
	t0 := time.Now()
	if err := c.StartAPIServer(context.Background()); err != nil {
		t.Fatal(err)
	}
	restarted = true
	t.Logf("API server back in %v", time.Since(t0).Round(time.Millisecond))
	in := m.peer(webIntruder, id)
	waitFor(t, "the API server to take writes", func() bool {
		_, err := m.sp.Get(context.Background(), "api", metav1.GetOptions{})
		return err == nil
	})
	t1 := time.Now()
	m.apply("api", inboundSpec(id, port, app, webIntruder))
	waitFor(t, "the change made after the restart to reach the sidecar", func() bool {
		conn, err := call(addr, in)
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
	t.Logf("a change applied %v after the restart reached the sidecar in %v", t1.Sub(t0).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
	m.waitStatus("api", "Programmed at generation 2", func(_ *unstructured.Unstructured, _, p cond) bool { return p.Status == "True" && p.Generation == 2 })
	t.Logf("and its status was written after %v", time.Since(t1).Round(time.Millisecond))
}

// TestIncumbencySurvivesRestart: a replica starting reads the objects whose
// status says they were accepted before the others, so the object that held
// an ID keeps it across a restart even when a contender is older.
func TestIncumbencySurvivesRestart(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "incumbent")
	api := spiffeid.RequireFromString("spiffe://mesh.test/ns/incumbent/sa/api")
	other := spiffeid.RequireFromString("spiffe://mesh.test/ns/incumbent/sa/other")
	r := m.replica("cp-0", replicaOptions{lease: "incumbent"})
	m.apply("older", inboundSpec(other, 8443, "127.0.0.1:1"))
	time.Sleep(1100 * time.Millisecond) // creationTimestamp has one-second resolution
	m.apply("newer", inboundSpec(api, 8443, "127.0.0.1:1"))
	m.waitStatus("newer", "Accepted", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Status == "True" })
	// The older object now claims the newer one's ID: it loses.
	m.apply("older", inboundSpec(api, 8444, "127.0.0.1:1"))
	m.waitStatus("older", "Conflict", func(_ *unstructured.Unstructured, a, _ cond) bool {
		return a.Reason == policy.ReasonConflict && a.Generation == 2
	})
	r.stop()

	// A new replica, fresh store: the incumbent by status, not the oldest.
	r2 := m.replica("cp-1", replicaOptions{lease: "incumbent"})
	if d, ok := r2.store.Snapshot().Lookup(api); !ok || d.Name != "newer" {
		t.Fatalf("after a restart %s is served from %q, want the incumbent \"newer\"", api, d.Name)
	}
	m.waitStatus("older", "still Conflict", func(_ *unstructured.Unstructured, a, _ cond) bool { return a.Reason == policy.ReasonConflict })
}
