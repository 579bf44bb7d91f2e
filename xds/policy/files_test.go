package policy

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestFilesRereadOnlyWhatChanged: a reload reads only the files whose stat
// changed (another file, its inode changed, another size or modification
// time), so a one-file change in a directory of thousands reads one file; a
// file changed within moments of being read is read again next time, since
// file times are coarse; and a file rewritten with the size and
// modification time it had (cp -p, tar, rsync -t, a pipeline that fixes
// every file's time) is read: its inode's change time moved.
func TestFilesRereadOnlyWhatChanged(t *testing.T) {
	dir := t.TempDir()
	f, err := newFiles(dir, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	// A file is trusted once it has not changed for the window: short
	// here, since a test cannot set a change time back.
	const window = 100 * time.Millisecond
	f.racyWindow = window
	settle := func() { time.Sleep(2 * window) }
	var reads atomic.Int64
	f.read = func(name string) ([]byte, error) { reads.Add(1); return os.ReadFile(name) }
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
	reload := func(what, want string, wantRead bool) {
		t.Helper()
		before := reads.Load()
		snap, _, err := f.Reload()
		if err != nil {
			t.Fatal(err)
		}
		if got := ids(snap); got != want {
			t.Fatalf("%s: served %q, want %q", what, got, want)
		}
		if read := reads.Load() != before; read != wantRead {
			t.Fatalf("%s: the file read: %v, want %v", what, read, wantRead)
		}
	}
	hourAgo := time.Now().Add(-time.Hour).Truncate(time.Second)
	write(1001, hourAgo)
	reload("first", "spiffe://mesh.test/a@1001", true)
	// Its inode changed within the window before it was read, whatever its
	// modification time says: read again until it has been still for the
	// window, then trusted. (An hour's window first, so that a slow
	// machine cannot make it still before the test looks.)
	f.racyWindow = time.Hour
	reload("changed within the window before the last read", "spiffe://mesh.test/a@1001", true)
	reload("and still not trusted", "spiffe://mesh.test/a@1001", true)
	f.racyWindow = window
	settle()
	reload("still for the window", "spiffe://mesh.test/a@1001", true)
	reload("unchanged", "spiffe://mesh.test/a@1001", false)

	// Rewritten in place with the same size and modification time: its
	// change time tells.
	write(1002, hourAgo)
	reload("rewritten, its time set back", "spiffe://mesh.test/a@1002", true)

	// An edit now is read; it was modified moments before that read, so
	// another edit with the same size and time is still read.
	settle()
	write(1003, time.Now())
	reload("edited now", "spiffe://mesh.test/a@1003", true)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	write(1004, fi.ModTime())
	reload("edited again within the tick", "spiffe://mesh.test/a@1004", true)

	// Trusted again once still; then a new file (a rename over the old
	// one) of the same size and time is read: it is another file.
	earlier := hourAgo.Add(-time.Minute)
	write(1004, earlier)
	settle()
	reload("still again", "spiffe://mesh.test/a@1004", true)
	reload("unchanged again", "spiffe://mesh.test/a@1004", false)
	tmp := filepath.Join(dir, ".a.tmp")
	if err := os.WriteFile(tmp, []byte(policyFor("a", "spiffe://mesh.test/a", 1005)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(tmp, earlier, earlier); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	reload("renamed over", "spiffe://mesh.test/a@1005", true)
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

// TestFilesReadAtOnceMatchOneByOne: a reload that reads and parses many files
// at once leaves the store exactly as feeding it the same files one by one in
// the directory's order does (which is what a reload did before it parsed on
// every core): the same declarations served from the same files, the same
// refusals, the same state for every source and the same change reported,
// over a first load and reloads that edit, break, fix, add and remove files,
// with many files contesting the same IDs. Parses of different lengths and
// more workers than cores make them finish out of order; if the store took
// them as they finished, which file keeps a contested ID would change.
func TestFilesReadAtOnceMatchOneByOne(t *testing.T) {
	// More workers than cores: finishing order then depends on the
	// scheduler as well as on each parse's length.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(8))
	rnd := rand.New(rand.NewPCG(15, 2026))
	const files, pool = 240, 60
	dir := t.TempDir()
	// content is a file of one to three declarations whose IDs come from a
	// small pool (so most are contested, a file may win some and lose
	// others, and adjacent files often contest one), padded so that parses
	// take very different times; some files are broken.
	content := func(i, version int) string {
		switch rnd.IntN(12) {
		case 0:
			return "kind: [" // not YAML
		case 1: // YAML, but refused on a line of its own
			return policyFor(fmt.Sprintf("f%d", i), "spiffe://elsewhere.test/x", 1000)
		case 2:
			return "" // no declarations at all
		}
		var docs []string
		for d := range 1 + rnd.IntN(3) {
			id := fmt.Sprintf("spiffe://mesh.test/w%d", (i+rnd.IntN(3)+d*7)%pool)
			doc := policyFor(fmt.Sprintf("f%d-%d-v%d", i, d, version), id, 1000+i)
			doc += strings.Repeat("        - trustDomain: mesh.test\n", rnd.IntN(3)*rnd.IntN(80))
			docs = append(docs, doc)
		}
		// Two declarations of one ID in a file refuse the whole file.
		return strings.Join(docs, "---\n")
	}
	present := map[string]bool{}
	write := func(i, version int) {
		name := fmt.Sprintf("f%03d.yaml", i)
		writeFile(t, dir, name, content(i, version))
		present[name] = true
	}
	for i := range files {
		write(i, 0)
	}

	f, err := newFiles(dir, testOpts)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := NewStore(testOpts, nil)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 6 {
		if round > 0 {
			for i := range files {
				name := fmt.Sprintf("f%03d.yaml", i)
				switch r := rnd.IntN(10); {
				case r < 3:
					write(i, round)
				case r == 3 && present[name]:
					if err := os.Remove(filepath.Join(dir, name)); err != nil {
						t.Fatal(err)
					}
					delete(present, name)
				}
			}
		}
		snap, ch, err := f.Reload()
		if err != nil {
			t.Fatal(err)
		}

		// The reference: every file given to the store in turn, in the
		// directory's order (an unchanged one is no change), then the
		// removed ones forgotten.
		var want Change
		var names []string
		for name := range present {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			p := filepath.Join(dir, name)
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			want.Merge(serial.SetFile(p, data))
		}
		for _, src := range serial.Sources() {
			if !present[filepath.Base(src.File)] {
				want.Merge(serial.Remove(src))
			}
		}
		wantSnap := serial.Snapshot()

		if len(wantSnap.Declarations) == 0 || len(wantSnap.Errors) == 0 {
			t.Fatalf("round %d: the reference serves %d declarations with %d errors; the test needs both", round, len(wantSnap.Declarations), len(wantSnap.Errors))
		}
		if !reflect.DeepEqual(snap, wantSnap) {
			t.Fatalf("round %d: parsed at once, the store serves\n%s\nwant (one by one)\n%s", round, describeSnapshot(snap), describeSnapshot(wantSnap))
		}
		if !sameChange(ch, want) {
			t.Fatalf("round %d: the reload reported %d IDs and %d sources changed, one by one %d and %d:\n%+v\nwant\n%+v", round, len(ch.IDs), len(ch.Sources), len(want.IDs), len(want.Sources), ch, want)
		}
		if got, want := f.Store().Sources(), serial.Sources(); !slices.Equal(got, want) {
			t.Fatalf("round %d: sources %v, want %v", round, got, want)
		}
		for _, src := range serial.Sources() {
			got, _ := f.Store().State(src)
			want, _ := serial.State(src)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("round %d: %s: state %+v, want %+v", round, src, got, want)
			}
		}
	}
}

// describeSnapshot lists which file serves each ID and every refusal, to
// show where two snapshots differ.
func describeSnapshot(s Snapshot) string {
	var b strings.Builder
	for _, d := range s.Declarations {
		fmt.Fprintf(&b, "  %s from %s:%d\n", d.ID, filepath.Base(d.File), d.Line)
	}
	for _, e := range s.Errors {
		fmt.Fprintf(&b, "  %s:%d: %s\n", filepath.Base(e.File), e.Line, e.Reason)
	}
	return b.String()
}

// sameChange reports whether a and b name the same IDs and sources, in any
// order.
func sameChange(a, b Change) bool {
	sortedIDs := func(c Change) []string {
		var out []string
		for _, id := range c.IDs {
			out = append(out, id.String())
		}
		slices.Sort(out)
		return out
	}
	sortedSources := func(c Change) []Source {
		out := slices.Clone(c.Sources)
		slices.SortFunc(out, Source.compare)
		return out
	}
	return slices.Equal(sortedIDs(a), sortedIDs(b)) && slices.Equal(sortedSources(a), sortedSources(b))
}

// TestFilesRemovedInDirectoryOrder: files removed together are forgotten in
// the directory's order, as if one by one, since the order decides who gets
// a contested ID. a.yaml serves w1 and b.yaml w2; c.yaml wants both, d.yaml
// w1, and both wait. Removing a then b: c still misses w2 when w1 is let go,
// so d takes w1, and c then misses w1. (Removing b then a would give c
// both.) Before, removed files were forgotten in map order.
func TestFilesRemovedInDirectoryOrder(t *testing.T) {
	const w1, w2 = "spiffe://mesh.test/w1", "spiffe://mesh.test/w2"
	for range 30 {
		dir := t.TempDir()
		writeFile(t, dir, "a.yaml", policyFor("a", w1, 1001))
		writeFile(t, dir, "b.yaml", policyFor("b", w2, 1002))
		writeFile(t, dir, "c.yaml", policyFor("c1", w1, 1003)+"---\n"+policyFor("c2", w2, 1003))
		writeFile(t, dir, "d.yaml", policyFor("d", w1, 1004))
		f, err := newFiles(dir, testOpts)
		if err != nil {
			t.Fatal(err)
		}
		if snap, _, err := f.Reload(); err != nil || ids(snap) != w1+"@1001 "+w2+"@1002" {
			t.Fatalf("served %q (%v), want a's and b's", ids(snap), err)
		}
		for _, name := range []string{"a.yaml", "b.yaml"} {
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
		snap, _, err := f.Reload()
		if err != nil {
			t.Fatal(err)
		}
		if got := ids(snap); got != w1+"@1004" {
			t.Fatalf("after removing a.yaml and b.yaml, served %q, want d.yaml's w1 alone (a.yaml forgotten first)", got)
		}
		if !hasError(snap, "c.yaml", 1, "conflicts with") {
			t.Fatalf("c.yaml's conflict not reported: %v", snap.Errors)
		}
	}
}
