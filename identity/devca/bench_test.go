package devca_test

import (
	"testing"
	"time"

	"latch.dev/latch/identity/devca"
)

// BenchmarkIssue measures signing one X.509-SVID (P-256 key generation plus
// signature), the cost of every rotation per workload.
func BenchmarkIssue(b *testing.B) {
	ca, err := devca.New(td, devca.Options{Logger: discard()})
	if err != nil {
		b.Fatal(err)
	}
	defer ca.Close()
	for b.Loop() {
		if _, err := ca.Issue("spiffe://devca.test/bench"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRotationPush measures RotateNow until a go-spiffe client watching
// over gRPC holds the new SVID: the latency a rotation adds in tests.
func BenchmarkRotationPush(b *testing.B) {
	ca, err := devca.New(td, devca.Options{Logger: discard()})
	if err != nil {
		b.Fatal(err)
	}
	defer ca.Close()
	addr, err := ca.AddWorkload("spiffe://devca.test/bench")
	if err != nil {
		b.Fatal(err)
	}
	w := watch(b, addr)
	<-w.updates
	var total time.Duration
	for b.Loop() {
		start := time.Now()
		if err := ca.RotateNow(); err != nil {
			b.Fatal(err)
		}
		select {
		case <-w.updates:
		case <-time.After(10 * time.Second):
			b.Fatal("no update after RotateNow")
		}
		total += time.Since(start)
	}
	b.ReportMetric(float64(total.Microseconds())/float64(b.N), "µs/push")
}
