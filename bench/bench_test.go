package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
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

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    procStat
		wantErr bool
	}{
		{"plain", "42 (nginx) S 7 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 1 0 100 1000 200",
			procStat{ppid: 7, pgrp: 42, utime: 250, stime: 30}, false},
		{"name with spaces and parens", "9 (a b) (c)) R 1 9 9 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0",
			procStat{ppid: 1, pgrp: 9, utime: 11, stime: 22}, false},
		{"truncated", "9 (x) R 1 2 3", procStat{}, true},
		{"no name", "9 x R 1", procStat{}, true},
		{"not a number", "9 (x) R one 9 9 0 -1 0 0 0 0 0 11 22 0", procStat{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStat([]byte(tt.in))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("parseStat = %+v, %v; want %+v, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestParseSmapsRollup(t *testing.T) {
	const rollup = `55c94070b000-7ffe34471000 ---p 00000000 00:00 0                          [rollup]
Rss:                8192 kB
Pss:                3100 kB
Pss_Dirty:           116 kB
Pss_Anon:           2000 kB
Pss_File:           1100 kB
Shared_Clean:       1580 kB
Anonymous:          2000 kB
AnonHugePages:         0 kB
SwapPss:               0 kB
`
	tests := []struct {
		name    string
		in      string
		want    memory
		wantErr bool
	}{
		{"present", rollup, memory{rss: 8192, anon: 2000, pss: 3100}, false},
		{"zombie has none", "", memory{}, false},
		{"unit missing", "Rss:\t8192\n", memory{}, true},
		{"other unit", "Pss:\t8 MB\n", memory{}, true},
		{"not a number", "Anonymous:\tlots kB\n", memory{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSmapsRollup([]byte(tt.in))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("parseSmapsRollup = %+v, %v; want %+v, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// TestReadMemory reads this process's own figures: they must be what the
// kernel reports, not zeros from a misread file.
func TestReadMemory(t *testing.T) {
	m, err := readMemory(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if m.anon <= 0 || m.pss <= 0 || m.rss < m.anon || m.rss < m.pss {
		t.Fatalf("own memory %+v: want 0 < anon <= rss and 0 < pss <= rss", m)
	}
}

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 1000; i++ {
		s = append(s, time.Duration(1001-i)) // reversed: percentile must sort
	}
	for p, want := range map[float64]time.Duration{0.5: 500, 0.9: 900, 0.99: 990, 0.999: 999, 1: 1000} {
		if got := percentile(s, p); got != want {
			t.Errorf("percentile(%v) = %v, want %v", p, got, want)
		}
	}
	if got := percentile(nil, 0.5); got != 0 {
		t.Errorf("percentile of nothing = %v", got)
	}
}

// TestDirect runs every load pattern against the backend directly: the
// harness's own client and backend agree on the protocol.
func TestDirect(t *testing.T) {
	ctx := t.Context()
	b := startBackend(t)
	pair, err := direct{}.Start(ctx, &Env{Backend: b.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	pool := newFramePool(1)
	for _, conns := range []int{1, 3} {
		r, err := runBulk(ctx, pair.Dial(), conns, 50*time.Millisecond, pool)
		if err != nil {
			t.Fatalf("bulk ×%d: %v", conns, err)
		}
		if r.Bytes < uint64(conns*frameSize) || r.MBps() <= 0 {
			t.Errorf("bulk ×%d: %d bytes at %.1f MB/s", conns, r.Bytes, r.MBps())
		}
	}
	lat, err := runLatency(ctx, pair.Dial(), 1024, 50*time.Millisecond)
	if err != nil || len(lat) == 0 {
		t.Fatalf("latency: %d samples, %v", len(lat), err)
	}
	c, err := runConnect(ctx, pair.Dial(), 2, 50*time.Millisecond)
	if err != nil || c.Count == 0 || len(c.TTFB) != c.Count {
		t.Fatalf("connect: %d connections, %d TTFB samples, %v", c.Count, len(c.TTFB), err)
	}
	conns, err := openIdle(ctx, pair.Dial(), 20, 4)
	if err != nil || len(conns) != 20 {
		t.Fatalf("idle: %d connections, %v", len(conns), err)
	}
	closeAll(conns)
}

// TestBulkDetectsCorruption puts a proxy that flips one byte between the
// client and the backend: the checksum must catch it.
func TestBulkDetectsCorruption(t *testing.T) {
	b := startBackend(t)
	addr := corruptingProxy(t, b.Addr(), 100_000)
	_, err := runBulk(t.Context(), plainDial(addr), 1, 50*time.Millisecond, newFramePool(2))
	if err == nil || !strings.Contains(err.Error(), "CRC-32C") {
		t.Fatalf("bulk through a corrupting proxy: %v, want a checksum mismatch", err)
	}
}

// TestPeers starts every installed peer as a pair with certificates from a
// devca and pushes bytes through it. Peers that are not installed are
// skipped: CI need not have them.
func TestPeers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts proxy processes")
	}
	ctx := t.Context()
	b := startBackend(t)
	dir := t.TempDir()
	ca, err := devca.New(trustDomain, devca.Options{SocketDir: filepath.Join(dir, "wl"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	pki, err := devcaPKI(ca, filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	named, err := newNamedPKI(filepath.Join(dir, "named"))
	if err != nil {
		t.Fatal(err)
	}
	workloads := map[string]string{}
	for _, id := range []string{clientID, serverID} {
		if workloads[id], err = ca.AddWorkload(id); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("go-mtls", func(t *testing.T) {
		// The baseline has no sidecar: only that it carries bytes.
		pair, err := goMTLS{}.Start(ctx, &Env{PKI: pki})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pair.Stop)
		if _, err := runBulk(ctx, pair.Dial(), 2, 100*time.Millisecond, newFramePool(3)); err != nil {
			t.Fatalf("bulk: %v", err)
		}
	})
	for _, topo := range []Topology{ghostunnel{}, haproxy{}, nginx{}, stunnel{}} {
		t.Run(topo.Name(), func(t *testing.T) {
			if err := topo.Check(); err != nil {
				t.Skip(err)
			}
			env := &Env{Dir: t.TempDir(), Backend: b.Addr(), PKI: pki, NamedPKI: named, Workloads: workloads}
			pair, err := topo.Start(ctx, env)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pair.Stop)
			if len(pair.Sidecars) != 2 || pair.Version == "" || pair.Version == "unknown" {
				t.Errorf("pair has %d sidecars, version %q", len(pair.Sidecars), pair.Version)
			}
			// CPU time counts in 10 ms ticks: on a loaded machine 100 ms
			// of bulk can leave a sidecar below one tick, so push bulk
			// until every sidecar has been charged some, up to a deadline.
			pool := newFramePool(3)
			for deadline := time.Now().Add(10 * time.Second); ; {
				if _, err := runBulk(ctx, pair.Dial(), 2, 100*time.Millisecond, pool); err != nil {
					t.Fatalf("bulk: %v", err)
				}
				us, err := pair.Usage()
				if err != nil {
					t.Fatal(err)
				}
				charged := true
				for _, u := range us {
					charged = charged && u.RSSKB > 0 && u.PSSKB > 0 && u.CPUSeconds > 0
				}
				if charged {
					break
				}
				if time.Now().After(deadline) {
					for i, u := range us {
						t.Errorf("sidecar %s: usage %+v after 10 s of bulk transfers", pair.Sidecars[i].Name, u)
					}
					break
				}
			}
			pair.Stop()
			for _, s := range pair.Sidecars {
				if exited, _ := s.Exited(); !exited {
					t.Errorf("sidecar %s still running after Stop", s.Name)
				}
				if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(s.PID()))); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("sidecar %s: /proc entry still there after Stop (%v)", s.Name, err)
				}
			}
		})
	}
}

// TestPeersVerify checks that every installed peer pair really verifies
// both ways: the pair that carries bytes with certificates of one CA must
// refuse a client, or a server, whose certificate comes from another CA.
// Otherwise the comparison would pit latch against proxies doing less work.
func TestPeersVerify(t *testing.T) {
	if testing.Short() {
		t.Skip("starts proxy processes")
	}
	b := startBackend(t)
	dir := t.TempDir()
	good, err := newNamedPKI(filepath.Join(dir, "good"))
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := newNamedPKI(filepath.Join(dir, "stranger"))
	if err != nil {
		t.Fatal(err)
	}
	// Each side trusts the good CA, so only the check of the stranger's
	// certificate can refuse.
	strangeClient, strangeServer := *good, *good
	strangeClient.Client = stranger.Client
	strangeServer.Server = stranger.Server
	for _, topo := range []Topology{goMTLS{}, haproxy{}, nginx{}, stunnel{}} {
		for _, tt := range []struct {
			name   string
			pki    *PKI
			wantOK bool
		}{
			{"same CA", good, true},
			{"client from another CA", &strangeClient, false},
			{"server from another CA", &strangeServer, false},
		} {
			t.Run(topo.Name()+"/"+tt.name, func(t *testing.T) {
				if err := topo.Check(); err != nil {
					t.Skip(err)
				}
				t.Parallel()
				// A refusal shows as echoes failing for the whole wait.
				timeout := 20 * time.Second
				if !tt.wantOK {
					timeout = 1500 * time.Millisecond
				}
				ctx, cancel := context.WithTimeout(t.Context(), timeout)
				defer cancel()
				env := &Env{Dir: t.TempDir(), Backend: b.Addr(), PKI: tt.pki, NamedPKI: tt.pki, MaxConns: 100}
				pair, err := topo.Start(ctx, env)
				if pair != nil {
					t.Cleanup(pair.Stop)
				}
				if (err == nil) != tt.wantOK {
					t.Fatalf("bytes through the pair: error %v, want success %v", err, tt.wantOK)
				}
			})
		}
	}
}

// TestGhostunnelVerify checks that the ghostunnel pair does the work latch
// does: it carries bytes with identities from the run's Workload API, and
// refuses a client ID the server side does not admit, a server ID the
// client side does not expect, and a client whose SVID and bundle come from
// another CA.
func TestGhostunnelVerify(t *testing.T) {
	if testing.Short() {
		t.Skip("starts proxy processes")
	}
	if err := (ghostunnel{}).Check(); err != nil {
		t.Skip(err)
	}
	b := startBackend(t)
	newCA := func(t *testing.T) *devca.CA {
		ca, err := devca.New(trustDomain, devca.Options{SocketDir: filepath.Join(t.TempDir(), "wl"), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ca.Close() })
		return ca
	}
	socket := func(t *testing.T, ca *devca.CA, id string) string {
		addr, err := ca.AddWorkload(id)
		if err != nil {
			t.Fatal(err)
		}
		return addr
	}
	for _, tt := range []struct {
		name       string
		topo       ghostunnel
		strangerCA bool
		wantOK     bool
	}{
		{"same CA, right IDs", ghostunnel{}, false, true},
		{"client ID not admitted", ghostunnel{allowID: "spiffe://bench.test/someone-else"}, false, false},
		{"server ID not the expected one", ghostunnel{verifyID: "spiffe://bench.test/someone-else"}, false, false},
		{"client from another CA", ghostunnel{}, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ca := newCA(t)
			clientCA := ca
			if tt.strangerCA {
				clientCA = newCA(t)
			}
			timeout := 20 * time.Second
			if !tt.wantOK {
				timeout = 1500 * time.Millisecond
			}
			ctx, cancel := context.WithTimeout(t.Context(), timeout)
			defer cancel()
			env := &Env{Dir: t.TempDir(), Backend: b.Addr(), Workloads: map[string]string{
				clientID: socket(t, clientCA, clientID),
				serverID: socket(t, ca, serverID),
			}}
			pair, err := tt.topo.Start(ctx, env)
			if pair != nil {
				t.Cleanup(pair.Stop)
			}
			if (err == nil) != tt.wantOK {
				t.Fatalf("bytes through the pair: error %v, want success %v", err, tt.wantOK)
			}
		})
	}
}

// TestPeersResumption checks what each peer's client side does with
// session resumption, told off (the full-handshake comparison) and on (the
// second one): the inbound proxy is replaced by a Go TLS server that issues
// tickets and records which handshakes resumed.
func TestPeersResumption(t *testing.T) {
	if testing.Short() {
		t.Skip("starts proxy processes")
	}
	dir := t.TempDir()
	ca, err := devca.New(trustDomain, devca.Options{SocketDir: filepath.Join(dir, "wl"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	pki, err := devcaPKI(ca, filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	named, err := newNamedPKI(filepath.Join(dir, "named"))
	if err != nil {
		t.Fatal(err)
	}
	workloads := map[string]string{}
	for _, id := range []string{clientID, serverID} {
		if workloads[id], err = ca.AddWorkload(id); err != nil {
			t.Fatal(err)
		}
	}
	for _, topo := range []Topology{ghostunnel{}, haproxy{}, nginx{}, stunnel{}} {
		for _, resumption := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/resumption=%v", topo.Name(), resumption), func(t *testing.T) {
				if err := topo.Check(); err != nil {
					t.Skip(err)
				}
				b := startBackend(t)
				env := &Env{Dir: t.TempDir(), Backend: b.Addr(), PKI: pki, NamedPKI: named, Workloads: workloads, Resumption: resumption}
				pair, err := topo.Start(t.Context(), env)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(pair.Stop)
				serverPKI := pki
				if topo.Name() == "nginx" {
					serverPKI = named
				}
				server, _, err := goMTLSConfigs(serverPKI)
				if err != nil {
					t.Fatal(err)
				}
				var mu sync.Mutex
				var resumed []bool
				verify := server.VerifyConnection
				server.VerifyConnection = func(cs tls.ConnectionState) error {
					mu.Lock()
					resumed = append(resumed, cs.DidResume)
					mu.Unlock()
					return verify(cs)
				}
				pair.Sidecars[1].Stop(5 * time.Second)
				in, err := newBackend(pair.In, server)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { in.Close() })
				for i := range 4 {
					if _, err := connectOnce(t.Context(), pair.Dial()); err != nil {
						t.Fatalf("connection %d: %v", i+1, err)
					}
				}
				mu.Lock()
				defer mu.Unlock()
				n := 0
				for _, r := range resumed {
					if r {
						n++
					}
				}
				want := resumption && canResume(topo)
				if (n > 0) != want || len(resumed) < 4 {
					t.Fatalf("handshakes that resumed: %v; want some resumed: %v", resumed, want)
				}
			})
		}
	}
}

func TestParsePerfStat(t *testing.T) {
	const out = `# started on Mon Dec  7 17:35:38 2026

12345,,raw_syscalls:sys_enter,2003456789,100.00,,
678,,context-switches,2003456789,100.00,0.338,K/sec
2003.46,msec,task-clock,2003456789,100.00,0.999,CPUs utilized
`
	c, err := parsePerfStat([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if c != (perfCounts{syscalls: 12345, contextSwitches: 678, taskClockMs: 2003.46}) {
		t.Fatalf("parsePerfStat = %+v", c)
	}
	for _, bad := range []string{
		"<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n678,,context-switches,1,100.00,,\n1.0,msec,task-clock,1,100.00,,\n",
		"12345,,raw_syscalls:sys_enter,1,100.00,,\n",
		"",
	} {
		if c, err := parsePerfStat([]byte(bad)); err == nil {
			t.Errorf("parsePerfStat(%q) = %+v, want an error", bad, c)
		}
	}
}

func TestParseContextSwitches(t *testing.T) {
	status := "Name:\tlatch\nThreads:\t5\nvoluntary_ctxt_switches:\t150\nnonvoluntary_ctxt_switches:\t7\n"
	if got := parseContextSwitches([]byte(status)); got != 157 {
		t.Fatalf("parseContextSwitches = %d, want 157", got)
	}
	// This process has switched at least once by now, and as a Go
	// program it runs more than one thread.
	n, threads := contextSwitches(os.Getpid())
	if n <= 0 {
		t.Fatalf("own context switches = %d", n)
	}
	if threads < 2 {
		t.Fatalf("own threads = %d, want at least 2", threads)
	}
}

func TestMedian(t *testing.T) {
	for _, tt := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		in := slices.Clone(tt.in)
		if got := median(tt.in); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.in, got, tt.want)
		}
		if !slices.Equal(in, tt.in) {
			t.Errorf("median changed its input to %v", tt.in)
		}
	}
}

func startBackend(t *testing.T) *Backend {
	t.Helper()
	b, err := StartBackend()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// corruptingProxy forwards to target, flipping the byte at offset of the
// client-to-target stream.
func corruptingProxy(t *testing.T, target string, offset int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			wg.Go(func() {
				defer u.Close()
				io.Copy(c, u)
				c.Close()
			})
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 32<<10)
				seen := 0
				for {
					n, err := c.Read(buf)
					if seen <= offset && offset < seen+n {
						buf[offset-seen] ^= 0xff
					}
					seen += n
					if _, werr := u.Write(buf[:n]); werr != nil || err != nil {
						u.Close()
						return
					}
				}
			})
		}
	})
	return ln.Addr().String()
}

// TestLatchConfig renders both sidecars' configs and loads them with the
// proxy's own parser: the harness writes what `latch proxy --config` reads.
func TestLatchConfig(t *testing.T) {
	dir := t.TempDir()
	ports := pairPorts{Dir: dir, Out: "127.0.0.1:15001", In: "127.0.0.1:15002", Backend: "127.0.0.1:8080"}
	for _, side := range []string{"out", "in", "out-resume"} {
		path := filepath.Join(dir, side+".yaml")
		resume := side == "out-resume"
		side, _, _ = strings.Cut(side, "-")
		if err := render(path, latchTmpl, latchConfig{Side: side, ServerID: serverID, ClientID: clientID, Curves: []string{"X25519"}, Resume: resume, P: ports}); err != nil {
			t.Fatal(err)
		}
		cfg, err := proxy.LoadFile(path)
		if err != nil {
			t.Fatalf("%s side: %v", side, err)
		}
		if !slices.Equal(cfg.TLS.Curves, []tls.CurveID{tls.X25519}) {
			t.Errorf("%s side: curves %v, want the X25519 the harness asked for", side, cfg.TLS.Curves)
		}
		switch side {
		case "out":
			if len(cfg.Outbound) != 1 || len(cfg.Inbound) != 0 {
				t.Fatalf("out side: %d outbound, %d inbound listeners", len(cfg.Outbound), len(cfg.Inbound))
			}
			o := cfg.Outbound[0]
			if o.Listen != ports.Out || len(o.Upstreams) != 1 || o.Upstreams[0] != ports.In || o.ServerID.String() != serverID {
				t.Errorf("out side: %+v", o)
			}
			if o.DisableSessionResumption == resume {
				t.Errorf("out side asked to resume %v: DisableSessionResumption %v", resume, o.DisableSessionResumption)
			}
		case "in":
			if len(cfg.Inbound) != 1 || len(cfg.Outbound) != 0 {
				t.Fatalf("in side: %d inbound, %d outbound listeners", len(cfg.Inbound), len(cfg.Outbound))
			}
			in := cfg.Inbound[0]
			if in.Listen != ports.In || in.App != ports.Backend {
				t.Errorf("in side: %+v", in)
			}
			// Exactly the client may connect: the pair authorizes by ID.
			for id, want := range map[string]bool{clientID: true, serverID: false, "spiffe://bench.test/other": false} {
				if got := in.Allow.Allows(spiffeid.RequireFromString(id)); got != want {
					t.Errorf("in side allows %s = %v, want %v", id, got, want)
				}
			}
		}
	}
}

// TestCleanStale plays a harness killed with SIGKILL: its run directory
// stays, with an orphan in a recorded process group whose leader is gone.
// The next run kills the orphan and removes the directory, and leaves a
// live run's directory alone.
func TestCleanStale(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("needs bash for exec -a")
	}
	tmp := t.TempDir()
	stale := filepath.Join(tmp, "latch-bench-1")
	live := filepath.Join(tmp, "latch-bench-2")
	for _, d := range []string{stale, live} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := writeOwner(live); err != nil { // this test binary: alive
		t.Fatal(err)
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stale, ownerFile), []byte(strconv.Itoa(dead.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	// The group leader starts an orphan naming the run directory, prints
	// its pid and exits.
	leader := exec.Command(bash, "-c", `(exec -a "`+stale+`/orphan" sleep 300 </dev/null >/dev/null 2>&1) & echo $!`)
	leader.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := leader.Output()
	if err != nil {
		t.Fatal(err)
	}
	orphan, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(orphan, syscall.SIGKILL) })
	// "echo $!" runs as soon as the subshell is forked, before it has
	// exec'd sleep; in the middle of an exec the kernel shows an empty
	// command line, which cleanStale rightly does not take for ours. Wait
	// for the orphan to be what a killed run leaves: sleep, named for dir.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(orphan), "cmdline"))
		if strings.HasPrefix(string(b), stale+"/orphan\x00") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("orphan %d never became %s/orphan: cmdline %q", orphan, stale, b)
		}
	}
	if err := recordGroup(stale, leader.Process.Pid); err != nil {
		t.Fatal(err)
	}

	if done := cleanStale(tmp); len(done) != 1 || !strings.Contains(done[0], "1 orphaned") {
		b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(orphan), "stat"))
		c, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(orphan), "cmdline"))
		l, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(leader.Process.Pid), "stat"))
		t.Fatalf("cleanStale = %q, want the stale run removed with 1 orphan killed (leader %d stat %q; orphan stat %q, cmdline %q)",
			done, leader.Process.Pid, l, b, c)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale run directory still there: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("live run directory touched: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(orphan), "stat"))
		if err != nil {
			break // gone
		}
		if st := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(st) > 0 && st[0] == "Z" {
			break // killed, waiting to be reaped by whoever adopted it
		}
		if time.Now().After(deadline) {
			t.Fatalf("orphan %d still running", orphan)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The harness's own CPU time grows with work done in it: what the bulk
// table charges to the client and the backend. Computing for up to 5 s of
// wall time (the machine may be busy) must show 20 ms of it.
func TestOwnCPU(t *testing.T) {
	before := ownCPU()
	x := uint64(1)
	for start := time.Now(); ownCPU()-before < 0.02; {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("ownCPU grew by %.3f s over 5 s of computation (x=%d)", ownCPU()-before, x)
		}
		for range 100000 {
			x = x*6364136223846793005 + 1442695040888963407
		}
	}
}
