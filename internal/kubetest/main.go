package kubetest

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

var shared struct {
	once    sync.Once
	cluster *Cluster
	err     error
}

// Main runs the package's tests and then stops the cluster Shared started,
// if any. Call it from TestMain: os.Exit(kubetest.Main(m)).
func Main(m *testing.M) int {
	if !flag.Parsed() {
		flag.Parse()
	}
	code := m.Run()
	if shared.cluster != nil {
		shared.cluster.Stop()
	}
	return code
}

// Shared returns the package's cluster, starting it on first use (building
// the binaries first if the cache lacks them). It skips the test in -short
// mode and fails it if the cluster cannot start. Tests sharing the cluster
// keep to namespaces of their own.
func Shared(t testing.TB) *Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("needs a kube-apiserver (built from source on first use); not in -short mode")
	}
	shared.once.Do(func() {
		// The build can take half an hour cold: make the wait visible.
		ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
		defer cancel()
		start := time.Now()
		shared.cluster, shared.err = Start(ctx, os.Stderr)
		if shared.err == nil {
			fmt.Fprintf(os.Stderr, "kubetest: kube-apiserver %s ready in %s\n", shared.cluster.Version, time.Since(start).Round(time.Millisecond))
		}
	})
	if shared.err != nil {
		t.Fatalf("starting the test cluster: %v", shared.err)
	}
	return shared.cluster
}
