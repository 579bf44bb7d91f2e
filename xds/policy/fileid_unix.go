//go:build unix

package policy

import (
	"os"
	"syscall"
)

// fileID names a file on its file system: what os.SameFile compares.
type fileID struct{ dev, ino uint64 }

// fileIdentity is fi's file; false if the platform does not say. (Dev and
// Ino are narrower than 64 bits on some systems.)
func fileIdentity(fi os.FileInfo) (fileID, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, false
	}
	return fileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}, true
}
