//go:build !linux

package bench

import "syscall"

// childAttr: without Pdeathsig (Linux only) a child outlives a harness that
// crashes; stop reaps it on every normal exit.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
