package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"latch.dev/latch/identity/devca"
)

// Options configures a run. The zero value of a field means its default.
type Options struct {
	// Duration is how long each measurement runs, per topology and round
	// (default 3s).
	Duration time.Duration
	// Rounds repeats every measurement over all topologies, rotating their
	// order each round, so slow drift of the machine hits all alike
	// (default 3). Figures are the median of the rounds.
	Rounds int
	// Rest is the pause after each measurement (default 2s): the pair's CPU
	// time is read at its end, so work a proxy defers until the load is
	// over (collection, freeing memory, closing connections) is charged to
	// it and does not run during the next topology's measurement.
	Rest time.Duration
	// BulkConns are the parallel connection counts of the bulk test
	// (default 1 and 8).
	BulkConns []int
	// MessageSize is the echo message of the latency test (default 1 KiB).
	MessageSize int
	// ConnectWorkers is the number of concurrent clients of the
	// new-connection test (default 4).
	ConnectWorkers int
	// IdleConns is how many idle proxied connections the memory test holds
	// open (default 2,000).
	IdleConns int
	// Topologies restricts the run to these names (direct, go-mtls, latch,
	// ghostunnel, haproxy, nginx, stunnel); empty runs all that are
	// available.
	Topologies []string
	// NoResumed skips the second new-connection comparison, with session
	// resumption on (and the second pair of each proxy it needs).
	NoResumed bool
	// NoCounts skips the pass that counts system calls and context switches
	// per round trip and per connection with perf stat (it runs when perf
	// is installed).
	NoCounts bool
	// LatchBinary is the latch executable; empty builds one from ModuleDir.
	LatchBinary string
	// GhostunnelBinary is the ghostunnel executable; empty looks for
	// ghostunnel on PATH (see ghostunnel).
	GhostunnelBinary string
	// GhostunnelEnv is added to the ghostunnel sidecars' environment, as
	// LatchEnv is to latch's (GOMAXPROCS=1 for both, say).
	GhostunnelEnv []string
	// ModuleDir is the repository root, for building latch (default: the
	// module the working directory is in).
	ModuleDir string
	// LatchArgs are appended to each `latch proxy` command; "{side}" is
	// replaced by "out" or "in".
	LatchArgs []string
	// LatchEnv is added to the latch sidecars' environment.
	LatchEnv []string
	// LatchCurves narrows latch's key exchange groups (tls.curves); empty
	// keeps the modern profile's (X25519MLKEM768, X25519, P-256).
	LatchCurves []string
	// ProfileDir, when set, makes the harness record a CPU profile (Linux
	// perf) of every pair's sidecars under bulk ×8, request/response and
	// new-connection load after the rounds, and write the reports there.
	ProfileDir string
	// KeepDir keeps the temporary directory (configs, logs) for inspection.
	KeepDir bool
	// Progress receives one line per measurement; nil discards them.
	Progress io.Writer
}

func (o *Options) defaults() {
	if o.Duration <= 0 {
		o.Duration = 3 * time.Second
	}
	if o.Rounds <= 0 {
		o.Rounds = 3
	}
	if o.Rest <= 0 {
		o.Rest = 2 * time.Second
	}
	if len(o.BulkConns) == 0 {
		o.BulkConns = []int{1, 8}
	}
	if o.MessageSize <= 0 {
		o.MessageSize = 1024
	}
	if o.ConnectWorkers <= 0 {
		o.ConnectWorkers = 4
	}
	if o.IdleConns <= 0 {
		o.IdleConns = 2000
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
}

// AllTopologies lists every topology the harness knows, baselines first.
func AllTopologies(opts Options) []Topology {
	return []Topology{
		direct{}, goMTLS{},
		&latchPair{binary: opts.LatchBinary, extraArgs: opts.LatchArgs, env: opts.LatchEnv, curves: opts.LatchCurves},
		ghostunnel{binary: opts.GhostunnelBinary, env: opts.GhostunnelEnv},
		haproxy{}, nginx{}, stunnel{},
	}
}

// isBaseline says whether a topology is one of the two baselines (no proxy
// processes) rather than a proxy pair.
func isBaseline(name string) bool { return name == "direct" || name == "go-mtls" }

// running is one started pair and what has been measured of it.
type running struct {
	topo Topology
	pair *Pair
	res  *TopologyResult
	dead bool // a sidecar exited: no further measurements
	// resumed marks the second pair of a topology, started with session
	// resumption on and measured for new connections only; its figures go
	// to res.ConnectResumed of the first.
	resumed bool

	bulk    map[int][]bulkRound
	latency []latencyRound
	connect []connectRound
	samples []time.Duration // every round's latency samples
	ttfb    []time.Duration // every round's time to first byte
}

type bulkRound struct {
	mbps     float64
	bytes    uint64
	cpuPerGB *float64 // pair CPU seconds per 10^9 bytes; nil for baselines
	// harnessCPUPerGB: the harness's own CPU seconds (client and backend)
	// per 10^9 bytes.
	harnessCPUPerGB *float64
}

type latencyRound struct {
	roundTrips           int
	p50, p90, p99, p999  float64 // µs
	cpuPerRT, ctxswPerRT *float64
}

type connectRound struct {
	count      int
	rate       float64
	ttfb50     float64 // ms
	ttfb99     float64
	cpuPerConn *float64 // ms
}

// Run starts every available topology, measures them all interleaved, stops
// everything and returns the results. It removes its temporary directory and
// every process it started, also when ctx is cancelled.
func Run(ctx context.Context, opts Options) (*Result, error) {
	opts.defaults()
	res := &Result{Started: time.Now().UTC(), Host: hostInfo(), Options: opts.summary(), LoadBefore: loadAverage()}
	progress := func(format string, args ...any) { fmt.Fprintf(opts.Progress, format+"\n", args...) }

	limit, err := raiseFileLimit()
	if err != nil {
		return nil, err
	}
	res.FileLimit = limit
	if need := uint64(2*opts.IdleConns + 200); limit < need {
		return nil, fmt.Errorf("RLIMIT_NOFILE is %d, the idle-connection test needs about %d: raise the hard limit (ulimit -Hn) or lower the connection count", limit, need)
	}

	for _, line := range cleanStale(os.TempDir()) {
		progress("%s", line)
	}
	tmp, err := os.MkdirTemp("", "latch-bench-")
	if err != nil {
		return nil, fmt.Errorf("creating temporary directory: %w", err)
	}
	if err := writeOwner(tmp); err != nil {
		os.RemoveAll(tmp)
		return nil, fmt.Errorf("recording the run: %w", err)
	}
	if opts.KeepDir {
		progress("keeping %s", tmp)
		// Kept on purpose: without the owner file the next run does not
		// take it for the leftovers of a killed one.
		defer os.Remove(filepath.Join(tmp, ownerFile))
	} else {
		defer os.RemoveAll(tmp)
	}

	// Identities: a devca for the whole run. SVIDs live long enough that no
	// rotation happens mid-measurement; the peers' files come from the same
	// CA.
	ca, err := devca.New(trustDomain, devca.Options{
		SVIDTTL:   4 * time.Hour,
		SocketDir: filepath.Join(tmp, "wl"),
		Logger:    slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return nil, fmt.Errorf("starting the development CA: %w", err)
	}
	defer ca.Close()
	env := Env{Workloads: map[string]string{}, MaxConns: opts.IdleConns + 100, started: func(p *Process) {
		if err := recordGroup(tmp, p.PID()); err != nil {
			progress("%v", err)
		}
	}}
	for _, id := range []string{clientID, serverID} {
		addr, err := ca.AddWorkload(id)
		if err != nil {
			return nil, fmt.Errorf("registering %s: %w", id, err)
		}
		env.Workloads[id] = addr
	}
	if env.PKI, err = devcaPKI(ca, filepath.Join(tmp, "pki")); err != nil {
		return nil, err
	}
	if env.NamedPKI, err = newNamedPKI(filepath.Join(tmp, "pki-named")); err != nil {
		return nil, err
	}

	if opts.LatchBinary == "" && wanted(opts.Topologies, "latch") {
		progress("building latch")
		if opts.LatchBinary, err = BuildLatch(ctx, opts.ModuleDir, tmp, opts.ProfileDir != ""); err != nil {
			res.Skipped = append(res.Skipped, Skipped{Name: "latch", Reason: err.Error()})
			opts.LatchBinary = ""
		}
	}

	var runs, resumed []*running
	defer func() {
		for _, r := range append(runs, resumed...) {
			r.pair.Stop()
		}
	}()
	start := func(t Topology, resumption bool) (*running, error) {
		// A backend per pair: the last hop of every pair closes first and
		// leaves TIME_WAIT sockets towards the backend's port; separate
		// ports keep one pair's connection test from eating another's
		// ephemeral ports.
		backend, err := StartBackend()
		if err != nil {
			return nil, err
		}
		tenv := env
		tenv.Backend = backend.Addr()
		tenv.Resumption = resumption
		tenv.Dir = filepath.Join(tmp, t.Name())
		label := t.Name()
		if resumption {
			tenv.Dir += "-resumed"
			label += " (resumption on)"
		}
		if err := os.MkdirAll(tenv.Dir, 0o700); err != nil {
			backend.Close()
			return nil, fmt.Errorf("creating %s: %w", tenv.Dir, err)
		}
		progress("starting %s", label)
		pair, err := t.Start(ctx, &tenv)
		if err != nil {
			backend.Close()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, err
		}
		pair.closers = append(pair.closers, func() { backend.Close() })
		return &running{topo: t, pair: pair, resumed: resumption, bulk: map[int][]bulkRound{}}, nil
	}
	for _, t := range AllTopologies(opts) {
		if !wanted(opts.Topologies, t.Name()) || skipped(res, t.Name()) {
			continue
		}
		if err := t.Check(); err != nil {
			res.Skipped = append(res.Skipped, Skipped{Name: t.Name(), Reason: err.Error()})
			progress("skipping %s: %v", t.Name(), err)
			continue
		}
		r, err := start(t, false)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			res.Skipped = append(res.Skipped, Skipped{Name: t.Name(), Reason: "failed to start: " + err.Error()})
			progress("skipping %s: %v", t.Name(), err)
			continue
		}
		r.res = &TopologyResult{Name: t.Name(), Version: r.pair.Version, Notes: r.pair.Notes}
		runs = append(runs, r)
		if opts.NoResumed || !canResume(t) {
			continue
		}
		v, err := start(t, true)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			r.res.Errors = append(r.res.Errors, "the pair with session resumption on failed to start: "+err.Error())
			continue
		}
		v.res = r.res
		resumed = append(resumed, v)
	}
	if len(runs) == 0 {
		return nil, fmt.Errorf("no topology could start: %v", res.Skipped)
	}

	// Idle memory: after start-up and the one readiness connection, before any
	// load, once the runtimes have settled.
	if err := waitCtx(ctx, settle); err != nil {
		return nil, err
	}
	for _, r := range runs {
		us, err := r.pair.Usage()
		if err != nil {
			r.fail("idle memory", err)
			continue
		}
		for i, u := range us {
			r.res.Memory = append(r.res.Memory, SidecarMemory{Sidecar: r.pair.Sidecars[i].Name, IdleKB: u.RSSKB, IdleAnonKB: u.AnonKB, IdlePSSKB: u.PSSKB})
		}
	}

	pool := newFramePool(1)
	for round := range opts.Rounds {
		order := rotate(runs, round)
		for _, conns := range opts.BulkConns {
			for _, r := range order {
				if err := r.measureBulk(ctx, opts, conns, pool, progress, round); err != nil {
					return nil, err
				}
			}
		}
		for _, r := range order {
			if err := r.measureLatency(ctx, opts, progress, round); err != nil {
				return nil, err
			}
		}
		for _, r := range order {
			if err := r.measureConnect(ctx, opts, progress, round); err != nil {
				return nil, err
			}
		}
		for _, r := range rotate(resumed, round) {
			if err := r.measureConnect(ctx, opts, progress, round); err != nil {
				return nil, err
			}
		}
	}
	if !opts.NoCounts {
		if err := countAll(ctx, runs, opts, progress); err != nil {
			return nil, err
		}
	}
	if opts.ProfileDir != "" {
		if err := profileAll(ctx, runs, opts, pool, progress); err != nil {
			return nil, err
		}
	}
	for _, r := range runs {
		if err := r.measureIdleConns(ctx, opts.IdleConns, progress); err != nil {
			return nil, err
		}
	}

	for _, r := range runs {
		r.finish()
	}
	for _, r := range resumed {
		r.finish()
	}
	for _, r := range runs {
		if _, ok := r.topo.(*latchPair); ok {
			// Read before Stop: the idle connections just closed are
			// enough to count; the load tests are long over.
			rs := &Resumption{}
			rs.FullResumed, rs.FullConnections = latchResumption(r.pair)
			for _, v := range resumed {
				if v.res == r.res {
					rs.Resumed, rs.Connections = latchResumption(v.pair)
				}
			}
			r.res.Resumption = rs
		}
		res.Topologies = append(res.Topologies, *r.res)
	}
	res.addLatencyOverDirect()
	res.Finished = time.Now().UTC()
	res.LoadAfter = loadAverage()
	return res, nil
}

// label names the pair in progress lines.
func (r *running) label() string {
	if r.resumed {
		return r.topo.Name() + "+resume"
	}
	return r.topo.Name()
}

// fail records a failed measurement; a sidecar that died ends the
// topology's run.
func (r *running) fail(what string, err error) {
	msg := fmt.Sprintf("%s: %v", what, err)
	if r.resumed {
		msg = "with session resumption on: " + msg
	}
	for _, s := range r.pair.Sidecars {
		if exited, werr := s.Exited(); exited {
			r.dead = true
			msg += fmt.Sprintf(" (sidecar %s exited: %v; log:\n%s)", s.Name, werr, s.LogTail())
		}
	}
	r.res.Errors = append(r.res.Errors, msg)
}

func (r *running) skip(ctx context.Context) bool { return r.dead || ctx.Err() != nil }

// spent is what a pair's sidecars used during one measurement: CPU seconds
// and context switches, summed over both.
type spent struct {
	cpu   float64
	ctxsw int64
	// harness is the CPU time of this process over the same span: the load
	// client and the backend (for go-mtls, both TLS ends), which no pair's
	// figure includes.
	harness float64
}

// measure runs load between two readings of the sidecars' usage, the
// second after opts.Rest, so the pair is charged for everything the load
// made it do. For a baseline (no sidecars) it just runs load and rests.
func (r *running) measure(ctx context.Context, opts Options, load func() error) (spent, error) {
	before, err := r.pair.Usage()
	if err != nil {
		return spent{}, err
	}
	harness0 := ownCPU()
	if err := load(); err != nil {
		return spent{}, err
	}
	if err := waitCtx(ctx, opts.Rest); err != nil {
		return spent{}, err
	}
	after, err := r.pair.Usage()
	if err != nil {
		return spent{}, err
	}
	s := spent{harness: ownCPU() - harness0}
	for i := range after {
		s.cpu += after[i].CPUSeconds - before[i].CPUSeconds
		s.ctxsw += after[i].ContextSwitches - before[i].ContextSwitches
	}
	return s, nil
}

// loadFailed sorts out a failed measurement: a cancelled run ends, anything
// else is recorded against the topology and the run goes on.
func (r *running) loadFailed(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	r.fail(what, err)
	return nil
}

func (r *running) measureBulk(ctx context.Context, opts Options, conns int, pool *framePool, progress func(string, ...any), round int) error {
	if r.skip(ctx) {
		return ctx.Err()
	}
	var b BulkResult
	s, err := r.measure(ctx, opts, func() (err error) {
		b, err = runBulk(ctx, r.pair.Dial(), conns, opts.Duration, pool)
		return err
	})
	if err != nil {
		return r.loadFailed(ctx, fmt.Sprintf("bulk ×%d", conns), err)
	}
	br := bulkRound{mbps: b.MBps(), bytes: b.Bytes}
	line := fmt.Sprintf("round %d  bulk ×%d  %-10s %8.1f MB/s", round+1, conns, r.label(), br.mbps)
	if b.Bytes > 0 {
		v := s.harness / (float64(b.Bytes) / 1e9)
		br.harnessCPUPerGB = &v
		line += fmt.Sprintf("  client+backend CPU %.2f s/GB", v)
	}
	if len(r.pair.Sidecars) > 0 && b.Bytes > 0 {
		v := s.cpu / (float64(b.Bytes) / 1e9)
		br.cpuPerGB = &v
		line += fmt.Sprintf("  pair CPU %.2f s/GB", v)
	}
	r.bulk[conns] = append(r.bulk[conns], br)
	progress("%s", line)
	return nil
}

func (r *running) measureLatency(ctx context.Context, opts Options, progress func(string, ...any), round int) error {
	if r.skip(ctx) {
		return ctx.Err()
	}
	var samples []time.Duration
	s, err := r.measure(ctx, opts, func() (err error) {
		samples, err = runLatency(ctx, r.pair.Dial(), opts.MessageSize, opts.Duration)
		return err
	})
	if err != nil {
		return r.loadFailed(ctx, "latency", err)
	}
	lr := latencyRound{
		roundTrips: len(samples) + 1, // and the warm-up
		p50:        micros(percentile(samples, 0.50)),
		p90:        micros(percentile(samples, 0.90)),
		p99:        micros(percentile(samples, 0.99)),
		p999:       micros(percentile(samples, 0.999)),
	}
	line := fmt.Sprintf("round %d  latency  %-10s p50 %6.1f µs  p99 %6.1f µs  (%d round trips)", round+1, r.label(), lr.p50, lr.p99, lr.roundTrips)
	if len(r.pair.Sidecars) > 0 {
		cpu := s.cpu / float64(lr.roundTrips) * 1e6
		cs := float64(s.ctxsw) / float64(lr.roundTrips)
		lr.cpuPerRT, lr.ctxswPerRT = &cpu, &cs
		line += fmt.Sprintf("  pair CPU %.1f µs and %.1f context switches per round trip", cpu, cs)
	}
	r.latency = append(r.latency, lr)
	r.samples = append(r.samples, samples...)
	progress("%s", line)
	return nil
}

func (r *running) measureConnect(ctx context.Context, opts Options, progress func(string, ...any), round int) error {
	if r.skip(ctx) {
		return ctx.Err()
	}
	var c connectRun
	s, err := r.measure(ctx, opts, func() (err error) {
		c, err = runConnect(ctx, r.pair.Dial(), opts.ConnectWorkers, opts.Duration)
		return err
	})
	if err != nil {
		return r.loadFailed(ctx, "new connections", err)
	}
	cr := connectRound{
		count:  c.Count,
		rate:   float64(c.Count) / c.Elapsed.Seconds(),
		ttfb50: millis(percentile(c.TTFB, 0.5)),
		ttfb99: millis(percentile(c.TTFB, 0.99)),
	}
	line := fmt.Sprintf("round %d  connect  %-10s %8.0f conn/s  first byte p50 %.2f ms", round+1, r.label(), cr.rate, cr.ttfb50)
	if len(r.pair.Sidecars) > 0 && c.Count > 0 {
		v := s.cpu / float64(c.Count) * 1e3
		cr.cpuPerConn = &v
		line += fmt.Sprintf("  pair CPU %.2f ms/conn", v)
	}
	r.connect = append(r.connect, cr)
	r.ttfb = append(r.ttfb, c.TTFB...)
	progress("%s", line)
	return nil
}

// measureIdleConns holds n proxied connections open and reads each
// sidecar's memory before them, right after they are open, and once they
// have rested.
func (r *running) measureIdleConns(ctx context.Context, n int, progress func(string, ...any)) error {
	if len(r.pair.Sidecars) == 0 || r.skip(ctx) {
		return ctx.Err()
	}
	// The load rounds just ended: let the sidecar settle, so that "before"
	// is its resting size and not what the load left behind.
	if err := waitCtx(ctx, settle); err != nil {
		return err
	}
	before, err := r.pair.Usage()
	if err != nil {
		r.fail("idle connections", err)
		return nil
	}
	conns, err := openIdle(ctx, r.pair.Dial(), n, 8)
	if err != nil {
		return r.loadFailed(ctx, "idle connections", err)
	}
	defer closeAll(conns)
	// Right after the last one opened: what a burst of connections costs
	// before the sidecar has had time to give anything back.
	fresh, err := r.pair.Usage()
	if err != nil {
		r.fail("idle connections", err)
		return nil
	}
	// Then, with the connections idle, let lazily started work (buffers,
	// timers, goroutines) settle and memory be returned.
	if err := waitCtx(ctx, settle); err != nil {
		return err
	}
	with, err := r.pair.Usage()
	if err != nil {
		r.fail("idle connections", err)
		return nil
	}
	if len(r.res.Memory) != len(with) {
		r.fail("idle connections", errors.New("no idle figures to compare with"))
		return nil
	}
	per := func(a, b int64) float64 { return float64(a-b) / float64(n) }
	for i := range with {
		m := &r.res.Memory[i]
		m.Conns = n
		m.BeforeKB, m.BeforeAnonKB, m.BeforePSSKB = before[i].RSSKB, before[i].AnonKB, before[i].PSSKB
		m.WithConnsKB, m.WithConnsAnonKB, m.WithConnsPSSKB = with[i].RSSKB, with[i].AnonKB, with[i].PSSKB
		m.PerConnKB = per(with[i].RSSKB, before[i].RSSKB)
		m.PerConnAnonKB = per(with[i].AnonKB, before[i].AnonKB)
		m.PerConnPSSKB = per(with[i].PSSKB, before[i].PSSKB)
		m.PerConnFreshKB = per(fresh[i].RSSKB, before[i].RSSKB)
		m.BeforeThreads, m.WithConnsThreads = before[i].Threads, with[i].Threads
		progress("idle     %-10s %-3s RSS %6.1f MB idle (anon %.1f, PSS %.1f), %6.1f MB after load (anon %.1f, PSS %.1f), %6.1f MB with %d connections; per connection %5.1f KB RSS (%.1f right after opening), %.1f anon, %.1f PSS; threads %d → %d",
			r.topo.Name(), m.Sidecar, mb(m.IdleKB), mb(m.IdleAnonKB), mb(m.IdlePSSKB), mb(m.BeforeKB), mb(m.BeforeAnonKB), mb(m.BeforePSSKB), mb(m.WithConnsKB), n,
			m.PerConnKB, m.PerConnFreshKB, m.PerConnAnonKB, m.PerConnPSSKB, m.BeforeThreads, m.WithConnsThreads)
	}
	return nil
}

// mb converts KiB to MiB for the progress lines.
func mb(kb int64) float64 { return float64(kb) / 1024 }

// settle is how long a pair rests before its memory is read: long enough for
// whatever a process does once a burst is over (latch returns its free heap
// within two seconds; the C proxies' allocators do nothing on a timer), short
// against the minutes a real idle connection lasts.
const settle = 3 * time.Second

// finish turns the rounds into figures: each the median of its rounds.
func (r *running) finish() {
	if r.resumed {
		r.res.ConnectResumed = r.connectResult()
		return
	}
	for conns, rounds := range r.bulk {
		b := r.res.bulk(conns)
		var mbps, cpu, harness []float64
		for _, br := range rounds {
			mbps = append(mbps, br.mbps)
			b.Bytes += br.bytes
			if br.cpuPerGB != nil {
				cpu = append(cpu, *br.cpuPerGB)
			}
			if br.harnessCPUPerGB != nil {
				harness = append(harness, *br.harnessCPUPerGB)
			}
		}
		if len(harness) > 0 {
			b.RoundsHarnessCPUSecondsPerGB = harness
			v := median(harness)
			b.HarnessCPUSecondsPerGB = &v
		}
		b.RoundsMBps, b.MBps = mbps, median(mbps)
		if len(cpu) > 0 {
			b.RoundsCPUSecondsPerGB = cpu
			v := median(cpu)
			b.CPUSecondsPerGB = &v
		}
	}
	slices.SortFunc(r.res.Bulk, func(a, b *BulkFigures) int { return a.Conns - b.Conns })
	if len(r.latency) > 0 {
		l := &LatencyResult{}
		var p50, p90, p99, p999, cpu, cs []float64
		for _, lr := range r.latency {
			l.RoundTrips += lr.roundTrips
			p50, p90, p99, p999 = append(p50, lr.p50), append(p90, lr.p90), append(p99, lr.p99), append(p999, lr.p999)
			if lr.cpuPerRT != nil {
				cpu, cs = append(cpu, *lr.cpuPerRT), append(cs, *lr.ctxswPerRT)
			}
		}
		l.P50us, l.P90us, l.P99us, l.P999us = median(p50), median(p90), median(p99), median(p999)
		l.RoundsP50us, l.RoundsP99us = p50, p99
		if len(cpu) > 0 {
			c, s := median(cpu), median(cs)
			l.CPUusPerRoundTrip, l.ContextSwitchesPerRoundTrip = &c, &s
			l.RoundsCPUusPerRoundTrip = cpu
		}
		l.PooledP50us, l.PooledP99us = micros(percentile(r.samples, 0.5)), micros(percentile(r.samples, 0.99))
		r.res.Latency = l
	}
	r.res.Connect = r.connectResult()
}

func (r *running) connectResult() *ConnectResult {
	if len(r.connect) == 0 {
		return nil
	}
	c := &ConnectResult{}
	var rate, t50, t99, cpu []float64
	for _, cr := range r.connect {
		c.Count += cr.count
		rate, t50, t99 = append(rate, cr.rate), append(t50, cr.ttfb50), append(t99, cr.ttfb99)
		if cr.cpuPerConn != nil {
			cpu = append(cpu, *cr.cpuPerConn)
		}
	}
	c.PerSecond, c.RoundsPerSecond = median(rate), rate
	c.TTFBP50ms, c.TTFBP99ms = median(t50), median(t99)
	if len(cpu) > 0 {
		v := median(cpu)
		c.PairCPUmsPerConn, c.RoundsPairCPUmsPerConn = &v, cpu
	}
	return c
}

// median of xs (the mean of the middle two for an even count); xs is not
// changed.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// rotate returns runs starting at index round (mod len): each round a
// different topology goes first.
func rotate(runs []*running, round int) []*running {
	if len(runs) == 0 {
		return nil
	}
	k := round % len(runs)
	return append(slices.Clone(runs[k:]), runs[:k]...)
}

func wanted(names []string, name string) bool {
	return len(names) == 0 || slices.Contains(names, name)
}

func skipped(res *Result, name string) bool {
	return slices.ContainsFunc(res.Skipped, func(s Skipped) bool { return s.Name == name })
}

// devcaPKI writes the trust bundle and a fresh SVID for each side, issued by
// the run's devca, as PEM files for the peers.
func devcaPKI(ca *devca.CA, dir string) (*PKI, error) {
	files := func(id string) (svidFiles, error) {
		s, err := ca.Issue(id)
		if err != nil {
			return svidFiles{}, fmt.Errorf("issuing %s: %w", id, err)
		}
		return svidFiles{chain: s.Certificates, key: s.PrivateKey}, nil
	}
	server, err := files(serverID)
	if err != nil {
		return nil, err
	}
	client, err := files(clientID)
	if err != nil {
		return nil, err
	}
	return writePKI(dir, ca.Bundle().X509Authorities(), server, client)
}

// hostInfo describes the machine for the record.
func hostInfo() Host {
	h := Host{GOOS: runtime.GOOS, GOARCH: runtime.GOARCH, CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				h.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	return h
}

// loadAverage is the first three fields of /proc/loadavg ("0.52 0.61
// 0.70"), empty where there is none: what else the machine was running.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
