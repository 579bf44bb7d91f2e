package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Profiling uses Linux perf rather than each proxy's own profiler, so one
// tool reads Go and C proxies alike and nothing in the proxies needs a flag.
// perf samples the sidecars' whole process trees (nginx's workers too) while
// the harness drives one load pattern; the report lists where the CPU time
// went, by shared object and symbol. A Go binary built with -s has no symbol
// table, so with profiling on the harness builds latch without -s -w
// (same code, symbols kept).
//
// The same attachment counts (perf stat) the system calls, context switches
// and CPU time of the sidecars per round trip and per connection: figures
// that need no quiet machine to compare, since they do not depend on how
// long anything waited for a CPU.

// perfAvailable reports why perf cannot be used, or nil.
func perfAvailable() error {
	if _, err := exec.LookPath("perf"); err != nil {
		return errors.New("perf is not installed (Debian: linux-perf)")
	}
	return nil
}

// pairPIDs lists the processes of every sidecar of p, comma-separated, as
// perf's -p wants them.
func pairPIDs(p *Pair) (string, error) {
	var pids []string
	for _, s := range p.Sidecars {
		tree, err := processTree(s.PID())
		if err != nil {
			return "", err
		}
		for _, pid := range tree {
			pids = append(pids, strconv.Itoa(pid))
		}
	}
	return strings.Join(pids, ","), nil
}

// perfDuring runs `perf <args> -p <pair's processes>` around load. perf
// takes a while to attach to every thread, longer on a busy machine; it
// starts with events disabled (-D -1) and the harness enables them over a
// control pipe and waits for perf's ack, so what perf sees is exactly the
// load. logPath receives perf's own output.
func perfDuring(p *Pair, args []string, logPath string, load func() error) error {
	pids, err := pairPIDs(p)
	if err != nil {
		return err
	}
	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating perf control pipe: %w", err)
	}
	defer ctlW.Close()
	ackR, ackW, err := os.Pipe()
	if err != nil {
		ctlR.Close()
		return fmt.Errorf("creating perf ack pipe: %w", err)
	}
	defer ackR.Close()
	argv := append(append([]string{}, args...), "-D", "-1", "--control", "fd:3,4", "-p", pids)
	cmd := exec.Command("perf", argv...)
	cmd.ExtraFiles = []*os.File{ctlR, ackW} // fds 3 and 4 in perf
	log, err := os.Create(logPath)
	if err != nil {
		ctlR.Close()
		ackW.Close()
		return fmt.Errorf("creating perf log: %w", err)
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = childAttr()
	err = cmd.Start()
	ctlR.Close()
	ackW.Close()
	if err != nil {
		return fmt.Errorf("starting perf %s: %w", args[0], err)
	}
	stop := func() { _ = cmd.Process.Signal(syscall.SIGINT); _ = cmd.Wait() }
	if _, err := ctlW.Write([]byte("enable\n")); err != nil {
		stop()
		return fmt.Errorf("enabling perf events: %w", err)
	}
	ack := make([]byte, 8)
	ackR.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := ackR.Read(ack); err != nil {
		stop()
		return fmt.Errorf("waiting for perf to attach: %w", err)
	}
	loadErr := load()
	// perf ends by the SIGINT it is sent, so its exit status says nothing;
	// the caller checks what it wrote.
	stop()
	return loadErr
}

// profileLoad records a CPU profile of the pair's sidecars while load runs,
// and writes perf's text report to dir/<name>-<label>.txt. It returns the
// report's path.
func profileLoad(ctx context.Context, p *Pair, dir, name, label string, load func() error) (string, error) {
	data := filepath.Join(dir, name+"-"+label+".perf.data")
	if err := perfDuring(p, []string{"record", "-F", "999", "-g", "-o", data}, data+".log", load); err != nil {
		return "", err
	}
	if st, err := os.Stat(data); err != nil || st.Size() == 0 {
		b, _ := os.ReadFile(data + ".log")
		return "", fmt.Errorf("perf record wrote no profile: %s", strings.TrimSpace(string(b)))
	}
	report := filepath.Join(dir, name+"-"+label+".txt")
	// Two views: by shared object (kernel, libcrypto, the Go binary: where
	// the time goes broadly), then by symbol.
	var out []byte
	for _, sort := range []string{"dso", "dso,symbol"} {
		b, err := exec.CommandContext(ctx, "perf", "report", "-i", data, "--stdio", "--no-children",
			"--sort", sort, "--percent-limit", "0.5", "-g", "none").Output()
		if err != nil {
			return "", fmt.Errorf("perf report: %w", err)
		}
		out = append(out, tidyReport(b)...)
	}
	if err := os.WriteFile(report, out, 0o644); err != nil {
		return "", fmt.Errorf("writing profile report: %w", err)
	}
	os.Remove(data + ".old")
	return report, nil
}

// perfCounts is what perf stat counted over one load, summed over a pair's
// sidecars.
type perfCounts struct {
	syscalls, contextSwitches float64
	taskClockMs               float64 // CPU time, ms
}

// countEvents are the events of the count pass: every system call entry, and
// the software events for context switches and CPU time (no hardware
// counter, which virtual machines often lack).
const countEvents = "raw_syscalls:sys_enter,context-switches,task-clock"

// countLoad runs load under perf stat attached to the pair's sidecars.
func countLoad(p *Pair, dir, label string, load func() error) (perfCounts, error) {
	out := filepath.Join(dir, label+".perfstat")
	if err := perfDuring(p, []string{"stat", "-x", ",", "-e", countEvents, "-o", out}, out+".log", load); err != nil {
		return perfCounts{}, err
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return perfCounts{}, fmt.Errorf("reading perf stat output: %w", err)
	}
	return parsePerfStat(b)
}

// parsePerfStat reads perf stat's CSV output (-x ,): value, unit, event,
// then run time and share; comment lines start with #.
func parsePerfStat(b []byte) (perfCounts, error) {
	var c perfCounts
	seen := 0
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Split(line, ",")
		if len(f) < 3 || strings.HasPrefix(line, "#") {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return perfCounts{}, fmt.Errorf("perf stat counted nothing for %s (%q)", f[2], f[0])
		}
		switch {
		case f[2] == "raw_syscalls:sys_enter":
			c.syscalls = v
		case f[2] == "context-switches" || f[2] == "cs":
			c.contextSwitches = v
		case strings.HasPrefix(f[2], "task-clock"):
			c.taskClockMs = v
		default:
			continue
		}
		seen++
	}
	if seen != 3 {
		return perfCounts{}, fmt.Errorf("perf stat output has %d of the 3 counts: %q", seen, b)
	}
	return c, nil
}

// countAll runs one request/response and one new-connection load per pair
// under perf stat and records the counts per round trip and per connection.
// Counting is extra: its failures are notes, not errors of the run.
func countAll(ctx context.Context, runs []*running, opts Options, progress func(string, ...any)) error {
	if err := perfAvailable(); err != nil {
		progress("not counting system calls: %v", err)
		return nil
	}
	dir, err := os.MkdirTemp("", "latch-bench-count-")
	if err != nil {
		return fmt.Errorf("creating a directory for perf stat: %w", err)
	}
	defer os.RemoveAll(dir)
	for _, r := range runs {
		if len(r.pair.Sidecars) == 0 || r.skip(ctx) {
			continue
		}
		var n int
		lat, err := countLoad(r.pair, dir, r.topo.Name()+"-latency", func() error {
			s, err := runLatency(ctx, r.pair.Dial(), opts.MessageSize, opts.Duration)
			n = len(s) + 1
			return err
		})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			r.res.Errors = append(r.res.Errors, fmt.Sprintf("counting (request/response): %v", err))
			continue
		}
		if err := waitCtx(ctx, opts.Rest); err != nil {
			return err
		}
		var conns int
		con, err := countLoad(r.pair, dir, r.topo.Name()+"-connect", func() error {
			c, err := runConnect(ctx, r.pair.Dial(), opts.ConnectWorkers, opts.Duration)
			conns = c.Count
			return err
		})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			r.res.Errors = append(r.res.Errors, fmt.Sprintf("counting (new connections): %v", err))
			continue
		}
		if err := waitCtx(ctx, opts.Rest); err != nil {
			return err
		}
		if n == 0 || conns == 0 {
			continue
		}
		c := &Counts{
			RoundTrips:                  n,
			SyscallsPerRoundTrip:        lat.syscalls / float64(n),
			ContextSwitchesPerRoundTrip: lat.contextSwitches / float64(n),
			CPUusPerRoundTrip:           lat.taskClockMs * 1e3 / float64(n),
			Connections:                 conns,
			SyscallsPerConn:             con.syscalls / float64(conns),
			ContextSwitchesPerConn:      con.contextSwitches / float64(conns),
			CPUmsPerConn:                con.taskClockMs / float64(conns),
		}
		r.res.Counts = c
		progress("count    %-10s per round trip: %.1f syscalls, %.1f context switches, %.1f µs CPU; per connection: %.0f syscalls, %.1f context switches, %.2f ms CPU",
			r.topo.Name(), c.SyscallsPerRoundTrip, c.ContextSwitchesPerRoundTrip, c.CPUusPerRoundTrip, c.SyscallsPerConn, c.ContextSwitchesPerConn, c.CPUmsPerConn)
	}
	return nil
}

// profileAll records a profile of each pair under bulk, request/response
// and new-connection load. Profiling is extra: its failures are notes, not
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
				_, err := runBulk(ctx, r.pair.Dial(), bulkConns, opts.Duration, pool)
				return err
			}},
			{"latency", func() error {
				_, err := runLatency(ctx, r.pair.Dial(), opts.MessageSize, opts.Duration)
				return err
			}},
			{"connect", func() error {
				_, err := runConnect(ctx, r.pair.Dial(), opts.ConnectWorkers, opts.Duration)
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
			progress("profile  %-10s %-8s %s", r.topo.Name(), load.label, report)
			for _, line := range topSymbols(report, 5) {
				progress("             %s", line)
			}
			if err := waitCtx(ctx, opts.Rest); err != nil {
				return err
			}
		}
	}
	return nil
}

// topSymbols returns the first n sample lines of a perf text report, for
// the progress output.
func topSymbols(report string, n int) []string {
	b, err := os.ReadFile(report)
	if err != nil {
		return nil
	}
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		t := strings.TrimSpace(line)
		if t == "" || strings.HasPrefix(t, "#") || !strings.Contains(t, "%") {
			continue
		}
		out = append(out, t)
		if len(out) == n {
			break
		}
	}
	return out
}

// tidyReport drops the empty columns perf pads every line with.
func tidyReport(b []byte) []byte {
	var out []byte
	for line := range strings.SplitSeq(string(b), "\n") {
		line = strings.TrimRight(line, " ")
		for strings.HasSuffix(line, " -") {
			line = strings.TrimRight(strings.TrimSuffix(line, " -"), " ")
		}
		out = append(out, line...)
		out = append(out, '\n')
	}
	return out
}
