package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// BenchmarkPropagation measures the control plane at mesh scale. Three
// processes: the control plane (this test binary re-executed, serving the
// declarations of a directory with one file per workload, as `latch
// control-plane` does), the sidecars (re-executed too: lightweight ADS
// clients, each with its own SVID, node ID and connection, SotW or delta),
// and this one, which edits the declarations, restarts control planes and
// reads the figures. CPU and memory are the control plane's own, read in its
// process; the sidecars' CPU is reported beside it, as they share the
// machine's cores.
//
// Scenarios, each a sub-benchmark:
//
//   - change=all: one edit changes every workload's policy;
//   - change=one: one workload's file changes; the others must receive
//     nothing;
//   - restart: the control plane is killed and started again; every sidecar
//     reconnects (backoff with jitter, as latch's client does) and must get
//     the same version as before, none left unconfigured;
//   - failover: two replicas; the one serving the sidecars is killed, they
//     move to the other (each new connection picks a replica at random, as a
//     Service's virtual IP does) and must get the same version.
//
// A change is timed from the moment the control plane is told to reload
// (what its file watch does after its debounce, 100 ms by default) until the
// sidecar has received the new listeners; figures print with the machine's
// load average, as other work on the machine moves them.
//
//	make bench-propagation     # every scenario, 1,000 and 10,000 sidecars
//	go test ./xds/server -run '^$' -bench 'Propagation/sidecars=1000/' -benchtime 5x
//	LATCH_XDS_BENCH_PROFILE=/tmp/prof go test ... # CPU and heap profiles of the control plane per scenario
//	LATCH_XDS_BENCH_CP_GOMEMLIMIT=700MiB go test ... # the control plane's GOMEMLIMIT, as the chart sets it
//	LATCH_XDS_BENCH_MEMPROFILERATE=1 go test ...     # every allocation in its heap profiles
func BenchmarkPropagation(b *testing.B) {
	sizes := []int{1000, 10000}
	if testing.Short() {
		// The smoke run keeps the code working; its figures mean nothing.
		sizes = []int{50}
	}
	if env := os.Getenv("LATCH_XDS_BENCH_SIDECARS"); env != "" {
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatalf("LATCH_XDS_BENCH_SIDECARS: %v", err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, n := range sizes {
		for _, proto := range []string{"sotw", "delta"} {
			b.Run(fmt.Sprintf("sidecars=%d/protocol=%s", n, proto), func(b *testing.B) {
				m := startMesh(b, n, proto)
				b.Run("change=all", func(b *testing.B) { m.change(b, true) })
				b.Run("change=one", func(b *testing.B) { m.change(b, false) })
				b.Run("restart", m.restart)
				b.Run("failover", m.failover)
			})
		}
	}
}

// Environment of the helper processes: their role, and its parameters.
const (
	benchRoleEnv = "LATCH_XDS_BENCH_ROLE" // "swarm" or "control-plane"
	benchDirEnv  = "LATCH_XDS_BENCH_DIR"
	benchArgsEnv = "LATCH_XDS_BENCH_ARGS"

	// benchCPMemLimitEnv is the control plane's GOMEMLIMIT (the chart sets
	// it from the container's memory limit); none if unset. GOMEMLIMIT
	// itself would reach the sidecars' process too.
	benchCPMemLimitEnv = "LATCH_XDS_BENCH_CP_GOMEMLIMIT"

	// benchMemProfileRateEnv sets runtime.MemProfileRate in the control
	// plane (and in BenchmarkDeclarationMemory): 1 records every
	// allocation, for per-object figures in its heap profiles, at a cost
	// in CPU that makes its timings meaningless.
	benchMemProfileRateEnv = "LATCH_XDS_BENCH_MEMPROFILERATE"
)

func sidecarID(i int) string { return fmt.Sprintf("spiffe://mesh.test/ns/bench/sa/s%d", i) }

// declaration is workload i's policy; gen changes its allow-list, so its
// listeners, and nothing else.
func declaration(i, gen int) string {
	return fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
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
`, i, sidecarID(i), gen)
}

// mesh is a running benchmark: the declarations, the sidecars' process and
// the control planes.
type mesh struct {
	n       int
	proto   string
	dir     string // PKI files; declarations in dir/decl
	gen     []int  // per workload
	swarm   *helper
	cps     [2]*controlPlane // replicas; [1] only for failover
	serving int              // index of the replica the sidecars are on
	profile string
	next    int // the next workload change=one edits
}

func startMesh(b *testing.B, n int, proto string) *mesh {
	m := &mesh{n: n, proto: proto, dir: b.TempDir(), gen: make([]int, n), profile: os.Getenv("LATCH_XDS_BENCH_PROFILE")}
	if err := os.Mkdir(filepath.Join(m.dir, "decl"), 0o755); err != nil {
		b.Fatal(err)
	}
	for i := range n {
		m.writeDecl(b, i)
	}
	// The sidecars make the CA (they must issue n SVIDs) and hand the
	// control planes their SVID and the bundle through files.
	m.swarm = startHelper(b, "swarm", m.dir, strconv.Itoa(n)+" "+proto)
	m.swarm.expect(b, "pki")
	port, err := freeport.Port()
	if err != nil {
		b.Fatal(err)
	}
	m.cps[0] = m.startControlPlane(b, port)
	idle := m.cps[0].mem(b)
	idleLive := m.cps[0].live(b)
	start := time.Now()
	f := m.swarm.ask(b, "connect "+m.cps[0].addr, "connected")
	took := time.Since(start)
	conn := m.cps[0].mem(b)
	connLive := m.cps[0].live(b)
	// Printed, not logged: a parent benchmark's log is not shown.
	fmt.Printf("    %s: %d sidecars (%s) connected and configured in %v (sidecars' CPU %s, control plane's %s) %s; control plane %s\n",
		b.Name(), n, proto, took.Round(time.Millisecond), seconds(f["cpu_ns"]), seconds(conn.cpuNS-idle.cpuNS), loadAvg(), conn)
	// What each connected sidecar costs: the difference from the control
	// plane serving the same declarations to nobody, per sidecar; as the
	// kernel counts it, and what is live after a collection (the garbage
	// collector lets the heap grow past that, by GOGC).
	per := func(after, before float64) float64 { return (after - before) / float64(n) / 1024 }
	fmt.Printf("    %s: control plane serving %d declarations to no sidecar: %s, live heap %.0f MiB; per connected sidecar: RSS %.1f KiB, anonymous %.1f KiB, Go heap in use %.1f KiB, goroutine stacks %.1f KiB, %.1f goroutines; live after a collection: heap %.1f KiB + stacks %.1f KiB\n",
		b.Name(), n, idle, idleLive.heapInuse/mib, per(conn.rss, idle.rss), per(conn.anon, idle.anon), per(conn.heapInuse, idle.heapInuse), per(conn.stackInuse, idle.stackInuse),
		(conn.goroutines-idle.goroutines)/float64(n), per(connLive.heapInuse, idleLive.heapInuse), per(connLive.stackInuse, idleLive.stackInuse))
	b.Cleanup(func() {
		m.swarm.stop()
		for _, cp := range m.cps {
			if cp != nil {
				cp.kill()
			}
		}
	})
	return m
}

func (m *mesh) writeDecl(b *testing.B, i int) {
	dir := filepath.Join(m.dir, "decl")
	tmp := filepath.Join(dir, fmt.Sprintf(".s%05d.tmp", i))
	if err := os.WriteFile(tmp, []byte(declaration(i, m.gen[i])), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, fmt.Sprintf("s%05d.yaml", i))); err != nil {
		b.Fatal(err)
	}
}

// change edits the declarations of every workload (all) or of one, has the
// control plane reload, and waits until every affected sidecar has its new
// listeners and the others have had time to receive anything they would.
func (m *mesh) change(b *testing.B, all bool) {
	cp := m.cps[m.serving]
	var lat []float64
	var cpuNS, swarmNS, wallNS, pushes, unaffected, affectedResp float64
	b.ResetTimer()
	stopProfile := cp.profile(b, m.profile, b.Name())
	changes := b.N
	if !all && !testing.Short() {
		// Ten single-workload changes an iteration, for percentiles.
		changes *= oneChangesPerOp
	}
	for range changes {
		b.StopTimer()
		affected := "all"
		if all {
			for i := range m.n {
				m.gen[i]++
				m.writeDecl(b, i)
			}
		} else {
			i := m.next % m.n
			m.next += 7919 // a prime: a different workload each time
			m.gen[i]++
			m.writeDecl(b, i)
			affected = strconv.Itoa(i)
		}
		before := cp.stats(b)
		b.StartTimer()
		t0 := time.Now()
		// The swarm watches before the control plane is told: its answers
		// could otherwise come first.
		m.swarm.ask(b, fmt.Sprintf("change %d %s", t0.UnixNano(), affected), "watching")
		cp.ask(b, "reload", "reloaded")
		f := m.swarm.expect(b, "changed")
		b.StopTimer()
		after := cp.stats(b)
		lat = append(lat, m.swarm.latencies(b)...)
		cpuNS += after["cpu_ns"] - before["cpu_ns"]
		pushes += after["pushes"] - before["pushes"]
		swarmNS += f["cpu_ns"]
		wallNS += f["wall_ns"]
		unaffected += f["unaffected_responses"]
		affectedResp += f["affected_responses"]
		b.StartTimer()
	}
	b.StopTimer()
	stopProfile()
	ops := float64(changes)
	p50, p99, mx := percentiles(lat)
	b.ReportMetric(p50, "p50-ms")
	b.ReportMetric(p99, "p99-ms")
	b.ReportMetric(mx, "max-ms")
	b.ReportMetric(cpuNS/ops/1e9, "cp-cpu-s/change")
	b.ReportMetric(unaffected/ops, "unaffected-responses/change")
	b.Logf("%s: %d changes, %d sidecars (%s): new listeners applied p50 %.0f ms, p99 %.0f ms, max %.0f ms; control plane CPU %.3f s per change, %.0f responses sent per change (%.0f received by affected sidecars, %.0f by the others); of the 2 cores during a change, control plane %.0f%%, sidecars' process %.0f%% %s; control plane %s",
		map[bool]string{true: "every workload's policy changed", false: "one workload's policy changed"}[all],
		changes, m.n, m.proto, p50, p99, mx, cpuNS/ops/1e9, pushes/ops, affectedResp/ops, unaffected/ops,
		100*cpuNS/wallNS/2, 100*swarmNS/wallNS/2, loadAvg(), cp.memory(b))
}

// oneChangesPerOp is how many single-workload changes one iteration of
// change=one makes.
const oneChangesPerOp = 10

// restart kills the control plane and starts another on the same address:
// every sidecar must reconnect and get the version it had.
func (m *mesh) restart(b *testing.B) {
	for range b.N {
		old := m.cps[m.serving]
		addr := old.addr
		t0 := time.Now()
		m.swarm.ask(b, fmt.Sprintf("reconnect %d %s", t0.UnixNano(), addr), "watching")
		old.kill()
		cp := m.startControlPlane(b, old.port)
		m.cps[m.serving] = cp
		up := time.Since(t0)
		stopProfile := cp.profile(b, m.profile, b.Name())
		f := m.swarm.expect(b, "reconnected")
		stopProfile()
		st := cp.stats(b)
		m.reportReconnect(b, "restart", f, up, st, cp)
	}
}

// failover kills the replica serving the sidecars while another replica
// serves the same declarations: every sidecar must move to it and get the
// version it had.
func (m *mesh) failover(b *testing.B) {
	other := 1 - m.serving
	if m.cps[other] == nil {
		port, err := freeport.Port()
		if err != nil {
			b.Fatal(err)
		}
		m.cps[other] = m.startControlPlane(b, port)
	}
	for range b.N {
		dead, live := m.cps[m.serving], m.cps[other]
		m.swarm.ask(b, "replicas "+dead.addr+","+live.addr, "ok")
		before := live.stats(b)
		stopProfile := live.profile(b, m.profile, b.Name())
		t0 := time.Now()
		// The Service stops sending new connections to the dead replica
		// once its endpoint is removed, about a second later in
		// Kubernetes; until then half the attempts fail and back off.
		m.swarm.ask(b, fmt.Sprintf("reconnect %d %s %s", t0.UnixNano(), dead.addr, time.Second), "watching")
		dead.kill()
		f := m.swarm.expect(b, "reconnected")
		stopProfile()
		after := live.stats(b)
		after["cpu_ns"] -= before["cpu_ns"]
		m.reportReconnect(b, "failover", f, 0, after, live)
		// The dead replica comes back, empty; the next iteration kills the
		// one that now holds the sidecars.
		m.cps[m.serving] = m.startControlPlane(b, dead.port)
		m.serving, other = other, m.serving
		m.swarm.ask(b, "replicas "+m.cps[m.serving].addr+","+m.cps[other].addr, "ok")
	}
}

func (m *mesh) reportReconnect(b *testing.B, what string, f map[string]float64, up time.Duration, cpStats map[string]float64, cp *controlPlane) {
	lat := m.swarm.latencies(b)
	p50, p99, mx := percentiles(lat)
	// How many came back in each 5 s: a steady rate from the moment the
	// control plane serves says the machine's CPU sets the pace; gaps, that
	// the sidecars' backoff does.
	var per5s []int
	for _, l := range lat {
		i := int(l / 5000)
		for len(per5s) <= i {
			per5s = append(per5s, 0)
		}
		per5s[i]++
	}
	b.ReportMetric(mx/1000, "all-reconnected-s")
	b.ReportMetric(f["regressed"], "regressed")
	b.ReportMetric(f["unconfigured"], "unconfigured")
	b.ReportMetric(f["late"], "not-back-in-3min")
	upText := ""
	if up > 0 {
		upText = fmt.Sprintf("new control plane serving after %v (it reads and translates every declaration first); ", up.Round(time.Millisecond))
	}
	// Of the two cores over the storm (until the last sidecar was back).
	share := func(ns float64) float64 { return 100 * ns / (mx * 1e6) / 2 }
	b.Logf("%s, %d sidecars (%s): %.0f moved; %sconfigured again after p50 %.0f ms, p99 %.0f ms, all %.1f s (%.0f within 30 s, %.0f not within %v; per 5 s: %s); %.0f got another version, %.0f got no listeners, %.0f NACKs; control plane CPU %.2f s, sidecars' process %s: of the 2 cores until the last was back, control plane %.0f%%, sidecars' process %.0f%% %s; control plane %s",
		what, m.n, m.proto, f["moved"], upText, p50, p99, mx/1000, within(lat, 30000), f["late"], reconnectDeadline, strings.Trim(fmt.Sprint(per5s), "[]"), f["regressed"], f["unconfigured"], cpStats["nacks"],
		cpStats["cpu_ns"]/1e9, seconds(f["cpu_ns"]), share(cpStats["cpu_ns"]), share(f["cpu_ns"]), loadAvg(), cp.memory(b))
}

// within counts the latencies up to ms.
func within(lat []float64, ms float64) float64 {
	n := 0.0
	for _, l := range lat {
		if l <= ms {
			n++
		}
	}
	return n
}

func percentiles(ms []float64) (p50, p99, mx float64) {
	if len(ms) == 0 {
		return 0, 0, 0
	}
	slices.Sort(ms)
	return ms[len(ms)/2], ms[len(ms)*99/100], ms[len(ms)-1]
}

func seconds(ns float64) string { return fmt.Sprintf("%.2f s", ns/1e9) }

// loadAvg is the machine's load average, printed beside every figure.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "(load average unknown)"
	}
	f := strings.Fields(string(b))
	return fmt.Sprintf("(load average %s %s %s)", f[0], f[1], f[2])
}

// helper is a child process speaking lines on stdin and stdout.
type helper struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	done  chan struct{}
}

func startHelper(b *testing.B, role, dir, args string, env ...string) *helper {
	env = append([]string{benchRoleEnv + "=" + role, benchDirEnv + "=" + dir, benchArgsEnv + "=" + args}, env...)
	return startProcess(b, "TestBenchHelper", env)
}

// startProcess runs this test binary again as the test named test, with env
// added to this process's environment, and reads its answers line by line.
func startProcess(b *testing.B, test string, env []string) *helper {
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.timeout=0")
	cmd.Env = append(os.Environ(), env...)
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	h := &helper{cmd: cmd, in: in, lines: make(chan string, 16), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(nil, 64<<20)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
	}()
	return h
}

func (h *helper) send(b *testing.B, line string) {
	if _, err := fmt.Fprintln(h.in, line); err != nil {
		b.Fatalf("%s: %v", line, err)
	}
}

// expect waits for the line starting with word and returns its key=value
// fields.
func (h *helper) expect(b *testing.B, word string) map[string]float64 {
	for l := range h.lines {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != word {
			continue
		}
		out := map[string]float64{}
		for _, kv := range f[1:] {
			k, v, _ := strings.Cut(kv, "=")
			out[k], _ = strconv.ParseFloat(v, 64)
		}
		return out
	}
	b.Fatalf("helper ended before %q", word)
	return nil
}

func (h *helper) ask(b *testing.B, line, word string) map[string]float64 {
	h.send(b, line)
	return h.expect(b, word)
}

// latencies reads the swarm's last per-sidecar figures (milliseconds).
func (h *helper) latencies(b *testing.B) []float64 {
	h.send(b, "latencies")
	for l := range h.lines {
		rest, ok := strings.CutPrefix(l, "latencies")
		if !ok {
			continue
		}
		var out []float64
		for _, s := range strings.Fields(rest) {
			v, _ := strconv.ParseFloat(s, 64)
			out = append(out, v)
		}
		return out
	}
	b.Fatal("helper ended before its latencies")
	return nil
}

func (h *helper) stop() {
	h.in.Close()
	go func() {
		for range h.lines {
		}
	}()
	select {
	case <-h.done:
	case <-time.After(10 * time.Second):
		_ = h.cmd.Process.Kill()
	}
	_ = h.cmd.Wait()
}

// controlPlane is one replica in its own process.
type controlPlane struct {
	*helper
	port int
	addr string
}

func (m *mesh) startControlPlane(b *testing.B, port int) *controlPlane {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var env []string
	if limit := os.Getenv(benchCPMemLimitEnv); limit != "" {
		env = append(env, "GOMEMLIMIT="+limit)
	}
	h := startHelper(b, "control-plane", m.dir, addr, env...)
	h.expect(b, "listening")
	return &controlPlane{helper: h, port: port, addr: addr}
}

func (cp *controlPlane) kill() {
	_ = cp.cmd.Process.Signal(syscall.SIGKILL)
	cp.stop()
}

func (cp *controlPlane) stats(b *testing.B) map[string]float64 { return cp.ask(b, "stats", "stats") }

// cpMemory is the control plane's memory as the kernel counts it (RSS, PSS:
// shared pages divided among their users, anonymous memory: heap and
// stacks, what is not file-backed; peak RSS) and as Go does.
type cpMemory struct {
	rss, pss, anon, peak                       float64 // bytes
	heapInuse, stackInuse, goroutines, streams float64
	cpuNS                                      float64
}

func (cp *controlPlane) mem(b *testing.B) cpMemory {
	var m cpMemory
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", cp.cmd.Process.Pid)); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			f := strings.Fields(l)
			if len(f) != 3 || f[2] != "kB" {
				continue
			}
			v, _ := strconv.ParseFloat(f[1], 64)
			switch f[0] {
			case "Rss:":
				m.rss = v * 1024
			case "Pss:":
				m.pss = v * 1024
			case "Anonymous:":
				m.anon = v * 1024
			}
		}
	}
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cp.cmd.Process.Pid)); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if f := strings.Fields(l); len(f) == 3 && f[0] == "VmHWM:" {
				v, _ := strconv.ParseFloat(f[1], 64)
				m.peak = v * 1024
			}
		}
	}
	st := cp.stats(b)
	m.heapInuse, m.stackInuse, m.goroutines, m.streams, m.cpuNS = st["heap_inuse"], st["stack_inuse"], st["goroutines"], st["streams"], st["cpu_ns"]
	return m
}

const mib = 1 << 20

func (m cpMemory) String() string {
	if m.rss == 0 {
		return "(memory unknown)"
	}
	return fmt.Sprintf("RSS %.0f MiB, PSS %.0f MiB, anonymous %.0f MiB, peak RSS %.0f MiB (Go heap in use %.0f MiB, goroutine stacks %.0f MiB for %.0f goroutines, %.0f streams)",
		m.rss/mib, m.pss/mib, m.anon/mib, m.peak/mib, m.heapInuse/mib, m.stackInuse/mib, m.goroutines, m.streams)
}

// live is the control plane's memory right after a collection.
func (cp *controlPlane) live(b *testing.B) cpMemory {
	cp.ask(b, "gc", "ok")
	return cp.mem(b)
}

// memory reports the control plane's memory (cpMemory) and its RSS as a
// metric.
func (cp *controlPlane) memory(b *testing.B) string {
	m := cp.mem(b)
	b.ReportMetric(m.rss/mib, "cp-rss-MiB")
	return m.String()
}

// profile records the control plane's CPU profile until the returned
// function is called, and its heap then, when dir is set.
func (cp *controlPlane) profile(b *testing.B, dir, name string) func() {
	if dir == "" {
		return func() {}
	}
	base := filepath.Join(dir, strings.NewReplacer("/", "_", "=", "-").Replace(name))
	cp.ask(b, "cpuprofile "+base+".cpu", "ok")
	return func() {
		cp.ask(b, "stopprofile", "ok")
		cp.ask(b, "heapprofile "+base+".heap", "ok")
		b.Logf("profiles: %s.cpu, %s.heap", base, base)
	}
}

// TestBenchHelper is a helper process of BenchmarkPropagation; it does
// nothing unless started by it.
func TestBenchHelper(t *testing.T) {
	dir, args := os.Getenv(benchDirEnv), os.Getenv(benchArgsEnv)
	switch os.Getenv(benchRoleEnv) {
	case "swarm":
		f := strings.Fields(args)
		n, _ := strconv.Atoi(f[0])
		runSwarm(t, dir, n, f[1])
	case "control-plane":
		runControlPlane(t, dir, args)
	default:
		t.Skip("only run by BenchmarkPropagation")
	}
}

func cpuNS() int64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// runControlPlane serves the declarations of dir/decl on addr with the SVID
// the swarm wrote, and answers the benchmark's commands until stdin ends.
func runControlPlane(t *testing.T, dir, addr string) {
	if env := os.Getenv(benchMemProfileRateEnv); env != "" {
		rate, err := strconv.Atoi(env)
		if err != nil {
			t.Fatalf("%s: %v", benchMemProfileRateEnv, err)
		}
		runtime.MemProfileRate = rate
	}
	if prof := os.Getenv("LATCH_XDS_BENCH_PROFILE"); prof != "" {
		// Start-up (reading and translating every declaration) until
		// listening: what a restart costs before any sidecar is served.
		f, err := os.Create(filepath.Join(prof, fmt.Sprintf("control-plane-startup-%d.cpu", time.Now().UnixNano())))
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		defer f.Close()
	}
	tlsConfig, td := controlPlaneTLS(t, dir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reg := prometheus.NewRegistry()
	store, err := policy.NewStore(policy.Options{TrustDomains: []spiffeid.TrustDomain{td}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	files := policy.NewFiles(store, filepath.Join(dir, "decl"))
	srv := server.New(ctx, server.Options{Translate: translate.Options{InboundHost: "127.0.0.1"}, Metrics: server.NewMetrics(reg)})
	// As `latch control-plane` does: everything at start, then what each
	// reload changed.
	snap, _, err := files.Reload()
	if err != nil {
		t.Fatal(err)
	}
	srv.Update(snap)
	reload := func() {
		snap, ch, err := files.Reload()
		if err != nil {
			t.Error(err)
		}
		srv.UpdateChanged(snap, ch)
	}
	g := srv.NewGRPCServer(tlsConfig)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = g.Serve(lis) }()
	defer func() { g.Stop(); wg.Wait() }()
	pprof.StopCPUProfile()
	fmt.Println("listening")

	counter := func(name string) float64 {
		mfs, _ := reg.Gather()
		sum := 0.0
		for _, mf := range mfs {
			if mf.GetName() == name {
				for _, m := range mf.GetMetric() {
					sum += m.GetCounter().GetValue()
				}
			}
		}
		return sum
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "reload":
			reload()
			fmt.Println("reloaded")
		case "stats":
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Printf("stats cpu_ns=%d pushes=%.0f nacks=%.0f streams=%d heap_inuse=%d stack_inuse=%d goroutines=%d\n",
				cpuNS(), counter("latch_xds_pushes_total"), counter("latch_xds_nacks_total"), srv.Connected(), ms.HeapInuse, ms.StackInuse, runtime.NumGoroutine())
		case "cpuprofile":
			f, err := os.Create(arg)
			if err != nil {
				t.Fatal(err)
			}
			if err := pprof.StartCPUProfile(f); err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			fmt.Println("ok")
		case "gc":
			runtime.GC()
			fmt.Println("ok")
		case "stopprofile":
			pprof.StopCPUProfile()
			fmt.Println("ok")
		case "heapprofile":
			f, err := os.Create(arg)
			if err != nil {
				t.Fatal(err)
			}
			runtime.GC()
			_ = pprof.WriteHeapProfile(f)
			f.Close()
			fmt.Println("ok")
		}
	}
}

// runSwarm runs n sidecars. Commands (stdin) and answers (stdout):
//
//	connect ADDR[,ADDR]   → connected cpu_ns=N         every sidecar has its config
//	replicas ADDR[,ADDR]  → ok                         where new connections go
//	change T0 all|I       → watching, changed ...      the affected have new listeners
//	reconnect T0 ADDR [D] → watching, reconnected ...  those on ADDR are configured again;
//	                                                   ADDR leaves the replicas after D
//	latencies             → latencies MS...            of the last change or reconnect
func runSwarm(t *testing.T, dir string, n int, proto string) {
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
	sw := &swarm{n: n, delta: proto == "delta", events: make(chan sidecarEvent, 1024), state: make([]sidecarState, n)}
	sw.certs = make([]tls.Certificate, n)
	for i := range n {
		sw.certs[i] = ca.TLSCertificate(t, sidecarID(i))
	}
	fmt.Println("pki")

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	loopDone := make(chan struct{})
	go func() { defer close(loopDone); sw.loop() }()
	defer func() { cancel(); wg.Wait(); close(sw.events); <-loopDone }()
	in := bufio.NewScanner(os.Stdin)
	var last []float64
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		cpu0, wall0 := cpuNS(), time.Now()
		switch f[0] {
		case "replicas":
			sw.setReplicas(strings.Split(f[1], ","))
			fmt.Println("ok")
		case "connect":
			sw.setReplicas(strings.Split(f[1], ","))
			have := 0
			w := sw.watch(func(ev sidecarEvent, prev sidecarState) bool {
				if ev.kind == evConfigured && prev.from == "" {
					have++
				}
				return have == n
			})
			sem := make(chan struct{}, swarmConnecting)
			for i := range n {
				wg.Add(1)
				go func() { defer wg.Done(); sw.run(ctx, i, sem) }()
			}
			<-w.complete
			sw.unwatch()
			fmt.Printf("connected cpu_ns=%d\n", cpuNS()-cpu0)
		case "change":
			ns, _ := strconv.ParseInt(f[1], 10, 64)
			var unaffected, affected int
			last, unaffected, affected = sw.awaitChange(time.Unix(0, ns), f[2])
			fmt.Printf("changed cpu_ns=%d wall_ns=%d unaffected_responses=%d affected_responses=%d\n",
				cpuNS()-cpu0, time.Since(wall0), unaffected, affected)
		case "reconnect":
			ns, _ := strconv.ParseInt(f[1], 10, 64)
			if len(f) > 3 {
				d, _ := time.ParseDuration(f[3])
				time.AfterFunc(d, func() {
					sw.mu.Lock()
					sw.replicas = slices.DeleteFunc(slices.Clone(sw.replicas), func(a string) bool { return a == f[2] })
					sw.mu.Unlock()
				})
			}
			var moved, regressed, unconfigured, late int
			last, moved, regressed, unconfigured, late = sw.awaitReconnect(time.Unix(0, ns), f[2])
			fmt.Printf("reconnected cpu_ns=%d moved=%d regressed=%d unconfigured=%d late=%d\n", cpuNS()-cpu0, moved, regressed, unconfigured, late)
		case "latencies":
			var sb strings.Builder
			sb.WriteString("latencies")
			for _, l := range last {
				fmt.Fprintf(&sb, " %.1f", l)
			}
			fmt.Println(sb.String())
		}
	}
}

type swarm struct {
	n     int
	delta bool
	certs []tls.Certificate

	events chan sidecarEvent

	mu       sync.Mutex
	replicas []string
	state    []sidecarState
	watcher  *watcher
}

type sidecarState struct {
	version string // of the listeners last received
	from    string // replica of the stream that delivered them
}

const (
	evResponse   = iota // any response
	evConfigured        // listeners received (version, empty)
	evLost              // stream ended
)

type sidecarEvent struct {
	i       int
	kind    int
	version string
	empty   bool
	addr    string
	at      time.Time
}

// watcher sees every event, with the sidecar's state before it, while a
// command waits; complete is closed once fn first reports true.
type watcher struct {
	fn       func(ev sidecarEvent, prev sidecarState) bool
	complete chan struct{}
	closed   bool
}

// loop receives every event: sidecars never wait on the command loop.
func (sw *swarm) loop() {
	for ev := range sw.events {
		sw.mu.Lock()
		prev := sw.state[ev.i]
		if ev.kind == evConfigured {
			sw.state[ev.i] = sidecarState{version: ev.version, from: ev.addr}
		}
		if w := sw.watcher; w != nil && w.fn(ev, prev) && !w.closed {
			w.closed = true
			close(w.complete)
		}
		sw.mu.Unlock()
	}
}

func (sw *swarm) watch(fn func(ev sidecarEvent, prev sidecarState) bool) *watcher {
	w := &watcher{fn: fn, complete: make(chan struct{})}
	sw.mu.Lock()
	sw.watcher = w
	sw.mu.Unlock()
	return w
}

func (sw *swarm) unwatch() {
	sw.mu.Lock()
	sw.watcher = nil
	sw.mu.Unlock()
}

func (sw *swarm) setReplicas(addrs []string) {
	sw.mu.Lock()
	sw.replicas = addrs
	sw.mu.Unlock()
}

// pick chooses the replica of a new connection at random, as a Service's
// virtual IP does.
func (sw *swarm) pick() string {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	return sw.replicas[rand.N(len(sw.replicas))]
}

// awaitChange waits until the affected sidecars ("all" or one index) have
// listeners of a new version, then 300 ms more, counting what every sidecar
// receives; it returns the affected sidecars' latencies and the responses
// the others and they received.
func (sw *swarm) awaitChange(t0 time.Time, affected string) (lat []float64, unaffected, affectedResponses int) {
	isAffected := func(i int) bool { return affected == "all" || affected == strconv.Itoa(i) }
	want := 1
	if affected == "all" {
		want = sw.n
	}
	updated := make([]bool, sw.n)
	w := sw.watch(func(ev sidecarEvent, prev sidecarState) bool {
		switch {
		case ev.kind == evResponse && isAffected(ev.i):
			affectedResponses++
		case ev.kind == evResponse:
			unaffected++
		case ev.kind == evConfigured && isAffected(ev.i) && ev.version != prev.version && !updated[ev.i]:
			updated[ev.i] = true
			lat = append(lat, float64(ev.at.Sub(t0))/float64(time.Millisecond))
		}
		return len(lat) == want
	})
	fmt.Println("watching")
	select {
	case <-w.complete:
		time.Sleep(300 * time.Millisecond) // anything else on its way arrives and is counted
	case <-time.After(60 * time.Second):
		fmt.Fprintf(os.Stderr, "swarm: only %d of %d affected sidecars updated within 60 s\n", len(lat), want)
	}
	sw.unwatch()
	return lat, unaffected, affectedResponses
}

// awaitReconnect waits until every sidecar whose listeners came from addr
// has them again from a stream opened after t0, or reconnectDeadline; it
// returns their latencies, how many there were, how many got another
// version or no listeners, and how many were still waiting at the deadline.
func (sw *swarm) awaitReconnect(t0 time.Time, addr string) (lat []float64, moved, regressed, unconfigured, late int) {
	sw.mu.Lock()
	pending := map[int]string{} // sidecar → its version at t0
	for i, st := range sw.state {
		if st.from == addr {
			pending[i] = st.version
		}
	}
	sw.mu.Unlock()
	moved = len(pending)
	w := sw.watch(func(ev sidecarEvent, _ sidecarState) bool {
		was, ok := pending[ev.i]
		if ev.kind != evConfigured || !ok || !ev.at.After(t0) {
			return len(pending) == 0
		}
		if ev.version != was {
			regressed++
		}
		if ev.empty {
			unconfigured++
		}
		delete(pending, ev.i)
		lat = append(lat, float64(ev.at.Sub(t0))/float64(time.Millisecond))
		return len(pending) == 0
	})
	fmt.Println("watching")
	if moved > 0 {
		select {
		case <-w.complete:
		case <-time.After(reconnectDeadline):
		}
	}
	sw.unwatch()
	sw.mu.Lock()
	defer sw.mu.Unlock()
	return lat, moved, regressed, unconfigured, len(pending)
}

// reconnectDeadline bounds the wait for a restart or failover; the goal is
// 30 s, the figure is measured beyond it.
const reconnectDeadline = 3 * time.Minute

// swarmConnecting is how many sidecars of the swarm connect at once (see
// run).
const swarmConnecting = 64

// run is sidecar i: it keeps an ADS stream to a replica, reconnecting with
// jittered exponential backoff as latch's client does (250 ms doubling to 30
// s, reset once a stream has delivered).
//
// Every sidecar connecting takes one of the swarm's connection slots until
// its stream has delivered (or failed). A real sidecar does its half of the
// TLS handshake (key share, ML-KEM, two signatures to check) on its own
// CPU; here ten thousand share two cores with the control plane, and all at
// once each would take longer than the control plane's handshake timeout,
// fail and start again: a collapse only this co-location causes. With the
// slots, the figures show what the control plane costs and how fast this
// machine as a whole gets through a storm.
func (sw *swarm) run(ctx context.Context, i int, sem chan struct{}) {
	backoff := 250 * time.Millisecond
	known := map[string]map[string]string{} // delta: type → name → version
	for ctx.Err() == nil {
		addr := sw.pick()
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		var once sync.Once
		release := func() { once.Do(func() { <-sem }) }
		got := sw.session(ctx, i, addr, known, release)
		release()
		sw.events <- sidecarEvent{i: i, kind: evLost, addr: addr, at: time.Now()}
		if got {
			backoff = 250 * time.Millisecond
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

const (
	ldsType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	cdsType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	edsType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	edsName = "outbound|9001" // the one EDS cluster of every declaration
)

// session is one connection and stream; it reports whether the stream
// delivered anything.
func (sw *swarm) session(ctx context.Context, i int, addr string, known map[string]map[string]string, configured func()) bool {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{sw.certs[i]}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13,
	})), grpc.WithReadBufferSize(4096), grpc.WithWriteBufferSize(4096))
	if err != nil {
		return false
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	node := &core.Node{Id: sidecarID(i)}
	report := func(kind int, version string, empty bool) {
		sw.events <- sidecarEvent{i: i, kind: kind, version: version, empty: empty, addr: addr, at: time.Now()}
	}
	got := false
	if !sw.delta {
		st, err := ads.StreamAggregatedResources(sctx)
		if err != nil {
			return false
		}
		_ = st.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: cdsType})
		_ = st.Send(&discovery.DiscoveryRequest{TypeUrl: ldsType})
		eds := false
		for {
			resp, err := st.Recv()
			if err != nil {
				return got
			}
			got = true
			ack := &discovery.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
			if resp.GetTypeUrl() == edsType {
				ack.ResourceNames = []string{edsName}
			}
			_ = st.Send(ack)
			report(evResponse, "", false)
			switch resp.GetTypeUrl() {
			case cdsType:
				if !eds {
					eds = true
					_ = st.Send(&discovery.DiscoveryRequest{TypeUrl: edsType, ResourceNames: []string{edsName}})
				}
			case ldsType:
				configured()
				report(evConfigured, resp.GetVersionInfo(), len(resp.GetResources()) == 0)
			}
		}
	}
	st, err := ads.DeltaAggregatedResources(sctx)
	if err != nil {
		return false
	}
	subscribe := func(typ string, names []string, n *core.Node) {
		_ = st.Send(&discovery.DeltaDiscoveryRequest{Node: n, TypeUrl: typ, ResourceNamesSubscribe: names, InitialResourceVersions: known[typ]})
	}
	subscribe(cdsType, []string{"*"}, node)
	subscribe(ldsType, []string{"*"}, nil)
	eds := len(known[edsType]) > 0
	if eds {
		subscribe(edsType, []string{edsName}, nil)
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			return got
		}
		got = true
		typ := resp.GetTypeUrl()
		if known[typ] == nil {
			known[typ] = map[string]string{}
		}
		for _, r := range resp.GetResources() {
			known[typ][r.GetName()] = r.GetVersion()
		}
		for _, name := range resp.GetRemovedResources() {
			delete(known[typ], name)
		}
		_ = st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: typ, ResponseNonce: resp.GetNonce()})
		report(evResponse, "", false)
		switch typ {
		case cdsType:
			if !eds {
				eds = true
				subscribe(edsType, []string{edsName}, nil)
			}
		case ldsType:
			configured()
			report(evConfigured, resp.GetSystemVersionInfo(), len(known[ldsType]) == 0)
		}
	}
}

// controlPlaneTLS is the control plane's server TLS configuration on the
// SVID and bundle the swarm wrote to dir, and the trust domain they are of.
func controlPlaneTLS(t *testing.T, dir string) (*tls.Config, spiffeid.TrustDomain) {
	certPEM, _ := os.ReadFile(filepath.Join(dir, "cp.crt"))
	keyPEM, _ := os.ReadFile(filepath.Join(dir, "cp.key"))
	bundlePEM, _ := os.ReadFile(filepath.Join(dir, "bundle.crt"))
	svid, err := x509svid.Parse(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := x509bundle.Parse(spiffeid.RequireTrustDomainFromString("mesh.test"), bundlePEM)
	if err != nil {
		t.Fatal(err)
	}
	return identity.NewTLS(identitytest.NewSource(svid, bundle)).ServerConfig(identity.Modern(), func(spiffeid.ID) error { return nil }), bundle.TrustDomain()
}
