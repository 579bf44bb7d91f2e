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
	// (default 3).
	Rounds int
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
	// Topologies restricts the run to these names (direct, latch, haproxy,
	// nginx, stunnel); empty runs all that are installed.
	Topologies []string
	// LatchBinary is the latch executable; empty builds one from ModuleDir.
	LatchBinary string
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
	// perf) of every pair's sidecars under bulk ×8 load and under the
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

// AllTopologies lists every topology the harness knows, baseline first.
func AllTopologies(latchBinary string, latchArgs, latchEnv, latchCurves []string) []Topology {
	return []Topology{direct{}, &latchPair{binary: latchBinary, extraArgs: latchArgs, env: latchEnv, curves: latchCurves}, haproxy{}, nginx{}, stunnel{}}
}

// running is one started topology and what has been measured of it.
type running struct {
	topo Topology
	pair *Pair
	res  *TopologyResult
	dead bool // a sidecar exited: no further measurements

	bulkBytes map[int]uint64
	bulkTime  map[int]time.Duration
	bulkCPU   []float64 // per sidecar, seconds, over all bulk runs
	bulkTotal uint64
	latency   []time.Duration
	conn      connectRun
	connCPU   float64
}

// Run starts every available topology, measures them all interleaved, stops
// everything and returns the results. It removes its temporary directory and
// every process it started, also when ctx is cancelled.
func Run(ctx context.Context, opts Options) (*Result, error) {
	opts.defaults()
	res := &Result{Started: time.Now().UTC(), Host: hostInfo(), Options: opts.summary()}
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

	latchBin := opts.LatchBinary
	if latchBin == "" && wanted(opts.Topologies, "latch") {
		progress("building latch")
		if latchBin, err = BuildLatch(ctx, opts.ModuleDir, tmp, opts.ProfileDir != ""); err != nil {
			res.Skipped = append(res.Skipped, Skipped{Name: "latch", Reason: err.Error()})
			latchBin = ""
		}
	}

	var runs []*running
	defer func() {
		for _, r := range runs {
			r.pair.Stop()
		}
	}()
	for _, t := range AllTopologies(latchBin, opts.LatchArgs, opts.LatchEnv, opts.LatchCurves) {
		if !wanted(opts.Topologies, t.Name()) || skipped(res, t.Name()) {
			continue
		}
		if err := t.Check(); err != nil {
			res.Skipped = append(res.Skipped, Skipped{Name: t.Name(), Reason: err.Error()})
			progress("skipping %s: %v", t.Name(), err)
			continue
		}
		// A backend per topology: the last hop of every pair closes first and
		// leaves TIME_WAIT sockets towards the backend's port; separate ports
		// keep one topology's connection test from eating another's
		// ephemeral ports.
		backend, err := StartBackend()
		if err != nil {
			return nil, err
		}
		defer backend.Close()
		tenv := env
		tenv.Backend = backend.Addr()
		tenv.Dir = filepath.Join(tmp, t.Name())
		if err := os.MkdirAll(tenv.Dir, 0o700); err != nil {
			return nil, fmt.Errorf("creating %s: %w", tenv.Dir, err)
		}
		progress("starting %s", t.Name())
		pair, err := t.Start(ctx, &tenv)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			res.Skipped = append(res.Skipped, Skipped{Name: t.Name(), Reason: "failed to start: " + err.Error()})
			progress("skipping %s: %v", t.Name(), err)
			continue
		}
		r := &running{
			topo: t, pair: pair,
			res:       &TopologyResult{Name: t.Name(), Version: pair.Version, Notes: pair.Notes},
			bulkBytes: map[int]uint64{}, bulkTime: map[int]time.Duration{},
			bulkCPU: make([]float64, len(pair.Sidecars)),
		}
		runs = append(runs, r)
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
				if err := r.measureBulk(ctx, conns, opts.Duration, pool, progress, round); err != nil {
					return nil, err
				}
			}
		}
		for _, r := range order {
			if err := r.measureLatency(ctx, opts.MessageSize, opts.Duration, progress, round); err != nil {
				return nil, err
			}
		}
		for _, r := range order {
			if err := r.measureConnect(ctx, opts.ConnectWorkers, opts.Duration, progress, round); err != nil {
				return nil, err
			}
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
		r.finish(opts)
		if _, ok := r.topo.(*latchPair); ok {
			// Read after Stop would be complete, but the idle connections
			// just closed are enough to count; the load tests are long over.
			if resumed, total := latchResumption(r.pair); total > 0 {
				r.res.Resumption = &Resumption{Resumed: resumed, Connections: total}
			}
		}
		res.Topologies = append(res.Topologies, *r.res)
	}
	res.addLatencyOverDirect()
	res.Finished = time.Now().UTC()
	return res, nil
}

// fail records a failed measurement; a sidecar that died ends the
// topology's run.
func (r *running) fail(what string, err error) {
	msg := fmt.Sprintf("%s: %v", what, err)
	for _, s := range r.pair.Sidecars {
		if exited, werr := s.Exited(); exited {
			r.dead = true
			msg += fmt.Sprintf(" (sidecar %s exited: %v; log:\n%s)", s.Name, werr, s.LogTail())
		}
	}
	r.res.Errors = append(r.res.Errors, msg)
}

func (r *running) skip(ctx context.Context) bool { return r.dead || ctx.Err() != nil }

func (r *running) measureBulk(ctx context.Context, conns int, d time.Duration, pool *framePool, progress func(string, ...any), round int) error {
	if r.skip(ctx) {
		return ctx.Err()
	}
	before, err := r.pair.Usage()
	if err != nil {
		r.fail("bulk", err)
		return nil
	}
	b, err := runBulk(ctx, r.pair.Entry, conns, d, pool)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.fail(fmt.Sprintf("bulk ×%d", conns), err)
		return nil
	}
	after, err := r.pair.Usage()
	if err != nil {
		r.fail("bulk", err)
		return nil
	}
	for i := range after {
		r.bulkCPU[i] += after[i].CPUSeconds - before[i].CPUSeconds
	}
	r.bulkTotal += b.Bytes
	r.bulkBytes[conns] += b.Bytes
	r.bulkTime[conns] += b.Elapsed
	r.res.bulkRound(conns, b.MBps())
	progress("round %d  bulk ×%d  %-8s %8.1f MB/s", round+1, conns, r.topo.Name(), b.MBps())
	return nil
}

func (r *running) measureLatency(ctx context.Context, size int, d time.Duration, progress func(string, ...any), round int) error {
	if r.skip(ctx) {
		return ctx.Err()
	}
	s, err := runLatency(ctx, r.pair.Entry, size, d)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.fail("latency", err)
		return nil
	}
	r.latency = append(r.latency, s...)
	progress("round %d  latency  %-8s p50 %6.1f µs  p99 %6.1f µs  (%d samples)", round+1, r.topo.Name(),
		micros(percentile(s, 0.50)), micros(percentile(s, 0.99)), len(s))
	return nil
}

func (r *running) measureConnect(ctx context.Context, workers int, d time.Duration, progress func(string, ...any), round int) error {
	if r.skip(ctx) {
		return ctx.Err()
	}
	before, err := r.pair.Usage()
	if err != nil {
		r.fail("connect", err)
		return nil
	}
	c, err := runConnect(ctx, r.pair.Entry, workers, d)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.fail("new connections", err)
		return nil
	}
	after, err := r.pair.Usage()
	if err != nil {
		r.fail("connect", err)
		return nil
	}
	for i := range after {
		r.connCPU += after[i].CPUSeconds - before[i].CPUSeconds
	}
	r.conn.Count += c.Count
	r.conn.Elapsed += c.Elapsed
	r.conn.TTFB = append(r.conn.TTFB, c.TTFB...)
	rate := float64(c.Count) / c.Elapsed.Seconds()
	r.res.connectRound(rate)
	progress("round %d  connect  %-8s %8.0f conn/s  ttfb p50 %.2f ms", round+1, r.topo.Name(), rate, millis(percentile(c.TTFB, 0.5)))
	return nil
}

// measureIdleConns holds n proxied connections open and reads each
// sidecar's RSS before and with them.
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
	conns, err := openIdle(ctx, r.pair.Entry, n, 8)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.fail("idle connections", err)
		return nil
	}
	defer closeAll(conns)
	// Let lazily started work (buffers, timers, goroutines) settle before
	// reading RSS; the connections are idle from here on.
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
	for i := range with {
		m := &r.res.Memory[i]
		m.Conns = n
		m.BeforeKB = before[i].RSSKB
		m.BeforeAnonKB = before[i].AnonKB
		m.BeforePSSKB = before[i].PSSKB
		m.WithConnsKB = with[i].RSSKB
		m.PerConnKB = float64(with[i].RSSKB-before[i].RSSKB) / float64(n)
		progress("idle     %-8s %-3s RSS %6.1f MB idle (anon %.1f, PSS %.1f), %6.1f MB after load (anon %.1f, PSS %.1f), %6.1f MB with %d connections, %5.1f KB/connection",
			r.topo.Name(), m.Sidecar, mb(m.IdleKB), mb(m.IdleAnonKB), mb(m.IdlePSSKB), mb(m.BeforeKB), mb(m.BeforeAnonKB), mb(m.BeforePSSKB), mb(m.WithConnsKB), n, m.PerConnKB)
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

// finish turns the accumulated samples into figures.
func (r *running) finish(opts Options) {
	for _, conns := range opts.BulkConns {
		b := r.res.bulk(conns)
		b.Bytes = r.bulkBytes[conns]
		if t := r.bulkTime[conns]; t > 0 {
			b.MBps = float64(b.Bytes) / 1e6 / t.Seconds()
		}
	}
	if len(r.pair.Sidecars) > 0 && r.bulkTotal > 0 {
		var pair float64
		r.res.CPUPerGBBySidecar = map[string]float64{}
		for i, s := range r.pair.Sidecars {
			v := r.bulkCPU[i] / (float64(r.bulkTotal) / 1e9)
			r.res.CPUPerGBBySidecar[s.Name] = v
			pair += v
		}
		r.res.CPUSecondsPerGB = &pair
	}
	if len(r.latency) > 0 {
		r.res.Latency = &LatencyResult{
			Samples: len(r.latency),
			P50us:   micros(percentile(r.latency, 0.50)),
			P90us:   micros(percentile(r.latency, 0.90)),
			P99us:   micros(percentile(r.latency, 0.99)),
			P999us:  micros(percentile(r.latency, 0.999)),
		}
	}
	if r.conn.Count > 0 {
		c := &ConnectResult{
			Count:     r.conn.Count,
			PerSecond: float64(r.conn.Count) / r.conn.Elapsed.Seconds(),
			TTFBP50ms: millis(percentile(r.conn.TTFB, 0.50)),
			TTFBP99ms: millis(percentile(r.conn.TTFB, 0.99)),
		}
		if len(r.pair.Sidecars) > 0 {
			v := r.connCPU / float64(r.conn.Count) * 1e3
			c.PairCPUmsPerConn = &v
		}
		c.RoundsPerSecond = r.res.connectRounds
		r.res.Connect = c
	}
}

// rotate returns runs starting at index round (mod len): each round a
// different topology goes first.
func rotate(runs []*running, round int) []*running {
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

// profileAll records a profile of each pair under bulk and under
// new-connection load. Profiling is extra: its failures are notes, not
// errors of the run.
func profileAll(ctx context.Context, runs []*running, opts Options, pool *framePool, progress func(string, ...any)) error {
	if err := perfAvailable(); err != nil {
		progress("not profiling: %v", err)
		return nil
	}
	if err := os.MkdirAll(opts.ProfileDir, 0o755); err != nil {
		return fmt.Errorf("creating profile directory: %w", err)
	}
	bulkConns := opts.BulkConns[len(opts.BulkConns)-1]
	for _, r := range runs {
		if len(r.pair.Sidecars) == 0 || r.skip(ctx) {
			continue
		}
		for _, load := range []struct {
			label string
			run   func() error
		}{
			{fmt.Sprintf("bulk%d", bulkConns), func() error {
				_, err := runBulk(ctx, r.pair.Entry, bulkConns, opts.Duration, pool)
				return err
			}},
			{"connect", func() error {
				_, err := runConnect(ctx, r.pair.Entry, opts.ConnectWorkers, opts.Duration)
				return err
			}},
		} {
			report, err := profileLoad(ctx, r.pair, opts.ProfileDir, r.topo.Name(), load.label, load.run)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				r.res.Errors = append(r.res.Errors, fmt.Sprintf("profile %s: %v", load.label, err))
				continue
			}
			if r.res.Profiles == nil {
				r.res.Profiles = map[string]string{}
			}
			r.res.Profiles[load.label] = report
			progress("profile  %-8s %-8s %s", r.topo.Name(), load.label, report)
			for _, line := range topSymbols(report, 5) {
				progress("             %s", line)
			}
		}
	}
	return nil
}
