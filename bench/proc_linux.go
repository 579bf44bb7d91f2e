package bench

import "syscall"

// childAttr puts a child in a process group of its own (so stopping it stops
// what it started) and has the kernel kill it if the harness dies, so no
// peer proxy outlives a crashed run.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
