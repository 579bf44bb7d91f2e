//go:build unix

package policy

import (
	"os"
	"syscall"
)

// fileID names a file on its file system (what os.SameFile compares) and
// when its inode last changed: its ctime, which the kernel sets on every
// write, rename, chmod and utimes and which, unlike the modification time,
// no call can set back. A file rewritten in place with its modification
// time restored (cp -p, tar, rsync -t, or a pipeline that fixes every
// file's time for reproducible builds), or a new file on an inode number
// just freed (ext4 hands it out again at once), has the same device, inode,
// size and modification time as the file read before, but a later ctime.
type fileID struct {
	dev, ino uint64
	changed  int64 // ctime, Unix nanoseconds
}

// fileIdentity is fi's file; false if the platform does not say. (Dev and
// Ino are narrower than 64 bits on some systems.)
func fileIdentity(fi os.FileInfo) (fileID, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, false
	}
	return fileID{dev: uint64(st.Dev), ino: uint64(st.Ino), changed: changeTime(st)}, true
}

// changedAt is when the file's inode last changed, in Unix nanoseconds.
func (id fileID) changedAt() int64 { return id.changed }
