package kube_test

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strconv"
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
	cfgs := [][2]any{}
	for _, p := range peers {
		cfgs = append(cfgs, [2]any{p, m.peer(p, id)})
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

// BenchmarkFirstSync: with 1,000 ServicePolicies in the cluster, a replica
// starting: time until every object is read and served (ready), the heap
// it then holds, and the time until the leader has written every status.
//
//	go test ./kube -run '^$' -bench FirstSync -benchtime 3x
func BenchmarkFirstSync(b *testing.B) {
	const n = 1000
	c := cluster(b)
	m := newMesh(b, c, "bench-scale")
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := spiffeid.RequireFromString(fmt.Sprintf("spiffe://mesh.test/ns/bench-scale/sa/svc-%d", i))
			spec := inboundSpec(id, 8443, "127.0.0.1:8080", spiffeid.RequireFromString("spiffe://mesh.test/ns/bench-scale/sa/client"))
			u := servicePolicy(b, m.ns, fmt.Sprintf("svc-%d", i), spec)
			if _, err := m.sp.Apply(context.Background(), u.GetName(), u, metav1.ApplyOptions{FieldManager: "bench", Force: true}); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
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
		heap = append(heap, float64(after.HeapInuse-before.HeapInuse)/(1<<20))
		waitFor(b, "every status to be written", func() bool {
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
		})
		statuses = append(statuses, time.Since(start))
		r.stop()
		// The next replica finds every status written: clear them so
		// that it writes all of them again.
		b.StopTimer()
		list, _ := m.sp.List(context.Background(), metav1.ListOptions{})
		for _, u := range list.Items {
			clear := &unstructured.Unstructured{Object: map[string]any{"apiVersion": u.GetAPIVersion(), "kind": u.GetKind(),
				"metadata": map[string]any{"name": u.GetName(), "namespace": u.GetNamespace()}, "status": map[string]any{}}}
			_, _ = m.sp.ApplyStatus(context.Background(), u.GetName(), clear, metav1.ApplyOptions{FieldManager: "latch-control-plane", Force: true})
		}
		b.StartTimer()
	}
	b.ReportMetric(ms(percentile(syncs, 50)), "first-sync-ms")
	b.ReportMetric(slices.Max(heap), "heap-MiB")
	b.ReportMetric(ms(percentile(statuses, 50)), "all-status-ms")
	b.ReportMetric(0, "ns/op")
}
