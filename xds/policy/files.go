package policy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
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

	mu    sync.Mutex
	known map[string]bool // paths given to the store
}

// NewFiles returns the source of the declarations in dir. Nothing is read
// until Reload or Watch.
func NewFiles(store *Store, dir string) *Files {
	return &Files{store: store, dir: dir, known: map[string]bool{}}
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
	paths, err := f.list()
	if err != nil {
		// Keep serving what we had: the directory is unreadable, not empty.
		return Change{}, fmt.Errorf("listing declarations in %s: %w", f.dir, err)
	}
	var ch Change
	now := map[string]bool{}
	for _, p := range paths {
		now[p] = true
		data, err := os.ReadFile(p)
		if err != nil {
			ch.Merge(f.store.SetFileError(p, err))
			continue
		}
		ch.Merge(f.store.SetFile(p, data))
	}
	for p := range f.known {
		if !now[p] {
			ch.Merge(f.store.Remove(FileSource(p)))
		}
	}
	f.known = now
	return ch, nil
}

func (f *Files) list() ([]string, error) {
	entries, err := os.ReadDir(f.dir)
	if err != nil {
		return nil, err
	}
	var out []string
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
		out = append(out, p)
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
