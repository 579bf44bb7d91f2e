package policy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
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

// TestFilesReadAtOnceKeepListingOrder: many changed files are read and
// parsed at once, but the store takes them in the directory's order, as when
// they were read one by one: of two files claiming an ID, the first listed
// keeps it whichever parse ends first, and broken files are refused with
// their line.
func TestFilesReadAtOnceKeepListingOrder(t *testing.T) {
	const n = 200
	for round := range 5 {
		dir := t.TempDir()
		for i := range n {
			// File i and file i+n/2 claim the same ID; the later one's is
			// longer to parse (more rules), so it tends to finish last
			// in one round and, with the order reversed, first in another.
			id := fmt.Sprintf("spiffe://mesh.test/w%d", i%(n/2))
			src := policyFor(fmt.Sprintf("f%03d", i), id, 1000+i)
			if (i >= n/2) == (round%2 == 0) {
				src += strings.Repeat("        - trustDomain: mesh.test\n", 50)
			}
			if i == 7 {
				src = "kind: ["
			}
			writeFile(t, dir, fmt.Sprintf("f%03d.yaml", i), src)
		}
		f, err := newFiles(dir, testOpts)
		if err != nil {
			t.Fatal(err)
		}
		snap, ch, err := f.Reload()
		if err != nil {
			t.Fatal(err)
		}
		if len(snap.Declarations) != n/2 || len(ch.IDs) != n/2 {
			t.Fatalf("%d declarations served, %d IDs changed; want %d", len(snap.Declarations), len(ch.IDs), n/2)
		}
		for _, d := range snap.Declarations {
			var w int
			fmt.Sscanf(d.ID.Path(), "/w%d", &w)
			want := w
			if w == 7 {
				want = w + n/2 // the first one is broken
			}
			if got := int(d.Inbound[0].Port) - 1000; got != want {
				t.Fatalf("round %d: %s served from file %d, want %d (the first listed that parses)", round, d.ID, got, want)
			}
		}
		for i := n / 2; i < n; i++ {
			if i == 7+n/2 {
				continue
			}
			if !hasError(snap, fmt.Sprintf("f%03d.yaml", i), 1, "conflicts with") {
				t.Fatalf("round %d: f%03d.yaml's conflict not reported: %v", round, i, snap.Errors)
			}
		}
		if !hasError(snap, "f007.yaml", 1, "YAML") {
			t.Fatalf("round %d: the broken file is not reported: %v", round, snap.Errors)
		}
	}
}
