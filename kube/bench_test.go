package kube_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// BenchmarkApplyToEnforced: `kubectl apply` (server-side apply) of a changed
// allow-list → the sidecar admits the newly allowed peer, and → it cuts the
// live connection of the peer no longer allowed, through the real API
// server, informer, store, xDS and data plane. Reports p50 and p99 of both.
//
//	go test ./kube -run '^$' -bench ApplyToEnforced -benchtime 200x
func BenchmarkApplyToEnforced(b *testing.B) {
	c := cluster(b)
	m := newMesh(b, c, "bench-apply")
	r := m.replica("cp-0", replicaOptions{lease: "bench-apply"})
	app := echoApp(b)
	port := freePort(b)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	id := spiffeid.RequireFromString("spiffe://mesh.test/ns/bench-apply/sa/api")
	m.sidecar(id, r.addr)
	peers := []spiffeid.ID{
		spiffeid.RequireFromString("spiffe://mesh.test/ns/bench-apply/sa/a"),
		spiffeid.RequireFromString("spiffe://mesh.test/ns/bench-apply/sa/b"),
	}
	m.apply("api", inboundSpec(id, port, app, peers[0]))
	var live net.Conn
	waitFor(b, "the first peer to be admitted", func() bool {
		c, err := call(addr, m.peer(peers[0], id))
		live = c
		return err == nil
	})
	var admit, cut []time.Duration
	b.ResetTimer()
	for i := range b.N {
		next := peers[(i+1)%2]
		tlsNext := m.peer(next, id)
		start := time.Now()
		m.apply("api", inboundSpec(id, port, app, next))
		var nc net.Conn
		for {
			c, err := call(addr, tlsNext)
			if err == nil {
				nc = c
				break
			}
			if time.Since(start) > 20*time.Second {
				b.Fatalf("iteration %d: %s not admitted: %v", i, next, err)
			}
		}
		admit = append(admit, time.Since(start))
		if err := closedByPeer(live, 20*time.Second); err != nil {
			b.Fatalf("iteration %d: the revoked peer's connection: %v", i, err)
		}
		cut = append(cut, time.Since(start))
		live.Close()
		live = nc
	}
	b.StopTimer()
	live.Close()
	b.ReportMetric(ms(percentile(admit, 50)), "admit-p50-ms")
	b.ReportMetric(ms(percentile(admit, 99)), "admit-p99-ms")
	b.ReportMetric(ms(percentile(cut, 50)), "cut-p50-ms")
	b.ReportMetric(ms(percentile(cut, 99)), "cut-p99-ms")
	b.ReportMetric(0, "ns/op")
}

func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	i := (len(s)*p + 99) / 100
	return s[max(min(i, len(s))-1, 0)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// createPolicies applies n ServicePolicies, each for its own workload, in
// m's namespace.
func createPolicies(b *testing.B, m *mesh, n int) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			id := spiffeid.RequireFromString(fmt.Sprintf("spiffe://mesh.test/ns/%s/sa/svc-%d", m.ns, i))
			spec := inboundSpec(id, 8443, "127.0.0.1:8080", spiffeid.RequireFromString("spiffe://mesh.test/ns/"+m.ns+"/sa/client"))
			u := servicePolicy(b, m.ns, fmt.Sprintf("svc-%d", i), spec)
			if _, err := m.sp.Apply(context.Background(), u.GetName(), u, metav1.ApplyOptions{FieldManager: "bench", Force: true}); err != nil {
				b.Error(err)
			}
		})
	}
	wg.Wait()
}

// clearStatuses removes the status the control plane wrote, so that the
// next replica writes every one again.
func clearStatuses(m *mesh) {
	list, _ := m.sp.List(context.Background(), metav1.ListOptions{})
	for _, u := range list.Items {
		clear := &unstructured.Unstructured{Object: map[string]any{"apiVersion": u.GetAPIVersion(), "kind": u.GetKind(),
			"metadata": map[string]any{"name": u.GetName(), "namespace": u.GetNamespace()}, "status": map[string]any{}}}
		_, _ = m.sp.ApplyStatus(context.Background(), u.GetName(), clear, metav1.ApplyOptions{FieldManager: "latch-control-plane", Force: true})
	}
}

// allAccepted reports whether every object of m's namespace has an Accepted
// status.
func allAccepted(m *mesh) bool {
	list, err := m.sp.List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return false
	}
	for _, u := range list.Items {
		if a, ok := conditionOf(&u, "Accepted"); !ok || a.Status != "True" {
			return false
		}
	}
	return true
}

// BenchmarkFirstSync: with 1,000 ServicePolicies in the cluster, a replica
// (in this process) starting: time until every object is read and served
// (ready), the live heap it then holds, and the time until it has written
// every status. BenchmarkControlPlaneProcess measures the real command.
//
//	go test ./kube -run '^$' -bench FirstSync -benchtime 3x
func BenchmarkFirstSync(b *testing.B) {
	const n = 1000
	c := cluster(b)
	m := newMesh(b, c, "bench-scale")
	createPolicies(b, m, n)
	var syncs, statuses []time.Duration
	var heap []float64
	b.ResetTimer()
	for i := range b.N {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		start := time.Now()
		r := m.replica(fmt.Sprintf("cp-%d", i), replicaOptions{lease: fmt.Sprintf("bench-scale-%d", i)})
		syncs = append(syncs, time.Since(start))
		if got := len(r.store.Snapshot().Declarations); got != n {
			b.Fatalf("%d declarations served, want %d", got, n)
		}
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		if i == 0 {
			// Only the first replica starts from a clean heap: a stopped
			// replica's informers wind down while the next one starts.
			heap = append(heap, float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/(1<<20))
		}
		waitFor(b, "every status to be written", func() bool { return allAccepted(m) })
		statuses = append(statuses, time.Since(start))
		r.stop()
		b.StopTimer()
		clearStatuses(m)
		b.StartTimer()
	}
	b.ReportMetric(ms(percentile(syncs, 50)), "first-sync-ms")
	b.ReportMetric(slices.Max(heap), "heap-MiB")
	b.ReportMetric(ms(percentile(statuses, 50)), "all-status-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkControlPlaneProcess: `latch control-plane --kubernetes`, the
// real binary, started with none and with 1,000 ServicePolicies: time from
// exec to /readyz (every object read and served), its RSS and Go heap then,
// and the time until every status is written.
//
//	go test ./kube -run '^$' -bench ControlPlaneProcess -benchtime 3x
func BenchmarkControlPlaneProcess(b *testing.B) {
	// With none: what the control plane costs before any policy.
	for _, n := range []int{0, 1000} {
		b.Run(strconv.Itoa(n), func(b *testing.B) { benchmarkControlPlaneProcess(b, n) })
	}
}

func benchmarkControlPlaneProcess(b *testing.B, n int) {
	c := cluster(b)
	m := newMesh(b, c, "bench-process-"+strconv.Itoa(n))
	createPolicies(b, m, n)
	dir := b.TempDir()
	bin := filepath.Join(dir, "latch")
	build := exec.Command("go", "build", "-o", bin, "./cmd/latch")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	kubeconfig, err := c.WriteKubeconfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	sock, err := m.ca.AddWorkload(fmt.Sprintf("spiffe://mesh.test/ns/latch-system/sa/bench-process-%d", n))
	if err != nil {
		b.Fatal(err)
	}
	var ready, statuses []time.Duration
	var rss, heap []float64
	b.ResetTimer()
	for i := range b.N {
		admin := "127.0.0.1:" + strconv.Itoa(freePort(b))
		cmd := exec.Command(bin, "control-plane", "--kubernetes", "--kubeconfig", kubeconfig, "--namespaces", m.ns,
			"--lease-name", fmt.Sprintf("bench-process-%d-%d", n, i), "--trust-domains", "mesh.test",
			"--workload-api", sock, "--listen", "127.0.0.1:0", "--admin-address", admin, "--log-level", "warn")
		cmd.Env = append(os.Environ(), "POD_NAME=cp-"+strconv.Itoa(i), "POD_NAMESPACE="+controlPlaneNS)
		start := time.Now()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		waitFor(b, "/readyz", func() bool {
			resp, err := http.Get("http://" + admin + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		})
		ready = append(ready, time.Since(start))
		if kb, err := vmRSS(cmd.Process.Pid); err == nil {
			rss = append(rss, float64(kb)/1024)
		}
		if h, err := metric(admin, "go_memstats_heap_alloc_bytes"); err == nil {
			heap = append(heap, h/(1<<20))
		}
		waitFor(b, "every status to be written", func() bool { return allAccepted(m) })
		statuses = append(statuses, time.Since(start))
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		b.StopTimer()
		clearStatuses(m)
		b.StartTimer()
	}
	b.ReportMetric(ms(percentile(ready, 50)), "ready-ms")
	b.ReportMetric(slices.Max(rss), "rss-MiB")
	b.ReportMetric(slices.Max(heap), "heap-MiB")
	b.ReportMetric(ms(percentile(statuses, 50)), "all-status-ms")
	b.ReportMetric(0, "ns/op")
}

func vmRSS(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}

func metric(admin, name string) (float64, error) {
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("no %s", name)
}
