package server_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	sotw "github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// BenchmarkFloor measures what one connected sidecar costs the control plane
// in memory, layer by layer, to tell how much of it latch could save and how
// much the components it is built on hold whatever latch does:
//
//   - layer=grpc: bare grpc-go with the control plane's own server options
//     and TLS (TLS 1.3, mutual, X25519MLKEM768 first, the sidecars' real
//     SVIDs), and an ADS handler that answers the first request once and
//     then only receives;
//   - layer=go-control-plane: the same transport with go-control-plane's ADS
//     server and snapshot cache, one small snapshot (a listener, a cluster,
//     its endpoints) per node;
//   - layer=latch: the whole control plane serving one declaration per
//     sidecar, as BenchmarkPropagation runs it.
//
// As in BenchmarkPropagation, the sidecars are BenchmarkPropagation's swarm,
// in their own process, each with its own SVID, connection and ADS stream
// (SotW or delta), and the server is a process of its own, serving nobody
// before they connect. Per stream, each figure is the difference divided by
// the number of streams: RSS, anonymous memory and PSS as the kernel counts
// them right after connecting; the Go heap after a collection, split into
// live objects and the free slots of the spans they sit in (fragmentation);
// goroutine stacks; and RSS once the runtime has returned every free page
// (debug.FreeOSMemory), the floor with no collector headroom left. A census
// of the goroutines (from a heap dump) says which goroutines each stream
// adds and how large their stacks are, and a heap profile where the live
// heap of a stream was allocated.
//
//	make bench-floor                       # 10,000 streams, every layer, both protocols
//	LATCH_XDS_FLOOR_STREAMS=2000 go test ./xds/server -run '^$' -bench Floor -benchtime 1x
//	LATCH_XDS_FLOOR_LAYERS=grpc,go-control-plane ...   # some layers only
//	LATCH_XDS_FLOOR_CP_ENV='GOGC=50 GODEBUG=...' ...   # the server process's environment
func BenchmarkFloor(b *testing.B) {
	sizes := []int{10000}
	if testing.Short() {
		sizes = []int{20} // keeps the code working; the figures mean nothing
	}
	if env := os.Getenv("LATCH_XDS_FLOOR_STREAMS"); env != "" {
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatalf("LATCH_XDS_FLOOR_STREAMS: %v", err)
			}
			sizes = append(sizes, n)
		}
	}
	layers := []string{floorGRPC, floorGoControlPlane, floorLatch}
	if env := os.Getenv("LATCH_XDS_FLOOR_LAYERS"); env != "" {
		layers = strings.Split(env, ",")
	}
	protocols := []string{"sotw", "delta"}
	if env := os.Getenv("LATCH_XDS_FLOOR_PROTOCOLS"); env != "" {
		protocols = strings.Split(env, ",")
	}
	for _, n := range sizes {
		for _, layer := range layers {
			for _, proto := range protocols {
				b.Run(fmt.Sprintf("streams=%d/layer=%s/protocol=%s", n, layer, proto), func(b *testing.B) {
					for range b.N {
						measureFloor(b, n, layer, proto)
					}
				})
			}
		}
	}
}

// The layers of BenchmarkFloor.
const (
	floorGRPC           = "grpc"
	floorGoControlPlane = "go-control-plane"
	floorLatch          = "latch"
)

// Environment of the floor server process.
const (
	floorLayerEnv = "LATCH_XDS_FLOOR_LAYER"
	floorDirEnv   = "LATCH_XDS_FLOOR_DIR"
	floorArgsEnv  = "LATCH_XDS_FLOOR_ARGS"
	// floorCPEnvEnv is added to the server process's environment (GOGC,
	// GOMEMLIMIT, GODEBUG...), and to no other.
	floorCPEnvEnv = "LATCH_XDS_FLOOR_CP_ENV"
)

// floorProfileRate is the server's heap profile sampling rate: fine enough
// to place a few hundred bytes per stream (the default, 512 KiB, leaves a
// few hundred samples for 10,000 streams); its records cost about 2 % of
// the heap.
const floorProfileRate = 16 << 10

// floorState is the server's memory at one moment.
type floorState struct {
	asIs  cpMemory           // right after the event, no collection
	live  map[string]float64 // the server's stats after a collection
	gcMem cpMemory           // the kernel's figures after that collection
	freed cpMemory           // after the runtime returned its free pages
	sites map[string]float64 // live heap by allocation site (bytes)
}

func measureFloor(b *testing.B, n int, layer, proto string) {
	dir := b.TempDir()
	if layer == floorLatch {
		decl := filepath.Join(dir, "decl")
		if err := os.Mkdir(decl, 0o755); err != nil {
			b.Fatal(err)
		}
		for i := range n {
			if err := os.WriteFile(filepath.Join(decl, fmt.Sprintf("s%05d.yaml", i)), []byte(declaration(i, 0)), 0o644); err != nil {
				b.Fatal(err)
			}
		}
	}
	swarm := startHelper(b, "swarm", dir, fmt.Sprintf("%d %s", n, proto))
	defer swarm.stop()
	swarm.expect(b, "pki")
	port, err := freeport.Port()
	if err != nil {
		b.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	cp := startFloorServer(b, layer, dir, fmt.Sprintf("%d %s", n, addr))
	defer cp.kill()

	before := floorMeasure(b, cp)
	start := time.Now()
	f := swarm.ask(b, "connect "+addr, "connected")
	took := time.Since(start)
	after := floorMeasure(b, cp)
	census := floorCensus(b, cp, dir)

	per := func(a, b float64) float64 { return (a - b) / float64(n) / 1024 }
	frag := func(s floorState) float64 { return s.live["heap_inuse"] - s.live["heap_alloc"] }
	b.Logf("%d streams (%s) connected in %v (sidecars' CPU %s, server's %s) %s", n, proto, took.Round(time.Millisecond),
		seconds(f["cpu_ns"]), seconds(after.asIs.cpuNS-before.asIs.cpuNS), loadAvg())
	b.Logf("server before: %s", before.asIs)
	b.Logf("server connected: %s", after.asIs)
	b.Logf("server connected, after a collection: RSS %.0f MiB, PSS %.0f MiB, anonymous %.0f MiB; Go heap in use %.0f MiB (live %.0f MiB); after returning free pages: RSS %.0f MiB, PSS %.0f MiB, anonymous %.0f MiB",
		after.gcMem.rss/mib, after.gcMem.pss/mib, after.gcMem.anon/mib, after.live["heap_inuse"]/mib, after.live["heap_alloc"]/mib,
		after.freed.rss/mib, after.freed.pss/mib, after.freed.anon/mib)
	rss, anon, pss := per(after.asIs.rss, before.asIs.rss), per(after.asIs.anon, before.asIs.anon), per(after.asIs.pss, before.asIs.pss)
	live := per(after.live["heap_alloc"], before.live["heap_alloc"])
	stacks := per(after.live["stack_inuse"], before.live["stack_inuse"])
	b.Logf("per stream: RSS %.1f KiB, anonymous %.1f KiB, PSS %.1f KiB as connected; after a collection: Go heap in use %.1f KiB = live %.1f KiB + free slots in in-use spans %.1f KiB; goroutine stacks %.1f KiB for %.1f goroutines; after returning free pages: RSS %.1f KiB, anonymous %.1f KiB, PSS %.1f KiB",
		rss, anon, pss, per(after.live["heap_inuse"], before.live["heap_inuse"]), live, per(frag(after), frag(before)), stacks,
		(after.live["goroutines"]-before.live["goroutines"])/float64(n),
		per(after.freed.rss, before.freed.rss), per(after.freed.anon, before.freed.anon), per(after.freed.pss, before.freed.pss))
	b.Logf("goroutines per stream (census of a heap dump; a stack's size from the alignment of its top: stacks are carved from page-aligned spans at multiples of their size): %s", census.summary(n))
	b.Logf("live heap per stream by allocating component (heap profile, sampled every %d KiB, scaled): %s", floorProfileRate>>10, floorSites(after.sites, before.sites, n, live))
	b.ReportMetric(rss, "rss-KiB/stream")
	b.ReportMetric(anon, "anon-KiB/stream")
	b.ReportMetric(pss, "pss-KiB/stream")
	b.ReportMetric(live, "live-KiB/stream")
	b.ReportMetric(stacks, "stacks-KiB/stream")
	b.ReportMetric(after.asIs.rss/mib, "rss-MiB")
	b.ReportMetric(after.asIs.anon/mib, "anon-MiB")
	b.ReportMetric(after.asIs.pss/mib, "pss-MiB")
	b.ReportMetric(after.freed.rss/mib, "rss-freed-MiB")
}

func floorMeasure(b *testing.B, cp *controlPlane) floorState {
	var s floorState
	s.asIs = cp.mem(b)
	cp.ask(b, "gc", "ok")
	s.live = cp.stats(b)
	s.gcMem = cp.mem(b)
	s.sites = cp.ask(b, "sites", "sites")
	cp.ask(b, "freeos", "ok")
	s.freed = cp.mem(b)
	return s
}

// floorSites lists, per stream, the live heap by component and the largest
// allocation sites, from the server's heap profile before and after the
// streams connected.
func floorSites(after, before map[string]float64, n int, live float64) string {
	type site struct {
		name string
		kib  float64
	}
	var sites []site
	byComponent := map[string]float64{}
	total := 0.0
	for name, v := range after {
		kib := (v - before[name]) / float64(n) / 1024
		sites = append(sites, site{name, kib})
		byComponent[componentOf(name)] += kib
		total += kib
	}
	var comps []site
	for c, kib := range byComponent {
		comps = append(comps, site{c, kib})
	}
	desc := func(a, b site) int { return int(math.Copysign(1, b.kib-a.kib)) }
	slices.SortFunc(comps, desc)
	slices.SortFunc(sites, desc)
	var sb strings.Builder
	fmt.Fprintf(&sb, "%.1f KiB in the profile (%.1f KiB live): ", total, live)
	for i, c := range comps {
		if i > 0 {
			sb.WriteString(", ")
		}
		fmt.Fprintf(&sb, "%s %.1f", c.name, c.kib)
	}
	sb.WriteString("; largest sites:")
	for i, s := range sites {
		if i == 15 || s.kib < 0.1 {
			break
		}
		fmt.Fprintf(&sb, " %s %.2f;", s.name, s.kib)
	}
	return sb.String()
}

// componentOf names the component an allocation site belongs to.
func componentOf(site string) string {
	for _, c := range []struct{ prefix, name string }{
		{"crypto/", "crypto/tls and x509"},
		{"google.golang.org/grpc", "gRPC"},
		{"golang.org/x/net/", "gRPC"}, // its HTTP/2 framer and HPACK
		{"github.com/envoyproxy/", "go-control-plane"},
		{"google.golang.org/protobuf", "protobuf"},
		{"latch.dev/", "latch"},
	} {
		if strings.HasPrefix(site, c.prefix) {
			return c.name
		}
	}
	return "other"
}

// startFloorServer starts the server of a layer in its own process (this
// test binary again, TestFloorHelper) on the PKI the swarm wrote to dir.
func startFloorServer(b *testing.B, layer, dir, args string) *controlPlane {
	env := append([]string{floorLayerEnv + "=" + layer, floorDirEnv + "=" + dir, floorArgsEnv + "=" + args},
		strings.Fields(os.Getenv(floorCPEnvEnv))...)
	h := startProcess(b, "TestFloorHelper", env)
	h.expect(b, "listening")
	return &controlPlane{helper: h}
}

// TestFloorHelper is the server process of BenchmarkFloor; it does nothing
// unless started by it. Commands (stdin) and answers (stdout):
//
//	stats      → stats k=v...   Go's figures now
//	gc         → ok             after two collections
//	freeos     → ok             after debug.FreeOSMemory
//	sites      → sites k=v...   live heap (bytes) by allocation site
//	heapdump F → ok             debug.WriteHeapDump to the file (a FIFO) F
func TestFloorHelper(t *testing.T) {
	layer := os.Getenv(floorLayerEnv)
	if layer == "" {
		t.Skip("only run by BenchmarkFloor")
	}
	runtime.MemProfileRate = floorProfileRate
	dir := os.Getenv(floorDirEnv)
	var n int
	var addr string
	if _, err := fmt.Sscan(os.Getenv(floorArgsEnv), &n, &addr); err != nil {
		t.Fatalf("%s: %v", floorArgsEnv, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tlsConfig, _ := controlPlaneTLS(t, dir)

	var g *grpc.Server
	var streams func() int
	switch layer {
	case floorGRPC:
		ads := &bareADS{}
		g = grpc.NewServer(server.New(ctx, server.Options{}).GRPCServerOptions(tlsConfig)...)
		discovery.RegisterAggregatedDiscoveryServiceServer(g, ads)
		streams = func() int { return int(ads.streams.Load()) }
	case floorGoControlPlane:
		c := cache.NewSnapshotCache(true, cache.IDHash{}, nil)
		res := smallResources()
		for i := range n {
			snap, err := cache.NewSnapshot("1", res)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.SetSnapshot(ctx, sidecarID(i), snap); err != nil {
				t.Fatal(err)
			}
		}
		var open atomic.Int64
		opened := func(context.Context, int64, string) error { open.Add(1); return nil }
		closed := func(int64, *core.Node) { open.Add(-1) }
		xds := serverv3.NewServer(ctx, c, serverv3.CallbackFuncs{
			StreamOpenFunc: opened, StreamClosedFunc: closed, DeltaStreamOpenFunc: opened, DeltaStreamClosedFunc: closed,
		}, sotw.WithOrderedADS()) // as latch orders its responses
		g = grpc.NewServer(server.New(ctx, server.Options{}).GRPCServerOptions(tlsConfig)...)
		discovery.RegisterAggregatedDiscoveryServiceServer(g, xds)
		streams = func() int { return int(open.Load()) }
	case floorLatch:
		store, err := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("mesh.test")}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		snap, _, err := policy.NewFiles(store, filepath.Join(dir, "decl")).Reload()
		if err != nil {
			t.Fatal(err)
		}
		srv := server.New(ctx, server.Options{Translate: translate.Options{InboundHost: "127.0.0.1"}})
		srv.Update(snap)
		g = srv.NewGRPCServer(tlsConfig)
		streams = srv.Connected
	default:
		t.Fatalf("%s: no layer %q", floorLayerEnv, layer)
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	defer func() { g.Stop(); wg.Wait() }()
	fmt.Println("listening")

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "stats":
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Printf("stats cpu_ns=%d streams=%d heap_inuse=%d heap_alloc=%d heap_objects=%d stack_inuse=%d goroutines=%d\n",
				cpuNS(), streams(), ms.HeapInuse, ms.HeapAlloc, ms.HeapObjects, ms.StackInuse, runtime.NumGoroutine())
		case "gc":
			// The second collection finishes sweeping what the first
			// freed, and settles the heap profile (up to two cycles old).
			runtime.GC()
			runtime.GC()
			fmt.Println("ok")
		case "freeos":
			debug.FreeOSMemory()
			fmt.Println("ok")
		case "sites":
			var sb strings.Builder
			sb.WriteString("sites")
			for site, bytes := range heapSites() {
				fmt.Fprintf(&sb, " %s=%.0f", site, bytes)
			}
			fmt.Println(sb.String())
		case "heapdump":
			f, err := os.OpenFile(arg, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			debug.WriteHeapDump(f.Fd())
			f.Close()
			fmt.Println("ok")
		}
	}
}

// bareADS answers a stream's first request with one small response, then
// only receives: the least an ADS server can hold per stream.
type bareADS struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	streams atomic.Int64
}

func (a *bareADS) StreamAggregatedResources(st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	a.streams.Add(1)
	defer a.streams.Add(-1)
	if _, err := st.Recv(); err != nil {
		return err
	}
	// Listeners: what the swarm waits for to count a sidecar configured.
	if err := st.Send(&discovery.DiscoveryResponse{TypeUrl: ldsType, VersionInfo: "1", Nonce: "1"}); err != nil {
		return err
	}
	for {
		if _, err := st.Recv(); err != nil {
			return err
		}
	}
}

func (a *bareADS) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	a.streams.Add(1)
	defer a.streams.Add(-1)
	if _, err := st.Recv(); err != nil {
		return err
	}
	if err := st.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: ldsType, SystemVersionInfo: "1", Nonce: "1"}); err != nil {
		return err
	}
	for {
		if _, err := st.Recv(); err != nil {
			return err
		}
	}
}

// smallResources is one node's snapshot for the go-control-plane layer: a
// listener, an EDS cluster and its two endpoints, as a latch sidecar asks
// for them. Every node's snapshot shares them.
func smallResources() map[resource.Type][]types.Resource {
	addr := func(host string, port uint32) *core.Address {
		return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
			Address: host, PortSpecifier: &core.SocketAddress_PortValue{PortValue: port}}}}
	}
	lb := func(host string) *endpoint.LbEndpoint {
		return &endpoint.LbEndpoint{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: addr(host, 8443)}}}
	}
	return map[resource.Type][]types.Resource{
		resource.ListenerType: {&listener.Listener{Name: "inbound|8443", Address: addr("127.0.0.1", 8443)}},
		resource.ClusterType: {&cluster.Cluster{
			Name:                 edsName,
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
			EdsClusterConfig: &cluster.Cluster_EdsClusterConfig{EdsConfig: &core.ConfigSource{
				ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}}}},
		}},
		resource.EndpointType: {&endpoint.ClusterLoadAssignment{ClusterName: edsName,
			Endpoints: []*endpoint.LocalityLbEndpoints{{LbEndpoints: []*endpoint.LbEndpoint{lb("10.0.0.1"), lb("10.0.0.2")}}}}},
	}
}

// heapSites is the live heap (as of the last collection) by allocation
// site: the innermost function of its stack outside the runtime and the
// general-purpose packages (the one that asked for bytes.Buffer to grow,
// not bytes.Buffer). Sampled records are scaled as pprof scales them.
func heapSites() map[string]float64 {
	var recs []runtime.MemProfileRecord
	n, _ := runtime.MemProfile(nil, false)
	for {
		recs = make([]runtime.MemProfileRecord, n+64)
		var ok bool
		if n, ok = runtime.MemProfile(recs, false); ok {
			recs = recs[:n]
			break
		}
	}
	rate := float64(runtime.MemProfileRate)
	out := map[string]float64{}
	for _, r := range recs {
		objs, bytes := r.InUseObjects(), r.InUseBytes()
		if objs <= 0 {
			continue
		}
		avg := float64(bytes) / float64(objs)
		out[siteOf(r.Stack())] += float64(bytes) / (1 - math.Exp(-avg/rate))
	}
	return out
}

func siteOf(stack []uintptr) string {
	frames := runtime.CallersFrames(stack)
	last := "unknown"
	for {
		f, more := frames.Next()
		switch {
		case f.Function == "runtime.malg":
			// newproc calls it on the system stack, which hides who
			// started the goroutine.
			return "runtime.malg"
		case f.Function == "":
		case !generalPurpose(f.Function):
			return f.Function
		default:
			last = f.Function
		}
		if !more {
			return last
		}
	}
}

// generalPurpose reports whether fn belongs to a package that allocates on
// behalf of its caller.
func generalPurpose(fn string) bool {
	for _, p := range []string{"runtime.", "internal/", "vendor/", "bytes.", "strings.", "reflect.", "sync.", "slices.", "maps.",
		"unique.", "errors.", "fmt.", "strconv.", "sort.", "encoding/", "math/", "container/", "io.", "bufio.", "context.",
		"time.", "net.", "os.", "syscall.", "google.golang.org/protobuf/"} {
		if strings.HasPrefix(fn, p) {
			return true
		}
	}
	return false
}

// stackCensus is what a heap dump says of the goroutines: per kind (the
// function it was started with, and where it waits), how many, and the
// alignment of their stacks' tops.
type stackCensus struct {
	kinds      map[string]*goroutineKind
	stackInuse float64 // Go's StackInuse in the dump
}

type goroutineKind struct {
	count, aligned4K, aligned8K int
	depths                      []uint64 // bytes of stack in use, from the top
}

// size infers the kind's stack size. Stacks up to 16 KiB are carved from
// page-aligned 32 KiB spans at multiples of their size, so a 2 KiB stack's
// top is 4 KiB-aligned half the time and 8 KiB-aligned one time in four, a
// 4 KiB stack's 8 KiB-aligned half the time, an 8 KiB stack's always. A
// 16 KiB stack's top is 8 KiB-aligned too: it would show as a shortfall of
// the census's total against StackInuse.
func (k *goroutineKind) size() int {
	switch {
	case k.aligned4K < k.count:
		return 2 << 10
	case k.aligned8K < k.count:
		return 4 << 10
	default:
		return 8 << 10
	}
}

func (c stackCensus) summary(n int) string {
	type kind struct {
		name string
		*goroutineKind
	}
	var kinds []kind
	for name, k := range c.kinds {
		if k.count*2 >= n { // one (or more) per stream
			kinds = append(kinds, kind{name, k})
		}
	}
	slices.SortFunc(kinds, func(a, b kind) int { return strings.Compare(a.name, b.name) })
	var sb strings.Builder
	total := 0.0
	for _, k := range kinds {
		slices.Sort(k.depths)
		size := k.size()
		total += float64(size*k.count) / float64(n)
		fmt.Fprintf(&sb, "%s: %.2f, stack %d KiB (tops 4/8 KiB-aligned: %.0f%%/%.0f%%; in use p50 %d B, max %d B); ",
			k.name, float64(k.count)/float64(n), size>>10, 100*float64(k.aligned4K)/float64(k.count), 100*float64(k.aligned8K)/float64(k.count),
			k.depths[len(k.depths)/2], k.depths[len(k.depths)-1])
	}
	fmt.Fprintf(&sb, "together %.1f KiB per stream (all stacks: %.0f KiB in the census's StackInuse)", total/1024, c.stackInuse/1024)
	return sb.String()
}

// floorCensus has the server write a heap dump into a FIFO and reads its
// goroutines from it: the dump holds the whole heap, which need not touch
// the disk.
func floorCensus(b *testing.B, cp *controlPlane, dir string) stackCensus {
	fifo := filepath.Join(dir, "heapdump")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		b.Fatal(err)
	}
	type result struct {
		c   stackCensus
		err error
	}
	done := make(chan result, 1)
	go func() {
		f, err := os.Open(fifo)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer f.Close()
		c, err := readStackCensus(f)
		_, _ = io.Copy(io.Discard, f) // never leave the writer blocked
		done <- result{c, err}
	}()
	cp.ask(b, "heapdump "+fifo, "ok")
	r := <-done
	if r.err != nil {
		b.Fatalf("reading the server's heap dump: %v", r.err)
	}
	return r.c
}

// readStackCensus reads a heap dump (the format of runtime/heapdump.go,
// "go1.7 heap dump") and keeps its goroutines and their frames.
func readStackCensus(r io.Reader) (stackCensus, error) {
	d := &dumpReader{r: bufio.NewReaderSize(r, 1<<20)}
	hdr := make([]byte, len("go1.7 heap dump\n"))
	if _, err := io.ReadFull(d.r, hdr); err != nil || string(hdr) != "go1.7 heap dump\n" {
		return stackCensus{}, fmt.Errorf("not a heap dump (header %q): %v", hdr, err)
	}
	c := stackCensus{kinds: map[string]*goroutineKind{}}
	// The current goroutine: its top of stack, and its frames (innermost
	// first).
	var sp, outerTop uint64
	var frames []string
	flush := func() {
		if frames == nil {
			return
		}
		top := (outerTop + 2047) &^ 2047 // the goroutine's first frame sits just under its stack's top
		entry, parked := frames[len(frames)-1], "?"
		if entry == "runtime.goexit" && len(frames) > 1 {
			entry = frames[len(frames)-2]
		}
		for _, f := range frames {
			if !generalPurpose(f) {
				parked = f
				break
			}
		}
		name := entry + " (waiting in " + parked + ")"
		k := c.kinds[name]
		if k == nil {
			k = &goroutineKind{}
			c.kinds[name] = k
		}
		k.count++
		if top%(4<<10) == 0 {
			k.aligned4K++
		}
		if top%(8<<10) == 0 {
			k.aligned8K++
		}
		k.depths = append(k.depths, top-sp)
		frames = nil
	}
	for {
		tag := d.uint()
		switch tag {
		case 0: // EOF
			flush()
			return c, d.err
		case 1, 12, 13: // object, data, bss: address, contents, pointer fields
			d.uint()
			d.skipString()
			d.skipFields()
		case 2: // other root
			d.skipString()
			d.uint()
		case 3: // type
			d.uints(2)
			d.skipString()
			d.uint()
		case 4: // goroutine
			flush()
			d.uint()
			sp = d.uint()
			d.uints(6)
			d.skipString()
			d.uints(4)
			frames = []string{}
		case 5: // stack frame
			frameSP := d.uint()
			d.uints(2)
			size := d.uint()
			d.skip(size)
			d.uints(3)
			frames = append(frames, d.string())
			d.skipFields()
			outerTop = frameSP + size
		case 6: // params
			d.uints(4)
			d.skipString()
			d.skipString()
			d.uint()
		case 7, 11: // finalizers
			d.uints(5)
		case 8, 17: // itab, alloc sample
			d.uints(2)
		case 9: // OS thread
			d.uints(3)
		case 10: // memstats
			v := d.uints(24)
			c.stackInuse = float64(v[12])
			d.uints(257)
		case 14: // defer
			d.uints(7)
		case 15: // panic
			d.uints(6)
		case 16: // memprof bucket
			d.uints(2)
			for range d.uint() {
				d.skipString()
				d.skipString()
				d.uint()
			}
			d.uints(2)
		default:
			if d.err == nil {
				d.err = fmt.Errorf("unknown record %d", tag)
			}
		}
		if d.err != nil {
			return c, d.err
		}
	}
}

// dumpReader reads a heap dump's varints; the first error sticks.
type dumpReader struct {
	r   *bufio.Reader
	err error
}

func (d *dumpReader) uint() uint64 {
	if d.err != nil {
		return 0
	}
	v, err := binary.ReadUvarint(d.r)
	if err != nil {
		d.err = err
	}
	return v
}

func (d *dumpReader) uints(n int) []uint64 {
	v := make([]uint64, n)
	for i := range v {
		v[i] = d.uint()
	}
	return v
}

func (d *dumpReader) skip(n uint64) {
	if d.err != nil {
		return
	}
	if _, err := d.r.Discard(int(n)); err != nil {
		d.err = err
	}
}

func (d *dumpReader) skipString() { d.skip(d.uint()) }

func (d *dumpReader) string() string {
	n := d.uint()
	if d.err != nil || n > 1<<20 {
		if d.err == nil {
			d.err = errors.New("string too long")
		}
		return ""
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(d.r, buf); err != nil {
		d.err = err
	}
	return string(buf)
}

// skipFields skips a list of (kind, offset) pointer fields ending in kind 0.
func (d *dumpReader) skipFields() {
	for d.err == nil && d.uint() != 0 {
		d.uint()
	}
}
