//go:build darwin || freebsd || netbsd

package policy

import "syscall"

func changeTime(st *syscall.Stat_t) int64 { return st.Ctimespec.Nano() }
