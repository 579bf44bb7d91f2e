package kube_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
)

// TestTwoReplicas: every replica serves xDS, one writes status. The leader
// learns from the other replica's ACK report that the sidecar connected
// there applied (or refused) a generation; when the leader stops, the other
// takes the Lease and the status writes with it.
func TestTwoReplicas(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "replicas")
	opts := replicaOptions{lease: "replicas"}
	a := m.replica("cp-a", opts)
	waitFor(t, "cp-a to lead", a.ctl.Leading)
	b := m.replica("cp-b", opts)
	if b.ctl.Leading() {
		t.Fatal("two leaders")
	}
	id := spiffeid.RequireFromString("spiffe://mesh.test/ns/replicas/sa/api")
	app := echoApp(t)
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	m.sidecar(id, b.addr) // connected to the replica that does not write status
	fe := m.peer(shopFrontend, id)

	m.apply("api", inboundSpec(id, port, app, shopFrontend))
	u := m.waitStatus("api", "Programmed through cp-b's report", func(_ *unstructured.Unstructured, _, p cond) bool { return p.Status == "True" })
	if p, _ := conditionOf(u, "Programmed"); !strings.Contains(p.Message, "all 1 connected sidecars have applied version") {
		t.Errorf("Programmed: %+v", p)
	}
	if conn, err := call(addr, fe); err != nil {
		t.Fatalf("traffic through the sidecar: %v", err)
	} else {
		conn.Close()
	}

	// Valid for the control plane, but the sidecar takes an application
	// off loopback only when told to: it refuses the update, and the
	// leader reads the refusal in cp-b's report.
	other := freePort(t)
	m.apply("api", inboundSpec(id, port, app, shopFrontend)+"  - port: "+strconv.Itoa(other)+"\n    appAddress: 192.0.2.10:8080\n    allow: []\n")
	u = m.waitStatus("api", "Programmed=False with the sidecar's refusal", func(_ *unstructured.Unstructured, a, p cond) bool {
		return a.Status == "True" && p.Generation == 2 && p.Reason == "Refused"
	})
	if p, _ := conditionOf(u, "Programmed"); p.Status != "False" || !strings.Contains(p.Message, "1 of 1 connected sidecars refused version") || !strings.Contains(p.Message, "inbound|"+strconv.Itoa(other)+"|app") {
		t.Errorf("Programmed after a refusal: %+v", p)
	}
	if conn, err := call(addr, fe); err != nil {
		t.Errorf("the sidecar stopped serving its last good config after refusing: %v", err)
	} else {
		conn.Close()
	}

	// The leader stops: cp-b takes the Lease and writes status from now on.
	start := time.Now()
	a.stop()
	waitFor(t, "cp-b to lead", b.ctl.Leading)
	t.Logf("cp-b took over the Lease %v after cp-a stopped", time.Since(start).Round(time.Millisecond))
	lease, err := kubernetes.NewForConfigOrDie(c.Config).CoordinationV1().Leases(controlPlaneNS).Get(context.Background(), "replicas", metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != "cp-b" {
		t.Fatalf("Lease: %+v %v", lease, err)
	}
	m.apply("api", inboundSpec(id, port, app, webIntruder))
	m.waitStatus("api", "Programmed at generation 3, written by cp-b", func(_ *unstructured.Unstructured, _, p cond) bool {
		return p.Status == "True" && p.Generation == 3
	})
	// cp-a deleted its report as it stopped; cp-b's is there.
	cms, err := kubernetes.NewForConfigOrDie(c.Config).CoreV1().ConfigMaps(controlPlaneNS).List(context.Background(), metav1.ListOptions{LabelSelector: "latch.dev/ack-report=replicas"})
	if err != nil {
		t.Fatal(err)
	}
	if len(cms.Items) != 1 || cms.Items[0].Name != "replicas-acks-cp-b" {
		var names []string
		for _, cm := range cms.Items {
			names = append(names, cm.Name)
		}
		t.Errorf("ACK reports: %v", names)
	}
}
