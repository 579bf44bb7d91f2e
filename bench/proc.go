package bench

import (
	"bytes"
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

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It is
// 100 on every Linux architecture Go supports (the kernel fixes it for the
// user ABI; CONFIG_HZ does not change it), and Go has no sysconf to ask.
const clockTicks = 100

// Process is one proxy child process (a sidecar). Its resource figures cover
// the process and all its descendants, so nginx's master and workers count as
// one sidecar, as they would in a container.
type Process struct {
	Name string // "out" or "in" for a pair
	cmd  *exec.Cmd
	log  string // file holding the process's stdout and stderr
	done chan struct{}
	err  error // valid after done is closed
}

// startProcess runs argv with its output in logPath. The child gets its own
// process group, so Stop can reach every process it forks, and a parent-death
// signal, so a harness killed with SIGKILL does not leave sidecars behind.
func startProcess(name, logPath string, argv []string, env []string) (*Process, error) {
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating log for %s: %w", name, err)
	}
	defer out.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s (%s): %w", name, argv[0], err)
	}
	p := &Process{Name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID returns the process id of the process that was started.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has exited, with its error.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// LogTail returns the last few lines the process wrote, for error messages.
func (p *Process) LogTail() string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return strings.Join(lines, "\n")
}

// Stop sends SIGTERM to the process group, waits up to grace, then SIGKILLs
// the group. It is safe to call more than once.
func (p *Process) Stop(grace time.Duration) {
	pgid := p.cmd.Process.Pid
	if exited, _ := p.Exited(); !exited {
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
		}
	}
	// Children of a process that exited (nginx workers) may linger in the
	// group; kill whatever is left.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
}

// Usage is what a sidecar consumed, summed over its process tree.
//
// Memory comes in three figures, because RSS alone says little about what a
// sidecar costs a node. RSS counts every page mapped, including the
// executable's pages, which sit in the page cache once for every process of
// the node that runs the same binary (and stay there whether mapped or not).
// The anonymous part (heap, stacks) is what this process alone holds. PSS
// charges each shared page to its sharers in equal parts, so summing PSS over
// a node's sidecars counts the shared binary once.
//
// CPUSeconds counts every thread that ever ran (the kernel adds an exited
// thread's time to its process); ContextSwitches only the threads alive
// now, which for a proxy serving one long connection is all that did the
// work.
type Usage struct {
	RSSKB      int64   // resident set size, KiB
	AnonKB     int64   // the anonymous part of RSSKB (heap, stacks)
	PSSKB      int64   // proportional set size: shared pages divided among their sharers
	CPUSeconds float64 // user + system time since start
	// ContextSwitches is voluntary plus involuntary context switches of
	// every live thread: each voluntary one is a thread that went to sleep
	// and had to be woken again.
	ContextSwitches int64
	// Threads is how many threads the processes have (OS threads: what a
	// Go runtime, a thread pool or a thread per connection costs).
	Threads int
}

// Usage reads the current memory and CPU time of the process and its
// descendants.
func (p *Process) Usage() (Usage, error) {
	pids, err := processTree(p.PID())
	if err != nil {
		return Usage{}, err
	}
	var u Usage
	for _, pid := range pids {
		mem, err := readMemory(pid)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // exited between listing and reading
			}
			return Usage{}, err
		}
		cpu, err := readCPU(pid)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return Usage{}, err
		}
		u.RSSKB += mem.rss
		u.AnonKB += mem.anon
		u.PSSKB += mem.pss
		u.CPUSeconds += cpu
		cs, threads := contextSwitches(pid)
		u.ContextSwitches += cs
		u.Threads += threads
	}
	return u, nil
}

// contextSwitches sums the context switches of pid's live threads, from
// /proc/PID/task/TID/status, and counts the threads.
func contextSwitches(pid int) (n int64, threads int) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "task")
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0
	}
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "status"))
		if err != nil {
			continue // exited meanwhile
		}
		n += parseContextSwitches(b)
		threads++
	}
	return n, threads
}

// parseContextSwitches reads voluntary_ctxt_switches and
// nonvoluntary_ctxt_switches from a status file.
func parseContextSwitches(b []byte) int64 {
	var n int64
	for line := range strings.SplitSeq(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || (name != "voluntary_ctxt_switches" && name != "nonvoluntary_ctxt_switches") {
			continue
		}
		if v, err := strconv.ParseInt(strings.TrimSpace(rest), 10, 64); err == nil {
			n += v
		}
	}
	return n
}

// processTree returns root and every live descendant of it.
func processTree(root int) ([]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("listing /proc: %w", err)
	}
	children := map[int][]int{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue
		}
		children[st.ppid] = append(children[st.ppid], pid)
	}
	tree := []int{root}
	for i := 0; i < len(tree); i++ {
		tree = append(tree, children[tree[i]]...)
	}
	return tree, nil
}

type procStat struct {
	ppid, pgrp   int
	utime, stime int64
}

// readStat parses /proc/PID/stat. The command name (field 2) may hold spaces
// and parentheses, so fields are counted from the last ')'.
func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	return parseStat(b)
}

func parseStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("parsing /proc stat: no ')' in %q", b)
	}
	// After ") ": field 3 (state) is f[0], ppid (4) f[1], pgrp (5) f[2],
	// utime (14) f[11], stime (15) f[12].
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("parsing /proc stat: %d fields after the name", len(f))
	}
	var st procStat
	var err error
	if st.ppid, err = strconv.Atoi(f[1]); err != nil {
		return procStat{}, fmt.Errorf("parsing /proc stat ppid: %w", err)
	}
	if st.pgrp, err = strconv.Atoi(f[2]); err != nil {
		return procStat{}, fmt.Errorf("parsing /proc stat pgrp: %w", err)
	}
	if st.utime, err = strconv.ParseInt(f[11], 10, 64); err != nil {
		return procStat{}, fmt.Errorf("parsing /proc stat utime: %w", err)
	}
	if st.stime, err = strconv.ParseInt(f[12], 10, 64); err != nil {
		return procStat{}, fmt.Errorf("parsing /proc stat stime: %w", err)
	}
	return st, nil
}

func readCPU(pid int) (float64, error) {
	st, err := readStat(pid)
	if err != nil {
		return 0, err
	}
	return float64(st.utime+st.stime) / clockTicks, nil
}

// memory is the resident memory of one process, KiB: RSS, its anonymous
// part (what the process allocated; the rest is mapped files, the executable
// first), and PSS (see Usage).
type memory struct{ rss, anon, pss int64 }

// readMemory reads Rss, Pss and Anonymous from /proc/PID/smaps_rollup (one
// summary of every mapping, Linux 4.14 and later).
func readMemory(pid int) (memory, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps_rollup"))
	if err != nil {
		return memory{}, err
	}
	return parseSmapsRollup(b)
}

func parseSmapsRollup(b []byte) (memory, error) {
	var m memory
	for line := range strings.SplitSeq(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		var field *int64
		switch name {
		case "Rss":
			field = &m.rss
		case "Pss":
			field = &m.pss
		case "Anonymous":
			field = &m.anon
		}
		if !ok || field == nil {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return memory{}, fmt.Errorf("parsing /proc smaps_rollup line %q", line)
		}
		v, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return memory{}, fmt.Errorf("parsing /proc smaps_rollup line %q: %w", line, err)
		}
		*field = v
	}
	// Zombies and kernel threads have an empty rollup: they hold no memory.
	return m, nil
}

// raiseFileLimit lifts the soft RLIMIT_NOFILE to the hard limit (children
// inherit it) and reports the result. Holding 2,000 proxied connections open
// costs this process 4,000 descriptors (client and backend ends) and each
// sidecar as many again.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return 0, fmt.Errorf("raising RLIMIT_NOFILE to %d: %w", lim.Max, err)
		}
	}
	return lim.Cur, nil
}

// waitCtx sleeps for d or until ctx ends.
func waitCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
