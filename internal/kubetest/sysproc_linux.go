package kubetest

import "syscall"

// sysProcAttr makes a child die with the test binary, so a test that times
// out (and panics) leaves no API server behind holding its ports.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}
