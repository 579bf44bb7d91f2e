package policy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultDebounce is how long Watch waits after the last file event before
// reloading: editors and ConfigMap updates write several events per change,
// and one reload per change is what we want.
const DefaultDebounce = 100 * time.Millisecond

// Files feeds a Store from the files of one directory: those directly in it
// ending in .yaml, .yml or .json whose names do not start with a dot
// (Kubernetes ConfigMap mounts keep their real files in ..data).
type Files struct {
	store *Store
	dir   string
	// racyWindow is racyWindow but in tests, which cannot set a file's
	// ctime back and would otherwise wait for it to age.
	racyWindow time.Duration
	// read reads a file: os.ReadFile, but in tests that count reads.
	read func(name string) ([]byte, error)

	mu    sync.Mutex
	known map[string]seenFile // paths given to the store, as they were when read
}

// NewFiles returns the source of the declarations in dir. Nothing is read
// until Reload or Watch.
func NewFiles(store *Store, dir string) *Files {
	return &Files{store: store, dir: dir, racyWindow: racyWindow, read: os.ReadFile, known: map[string]seenFile{}}
}

// Dir is the directory the source reads.
func (f *Files) Dir() string { return f.dir }

// Store is the store the source feeds.
func (f *Files) Store() *Store { return f.store }

// Reload reads the directory again, gives the store every file that
// changed (only those are parsed) and forgets files that are gone. It
// returns what changed and the store's snapshot. The error is for a
// directory that cannot be listed; the store then keeps what it had from
// the directory.
func (f *Files) Reload() (Snapshot, Change, error) {
	ch, err := f.reload()
	return f.store.Snapshot(), ch, err
}

func (f *Files) reload() (Change, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	start := time.Now()
	files, err := f.list()
	if err != nil {
		// Keep serving what we had: the directory is unreadable, not empty.
		return Change{}, fmt.Errorf("listing declarations in %s: %w", f.dir, err)
	}
	var changes []Change
	now := make(map[string]seenFile, len(files))
	var read []string
	for _, file := range files {
		p := file.path
		if prev, ok := f.known[p]; ok && prev.unchanged(file.info) {
			// Not read again: with one file per workload, reading them all
			// was most of the cost of a one-file change.
			now[p] = prev
			continue
		}
		now[p] = seenFile{} // read again next time: see unchanged
		if s := seen(file.info); !s.racy(start, f.racyWindow) {
			now[p] = s
		}
		read = append(read, p)
	}
	for _, r := range f.readAll(read) {
		if r.readErr != nil {
			now[r.path] = seenFile{} // retried next time
			changes = append(changes, f.store.SetFileError(r.path, r.readErr))
			continue
		}
		changes = append(changes, f.store.setFile(r.parsedFile))
	}
	// Files gone are forgotten in the directory's order too: what one lets
	// go of is offered to the files waiting for it, so the order can decide
	// which waiting file gets a contested ID (in map order, a different one
	// from one run to the next).
	var gone []string
	for p := range f.known {
		if _, ok := now[p]; !ok {
			gone = append(gone, p)
		}
	}
	slices.Sort(gone)
	for _, p := range gone {
		changes = append(changes, f.store.Remove(FileSource(p)))
	}
	f.known = now
	return mergeChanges(changes), nil
}

// readFile is a file read and parsed, or the error reading it.
type readFile struct {
	parsedFile
	readErr error
}

// readAll reads and parses the files at paths, on every core when there are
// many: at start-up that is every file, and one by one they were half of
// what a restarted control plane did before it could serve. The results are
// in the order of paths, and the store takes them in that order, as it did
// when each file was parsed in turn: which file keeps a contested ID does not
// depend on which parse finished first.
func (f *Files) readAll(paths []string) []readFile {
	out := make([]readFile, len(paths))
	do := func(i int) {
		out[i].path = paths[i]
		if out[i].data, out[i].readErr = f.read(paths[i]); out[i].readErr == nil {
			out[i].parsedFile = f.store.parse(out[i].parsedFile)
		}
	}
	workers := min(runtime.GOMAXPROCS(0), len(paths))
	if workers <= 1 {
		for i := range paths {
			do(i)
		}
		return out
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < len(paths); i = int(next.Add(1) - 1) {
				do(i)
			}
		})
	}
	wg.Wait()
	return out
}

// seenFile is what a reload keeps of a file it read, to know it untouched
// at the next: which file it is and when its inode last changed, its size
// and its modification time. Not the os.FileInfo, which is four times as
// large (the whole stat record and the name), for every file.
type seenFile struct {
	trusted bool // false: read it again next time
	file    fileID
	size    int64
	modTime int64 // Unix nanoseconds
}

func seen(fi os.FileInfo) seenFile {
	id, ok := fileIdentity(fi)
	return seenFile{trusted: ok, file: id, size: fi.Size(), modTime: fi.ModTime().UnixNano()}
}

// unchanged reports whether cur is the file read before, untouched: the
// same file (device and inode: a ConfigMap update, or an editor's rename
// over it, makes a new one), whose inode has not changed since (its ctime:
// a write, even one that sets the modification time back, changes it),
// of the same size and modification time. File times are coarse (a clock
// tick, milliseconds), so a file that changed shortly before it was read is
// never taken as unchanged (racy; it is not trusted): a second write within
// the same tick would be missed.
func (s seenFile) unchanged(cur os.FileInfo) bool {
	return s.trusted && s == seen(cur)
}

// racyWindow is how recently a file may have changed (its modification
// time or its inode's) when read and still be trusted by its stat
// afterwards; far above any file system's timestamp granularity.
const racyWindow = 2 * time.Second

// racy reports whether s changed within window of readAt, or after it.
func (s seenFile) racy(readAt time.Time, window time.Duration) bool {
	since := readAt.Add(-window).UnixNano()
	return s.modTime > since || s.file.changedAt() > since
}

// mergeChanges merges changes in one pass (Change.Merge checks for
// duplicates one by one, which is quadratic when every file changed).
func mergeChanges(changes []Change) Change {
	var out Change
	ids := map[spiffeid.ID]bool{}
	srcs := map[Source]bool{}
	for _, c := range changes {
		for _, id := range c.IDs {
			if !ids[id] {
				ids[id] = true
				out.IDs = append(out.IDs, id)
			}
		}
		for _, src := range c.Sources {
			if !srcs[src] {
				srcs[src] = true
				out.Sources = append(out.Sources, src)
			}
		}
	}
	return out
}

type listedFile struct {
	path string
	info os.FileInfo
}

func (f *Files) list() ([]listedFile, error) {
	entries, err := os.ReadDir(f.dir)
	if err != nil {
		return nil, err
	}
	var out []listedFile
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			continue
		}
		switch filepath.Ext(name) {
		case ".yaml", ".yml", ".json":
		default:
			continue
		}
		p := filepath.Join(f.dir, name)
		fi, err := os.Stat(p) // follows the symlinks of ConfigMap mounts
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		out = append(out, listedFile{p, fi})
	}
	return out, nil
}

// Watch reloads whenever the directory changes and passes the store's
// snapshot and what changed to onChange, starting with the current state.
// It returns when ctx is done (nil) or when the directory cannot be watched.
// onChange runs on Watch's goroutine, one call at a time.
func (f *Files) Watch(ctx context.Context, debounce time.Duration, onChange func(Snapshot, Change)) error {
	if debounce <= 0 {
		debounce = DefaultDebounce
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching declarations: %w", err)
	}
	defer w.Close()
	// Watching the directory (not the files) sees new files, removals, and
	// the atomic symlink swap with which Kubernetes updates a ConfigMap.
	if err := w.Add(f.dir); err != nil {
		return fmt.Errorf("watching declarations in %s: %w", f.dir, err)
	}
	log := f.store.log
	reload := func() {
		snap, ch, err := f.Reload()
		if err != nil {
			log.Error("reloading declarations", "dir", f.dir, "reason", err)
		}
		onChange(snap, ch)
	}
	reload()

	timer := time.NewTimer(debounce)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			log.Debug("declaration directory changed", "file", ev.Name, "op", ev.Op.String())
			timer.Reset(debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			// An overflow loses events; a reload catches up with whatever
			// they were.
			log.Warn("watching declarations", "dir", f.dir, "reason", err)
			timer.Reset(debounce)
		case <-timer.C:
			reload()
		}
	}
}
