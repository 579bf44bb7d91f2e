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

// perfAvailable reports why perf cannot be used, or nil.
func perfAvailable() error {
	if _, err := exec.LookPath("perf"); err != nil {
		return errors.New("perf is not installed (Debian: linux-perf)")
	}
	return nil
}

// profileLoad records a CPU profile of the pair's sidecars while load runs,
// and writes perf's text report to dir/<name>-<label>.txt. It returns the
// report's path.
func profileLoad(ctx context.Context, p *Pair, dir, name, label string, load func() error) (string, error) {
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
	data := filepath.Join(dir, name+"-"+label+".perf.data")
	// perf takes a while to attach to every thread, longer on a busy
	// machine; it starts with events disabled (-D -1) and the harness
	// enables them over a control pipe and waits for perf's ack, so the
	// profile covers exactly the load.
	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		return "", fmt.Errorf("creating perf control pipe: %w", err)
	}
	defer ctlW.Close()
	ackR, ackW, err := os.Pipe()
	if err != nil {
		ctlR.Close()
		return "", fmt.Errorf("creating perf ack pipe: %w", err)
	}
	defer ackR.Close()
	rec := exec.Command("perf", "record", "-F", "999", "-g", "-D", "-1", "--control", "fd:3,4",
		"-o", data, "-p", strings.Join(pids, ","))
	rec.ExtraFiles = []*os.File{ctlR, ackW} // fds 3 and 4 in perf
	recLog, err := os.Create(data + ".log")
	if err != nil {
		ctlR.Close()
		ackW.Close()
		return "", fmt.Errorf("creating perf log: %w", err)
	}
	defer recLog.Close()
	rec.Stdout, rec.Stderr = recLog, recLog
	rec.SysProcAttr = childAttr()
	err = rec.Start()
	ctlR.Close()
	ackW.Close()
	if err != nil {
		return "", fmt.Errorf("starting perf record: %w", err)
	}
	stop := func() { _ = rec.Process.Signal(syscall.SIGINT); _ = rec.Wait() }
	if _, err := ctlW.Write([]byte("enable\n")); err != nil {
		stop()
		return "", fmt.Errorf("enabling perf events: %w", err)
	}
	ack := make([]byte, 8)
	ackR.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := ackR.Read(ack); err != nil {
		stop()
		return "", fmt.Errorf("waiting for perf to attach: %w", err)
	}
	loadErr := load()
	_ = rec.Process.Signal(syscall.SIGINT)
	recErr := rec.Wait()
	if loadErr != nil {
		return "", loadErr
	}
	// perf record ends by the SIGINT it was sent, so its exit status says
	// nothing; whether it wrote samples does.
	if st, err := os.Stat(data); err != nil || st.Size() == 0 {
		b, _ := os.ReadFile(data + ".log")
		return "", fmt.Errorf("perf record wrote no profile (%v): %s", recErr, strings.TrimSpace(string(b)))
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
