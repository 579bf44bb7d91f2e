package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// The propagation benchmark measures the control plane alone: it runs in
// the benchmark process, while the simulated sidecars — lightweight ADS
// clients, each with its own SVID and node ID — run in a child process (this
// test binary re-executed), so the CPU and memory figures are the control
// plane's. One iteration is one edit of the declarations file that changes
// every sidecar's policy; it ends when every sidecar has received (and
// ACKed) its new listeners.
//
//	go test ./xds/server -run '^$' -bench Propagation -benchtime 3x
//	go test ./xds/server -run '^$' -bench Propagation/sidecars=10000 -benchtime 1x -timeout 30m
func BenchmarkPropagation(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("sidecars=%d", n), func(b *testing.B) {
			if testing.Short() && n > 1000 {
				b.Skip("a measurement, not a smoke run: skipped with -short")
			}
			benchPropagation(b, n)
		})
	}
}

const swarmEnv = "LATCH_XDS_BENCH_SWARM"

func sidecarID(i int) string { return fmt.Sprintf("spiffe://mesh.test/ns/bench/sa/s%d", i) }

func declarations(n, gen int) string {
	var sb strings.Builder
	for i := range n {
		fmt.Fprintf(&sb, `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: s%d}
spec:
  spiffeID: %s
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      allow: [{id: spiffe://mesh.test/ns/bench/sa/caller}, {id: spiffe://mesh.test/ns/bench/gen/g%d}]
  outbound:
    - port: 9001
      endpoints: ["10.0.0.1:8443", "10.0.0.2:8443"]
      serverID: spiffe://mesh.test/ns/bench/sa/db
---
`, i, sidecarID(i), gen)
	}
	return sb.String()
}

func benchPropagation(b *testing.B, n int) {
	dir := b.TempDir()
	declDir := filepath.Join(dir, "decl")
	if err := os.Mkdir(declDir, 0o755); err != nil {
		b.Fatal(err)
	}
	write := func(gen int) {
		tmp := filepath.Join(declDir, ".all.tmp")
		if err := os.WriteFile(tmp, []byte(declarations(n, gen)), 0o644); err != nil {
			b.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(declDir, "all.yaml")); err != nil {
			b.Fatal(err)
		}
	}
	write(0)

	// The swarm makes the CA (it must issue n SVIDs) and hands the control
	// plane its SVID and the bundle through files.
	cmd := exec.Command(os.Args[0], "-test.run=^TestSwarmHelper$", "-test.timeout=0")
	cmd.Env = append(os.Environ(), swarmEnv+"="+strconv.Itoa(n)+","+dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { stdin.Close(); _ = cmd.Wait() }()
	lines := bufio.NewScanner(stdout)
	expect := func(prefix string) string {
		for lines.Scan() {
			if l := lines.Text(); strings.HasPrefix(l, prefix) {
				return strings.TrimPrefix(l, prefix)
			}
		}
		b.Fatalf("swarm ended before %q: %v", prefix, lines.Err())
		return ""
	}
	expect("pki ")
	certPEM, _ := os.ReadFile(filepath.Join(dir, "cp.crt"))
	keyPEM, _ := os.ReadFile(filepath.Join(dir, "cp.key"))
	bundlePEM, _ := os.ReadFile(filepath.Join(dir, "bundle.crt"))
	svid, err := x509svid.Parse(certPEM, keyPEM)
	if err != nil {
		b.Fatal(err)
	}
	bundle, err := x509bundle.Parse(spiffeid.RequireTrustDomainFromString("mesh.test"), bundlePEM)
	if err != nil {
		b.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store, _ := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{bundle.TrustDomain()}}, nil)
	files := policy.NewFiles(store, declDir)
	srv := server.New(ctx, server.Options{Translate: translate.Options{InboundHost: "127.0.0.1"}})
	snap, _, _ := files.Reload()
	srv.Update(snap)
	g := srv.NewGRPCServer(identity.NewTLS(identitytest.NewSource(svid, bundle)).ServerConfig(identity.Modern(), func(spiffeid.ID) error { return nil }))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	go func() {
		defer wg.Done()
		_ = files.Watch(ctx, 10*time.Millisecond, func(s policy.Snapshot, _ policy.Change) { srv.Update(s) })
	}()
	defer func() { cancel(); g.Stop(); wg.Wait() }()

	connectStart := time.Now()
	fmt.Fprintf(stdin, "%s\n", lis.Addr())
	expect("connected ")
	b.Logf("%d sidecars connected and configured in %v", n, time.Since(connectStart).Round(time.Millisecond))

	var p50s, p99s, maxs []float64
	cpuBefore := cpuTime()
	b.ResetTimer()
	for i := 1; i <= b.N; i++ {
		t0 := time.Now()
		write(i)
		fmt.Fprintf(stdin, "go %d\n", t0.UnixNano())
		f := strings.Fields(expect("done "))
		p50, _ := strconv.ParseFloat(f[0], 64)
		p99, _ := strconv.ParseFloat(f[1], 64)
		mx, _ := strconv.ParseFloat(f[2], 64)
		p50s, p99s, maxs = append(p50s, p50), append(p99s, p99), append(maxs, mx)
	}
	b.StopTimer()
	cpu := cpuTime() - cpuBefore
	rss := rssMB()
	b.ReportMetric(slices.Max(p50s), "p50-ms")
	b.ReportMetric(slices.Max(p99s), "p99-ms")
	b.ReportMetric(slices.Max(maxs), "max-ms")
	b.ReportMetric(cpu.Seconds()/float64(b.N), "cp-cpu-s/op")
	b.ReportMetric(rss, "cp-rss-MB")
	b.Logf("sidecars=%d: time until every sidecar has its new listeners: p50 %.0f ms, p99 %.0f ms, max %.0f ms (worst of %d changes); control plane CPU %.2f s per change, RSS %.0f MB, %d streams",
		n, slices.Max(p50s), slices.Max(p99s), slices.Max(maxs), b.N, cpu.Seconds()/float64(b.N), rss, srv.Connected())
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func rssMB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// TestSwarmHelper is the sidecar swarm of BenchmarkPropagation; it does
// nothing unless started by it.
func TestSwarmHelper(t *testing.T) {
	env := os.Getenv(swarmEnv)
	if env == "" {
		t.Skip("only run by BenchmarkPropagation")
	}
	nStr, dir, _ := strings.Cut(env, ",")
	n, _ := strconv.Atoi(nStr)
	ca := identitytest.NewCA(t, "mesh.test")
	cp := ca.SVID(t, "spiffe://mesh.test/latch/control-plane")
	certPEM, keyPEM, err := cp.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bundlePEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert().Raw})
	for name, data := range map[string][]byte{"cp.crt": certPEM, "cp.key": keyPEM, "bundle.crt": bundlePEM} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	certs := make([]tls.Certificate, n)
	for i := range n {
		certs[i] = ca.TLSCertificate(t, sidecarID(i))
	}
	fmt.Println("pki ok")

	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() {
		return
	}
	addr := in.Text()

	type ack struct {
		i       int
		version string
		at      time.Time
	}
	acks := make(chan ack, n)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64) // bounded connection storm
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
				Certificates: []tls.Certificate{certs[i]}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13,
			})), grpc.WithReadBufferSize(4096), grpc.WithWriteBufferSize(4096))
			if err != nil {
				<-sem
				t.Error(err)
				return
			}
			defer conn.Close()
			st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
			if err != nil {
				<-sem
				t.Error(err)
				return
			}
			node := &core.Node{Id: sidecarID(i)}
			const lds = "type.googleapis.com/envoy.config.listener.v3.Listener"
			const cds = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
			_ = st.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: cds})
			_ = st.Send(&discovery.DiscoveryRequest{TypeUrl: lds})
			first := true
			for {
				resp, err := st.Recv()
				if err != nil {
					if first {
						<-sem
					}
					return
				}
				_ = st.Send(&discovery.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
				if resp.GetTypeUrl() == lds {
					if first {
						first = false
						<-sem
					}
					acks <- ack{i, resp.GetVersionInfo(), time.Now()}
				}
			}
		}()
	}
	version := make([]string, n)
	for have := 0; have < n; {
		a := <-acks
		if version[a.i] == "" {
			have++
		}
		version[a.i] = a.version
	}
	fmt.Printf("connected %d\n", n)

	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) != 2 || f[0] != "go" {
			break
		}
		ns, _ := strconv.ParseInt(f[1], 10, 64)
		t0 := time.Unix(0, ns)
		lat := make([]float64, 0, n)
		updated := make([]bool, n)
		for len(lat) < n {
			a := <-acks
			old := version[a.i]
			version[a.i] = a.version
			if a.version != old && !updated[a.i] {
				updated[a.i] = true
				lat = append(lat, float64(a.at.Sub(t0))/float64(time.Millisecond))
			}
		}
		slices.Sort(lat)
		fmt.Printf("done %.1f %.1f %.1f\n", lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1])
	}
	cancel()
	wg.Wait()
	_, _ = io.Copy(io.Discard, os.Stdin)
}
