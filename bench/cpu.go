package bench

import "syscall"

// ownCPU is this process's user and system CPU time so far, in seconds:
// the load client's and the backend's, which run in it (the sidecars are
// children and are not included).
func ownCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}
