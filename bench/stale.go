package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// A harness stopped by SIGINT, SIGTERM or an error stops everything it
// started. One killed with SIGKILL cannot: its direct children die with it
// (parent-death signal), but their own children — nginx's workers — live on,
// orphaned, and the temporary directory stays. So each run records its pid
// and the process group of every sidecar in its directory, and the next run
// clears up after a predecessor that is gone.
const (
	ownerFile  = "owner"  // the harness's pid
	groupsFile = "groups" // one sidecar process group per line
)

func writeOwner(runDir string) error {
	return os.WriteFile(filepath.Join(runDir, ownerFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
}

// recordGroup notes a sidecar's process group in the run directory.
func recordGroup(runDir string, pgid int) error {
	f, err := os.OpenFile(filepath.Join(runDir, groupsFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("recording process group: %w", err)
	}
	if _, err := fmt.Fprintln(f, pgid); err != nil {
		f.Close()
		return fmt.Errorf("recording process group: %w", err)
	}
	return f.Close()
}

// cleanStale looks for run directories in tmpDir whose harness is gone,
// kills the orphans of their sidecar groups and removes the directories. It
// returns what it did, for the progress output.
func cleanStale(tmpDir string) []string {
	dirs, _ := filepath.Glob(filepath.Join(tmpDir, "latch-bench-*"))
	var done []string
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue // not ours, or a run that had not started yet
		}
		owner, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || harnessAlive(owner) {
			continue
		}
		killed := 0
		if g, err := os.ReadFile(filepath.Join(dir, groupsFile)); err == nil {
			for line := range strings.SplitSeq(string(g), "\n") {
				if pgid, err := strconv.Atoi(strings.TrimSpace(line)); err == nil && pgid > 1 {
					killed += killOrphans(pgid, dir)
				}
			}
		}
		if err := os.RemoveAll(dir); err == nil {
			done = append(done, fmt.Sprintf("removed %s left by a killed run (pid %d), %d orphaned processes killed", dir, owner, killed))
		}
	}
	return done
}

// harnessAlive reports whether pid is a running latch-bench (or a test
// binary of this package) rather than a dead or recycled pid.
func harnessAlive(pid int) bool {
	cmd, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return false
	}
	s := string(cmd)
	return strings.Contains(s, "latch-bench") || strings.Contains(s, "bench.test")
}

// killOrphans kills the leftovers of process group pgid of the run in dir.
// Only when the group leader is gone (a live leader is a running sidecar of
// another run, or not ours at all), and only processes that name dir on
// their command line or are nginx workers (the one kind of grandchild the
// peers fork): a recycled group number of an unrelated program fails these.
func killOrphans(pgid int, dir string) int {
	// A leader killed by its parent-death signal may linger as a zombie
	// until someone reaps it; that is gone too.
	if b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pgid), "stat")); err == nil {
		if i := strings.LastIndexByte(string(b), ')'); i < 0 || !strings.HasPrefix(strings.TrimSpace(string(b[i+1:])), "Z") {
			return 0
		}
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		st, err := parseStat(b)
		if err != nil || st.pgrp != pgid {
			continue
		}
		cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if strings.Contains(string(cmd), dir) || strings.HasPrefix(string(cmd), "nginx: worker process") {
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				n++
			}
		}
	}
	return n
}
