package server_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// BenchmarkDeclarationMemory measures what the control plane keeps per
// declaration when no sidecar is connected: the declarations of a directory
// of one file per workload (the propagation benchmark's), read and served as
// `latch control-plane` does, then the live heap after a collection, per
// declaration. LATCH_XDS_BENCH_PROFILE=dir writes the heap profile there;
// LATCH_XDS_BENCH_MEMPROFILERATE=1 records every allocation in it.
//
//	go test ./xds/server -run '^$' -bench DeclarationMemory -benchtime 1x
func BenchmarkDeclarationMemory(b *testing.B) {
	n := 10000
	if testing.Short() {
		n = 100
	}
	if env := os.Getenv("LATCH_XDS_BENCH_SIDECARS"); env != "" {
		if _, err := fmt.Sscan(env, &n); err != nil {
			b.Fatalf("LATCH_XDS_BENCH_SIDECARS: %v", err)
		}
	}
	if env := os.Getenv(benchMemProfileRateEnv); env != "" {
		rate, err := strconv.Atoi(env)
		if err != nil {
			b.Fatalf("%s: %v", benchMemProfileRateEnv, err)
		}
		defer func(old int) { runtime.MemProfileRate = old }(runtime.MemProfileRate)
		runtime.MemProfileRate = rate
	}
	dir := b.TempDir()
	// Files written an hour ago, as most are in a running mesh: the reload
	// keeps what it needs to trust them unchanged (policy.Files).
	hourAgo := time.Now().Add(-time.Hour)
	for i := range n {
		path := filepath.Join(dir, fmt.Sprintf("s%05d.yaml", i))
		if err := os.WriteFile(path, []byte(declaration(i, 0)), 0o644); err != nil {
			b.Fatal(err)
		}
		if err := os.Chtimes(path, hourAgo, hourAgo); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for range b.N {
		before := liveHeap()
		store, err := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("mesh.test")}}, nil)
		if err != nil {
			b.Fatal(err)
		}
		files := policy.NewFiles(store, dir)
		ctx, cancel := context.WithCancel(context.Background())
		srv := server.New(ctx, server.Options{Translate: translate.Options{InboundHost: "127.0.0.1"}})
		snap, _, err := files.Reload()
		if err != nil {
			b.Fatal(err)
		}
		srv.Update(snap)
		snap = policy.Snapshot{}
		afterFiles := liveHeap()
		b.ReportMetric(float64(afterFiles-before)/float64(n), "live-B/declaration")
		fmt.Printf("    %s: %d declarations served to nobody: live heap %.1f MiB, %.0f B per declaration\n",
			b.Name(), n, float64(afterFiles-before)/(1<<20), float64(afterFiles-before)/float64(n))
		if prof := os.Getenv("LATCH_XDS_BENCH_PROFILE"); prof != "" {
			f, err := os.Create(filepath.Join(prof, "declarations.heap"))
			if err != nil {
				b.Fatal(err)
			}
			if err := pprof.WriteHeapProfile(f); err != nil {
				b.Fatal(err)
			}
			f.Close()
		}
		runtime.KeepAlive(files)
		runtime.KeepAlive(srv)
		cancel()
	}
}

func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
