package policy

import (
	"context"
	"fmt"
	"time"

	"github.com/fsnotify/fsnotify"
)

// DefaultDebounce is how long Watch waits after the last file event before
// reloading: editors and ConfigMap updates write several events per change,
// and one reload per change is what we want.
const DefaultDebounce = 100 * time.Millisecond

// Watch reloads the store whenever its directory changes and passes every
// resulting snapshot to onChange, starting with the current one. It returns
// when ctx is done (nil) or when the directory cannot be watched. onChange
// runs on Watch's goroutine, one call at a time.
func (s *Store) Watch(ctx context.Context, debounce time.Duration, onChange func(Snapshot)) error {
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
	if err := w.Add(s.dir); err != nil {
		return fmt.Errorf("watching declarations in %s: %w", s.dir, err)
	}

	reload := func() {
		snap, err := s.Reload()
		if err != nil {
			s.log.Error("reloading declarations", "dir", s.dir, "reason", err)
		}
		onChange(snap)
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
			s.log.Debug("declaration directory changed", "file", ev.Name, "op", ev.Op.String())
			timer.Reset(debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			// An overflow loses events; a reload catches up with whatever
			// they were.
			s.log.Warn("watching declarations", "dir", s.dir, "reason", err)
			timer.Reset(debounce)
		case <-timer.C:
			reload()
		}
	}
}
