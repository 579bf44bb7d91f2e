package policy

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestFilesRereadOnlyWhatChanged: a reload reads only the files whose stat
// changed (another file, size or modification time), so a one-file change in
// a directory of thousands reads one file; a file modified within moments of
// being read is read again next time, since file times are coarse.
func TestFilesRereadOnlyWhatChanged(t *testing.T) {
	dir := t.TempDir()
	f, err := newFiles(dir, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "a.yaml")
	// In place, as an editor saving without a rename does: same inode.
	write := func(port int, mod time.Time) {
		t.Helper()
		if err := os.WriteFile(path, []byte(policyFor("a", "spiffe://mesh.test/a", port)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
	served := func(want string) Change {
		t.Helper()
		snap, ch, err := f.Reload()
		if err != nil {
			t.Fatal(err)
		}
		if got := ids(snap); got != want {
			t.Fatalf("served %q, want %q", got, want)
		}
		return ch
	}
	hourAgo := time.Now().Add(-time.Hour).Truncate(time.Second)
	write(1001, hourAgo)
	served("spiffe://mesh.test/a@1001")

	// Same inode, size and time: not read. (The blind spot of any stat
	// check; an edit changes the time, a rename or ConfigMap swap the
	// inode.) This is how the test sees that the file was not read.
	write(1002, hourAgo)
	if ch := served("spiffe://mesh.test/a@1001"); !ch.Empty() {
		t.Errorf("unchanged stat, yet a change: %+v", ch)
	}

	// An edit now is read.
	write(1003, time.Now())
	served("spiffe://mesh.test/a@1003")

	// It was modified moments before that read, so its time is not
	// trusted: another edit with the same size and time is still read.
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	write(1004, fi.ModTime())
	served("spiffe://mesh.test/a@1004")

	// A new file (a rename over the old one) is read whatever its time.
	tmp := filepath.Join(dir, ".a.tmp")
	if err := os.WriteFile(tmp, []byte(policyFor("a", "spiffe://mesh.test/a", 1005)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(tmp, hourAgo, hourAgo); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	served("spiffe://mesh.test/a@1005")
}
