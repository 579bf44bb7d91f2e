package policy

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Snapshot is the policy a Store serves at one moment: every accepted
// declaration, sorted by SPIFFE ID, and every refusal found on the way.
type Snapshot struct {
	Declarations []Declaration
	Errors       []*Error
}

// Lookup returns the declaration for id.
func (s Snapshot) Lookup(id spiffeid.ID) (Declaration, bool) {
	i, ok := slices.BinarySearchFunc(s.Declarations, id.String(), func(d Declaration, want string) int {
		return strings.Compare(d.ID.String(), want)
	})
	if !ok {
		return Declaration{}, false
	}
	return s.Declarations[i], true
}

// Store reads declarations from the files of one directory and remembers,
// per file, the last version that was accepted. Files are those directly in
// the directory ending in .yaml, .yml or .json whose names do not start with
// a dot (Kubernetes ConfigMap mounts keep their real files in ..data).
type Store struct {
	dir  string
	opts Options
	log  *slog.Logger

	mu    sync.Mutex
	files map[string]*fileState // by path
}

type fileState struct {
	good     []Declaration // last accepted version; nil if never
	goodData []byte
}

// NewStore returns a Store for dir. Nothing is read until Reload.
func NewStore(dir string, opts Options, log *slog.Logger) (*Store, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{dir: dir, opts: opts, log: log, files: map[string]*fileState{}}, nil
}

// Dir is the directory the store reads.
func (s *Store) Dir() string { return s.dir }

// Reload reads the directory again and returns what is now served. The error
// is for a directory that cannot be listed; the previous policy is then kept
// and returned along with it.
//
// Which file wins a conflict (two files declaring the same SPIFFE ID) is
// decided by incumbency, so that an edit can never take policy away from a
// file that was not touched: unchanged files keep their claims first, then
// files that broke keep their previous good version, then changed files
// claim what is left, in name order.
func (s *Store) Reload() (Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()

	type candidate struct {
		path  string
		data  []byte
		decls []Declaration
		err   error
	}
	paths, listErr := s.list()
	if listErr != nil {
		paths = nil
		for p := range s.files {
			paths = append(paths, p)
		}
		slices.Sort(paths)
	}
	var cands []*candidate
	for _, p := range paths {
		c := &candidate{path: p}
		if listErr != nil {
			// Keep serving what we had: the directory is unreadable, not empty.
			c.data, c.decls = s.files[p].goodData, s.files[p].good
		} else if data, err := os.ReadFile(p); err != nil {
			c.err = &FileError{File: p, Errors: []*Error{{File: p, Reason: fmt.Sprintf("reading: %v", err)}}}
		} else if prev := s.files[p]; prev != nil && prev.good != nil && bytes.Equal(prev.goodData, data) {
			// Unchanged since it was last accepted: no need to parse again.
			c.data, c.decls = data, prev.good
		} else {
			c.data = data
			c.decls, c.err = Parse(p, data, s.opts)
		}
		cands = append(cands, c)
	}

	var snap Snapshot
	claimed := map[spiffeid.ID]Declaration{}
	// claim takes every ID of decls, or none of them if any is taken.
	claim := func(path string, decls []Declaration) error {
		for _, d := range decls {
			if prev, taken := claimed[d.ID]; taken {
				return &Error{File: path, Line: d.Line, Reason: fmt.Sprintf("spec.spiffeID %s: conflicts with ServicePolicy %q at %s:%d, which keeps it", d.ID, prev.Name, prev.File, prev.Line)}
			}
		}
		for _, d := range decls {
			claimed[d.ID] = d
		}
		return nil
	}
	next := map[string]*fileState{}
	keep := func(c *candidate) {
		prev := s.files[c.path]
		if prev == nil || prev.good == nil {
			snap.Errors = append(snap.Errors, &Error{File: c.path, Reason: "no previous good version: this file serves nothing until fixed"})
			return
		}
		if err := claim(c.path, prev.good); err != nil {
			snap.Errors = append(snap.Errors, err.(*Error), &Error{File: c.path, Reason: "previous good version conflicts too: this file serves nothing until fixed"})
			return
		}
		next[c.path] = prev
		snap.Errors = append(snap.Errors, &Error{File: c.path, Reason: "serving the previous good version of this file"})
	}
	unchanged := func(c *candidate) bool {
		prev := s.files[c.path]
		return c.err == nil && prev != nil && prev.good != nil && bytes.Equal(prev.goodData, c.data)
	}

	// 1. Unchanged good files keep their claims.
	for _, c := range cands {
		if unchanged(c) {
			if err := claim(c.path, c.decls); err != nil {
				snap.Errors = append(snap.Errors, err.(*Error))
				continue
			}
			next[c.path] = s.files[c.path]
		}
	}
	// 2. Broken files fall back to their previous good version.
	for _, c := range cands {
		if c.err != nil {
			var fe *FileError
			if errors.As(c.err, &fe) {
				snap.Errors = append(snap.Errors, fe.Errors...)
			} else {
				snap.Errors = append(snap.Errors, &Error{File: c.path, Reason: c.err.Error()})
			}
			keep(c)
		}
	}
	// 3. Changed good files claim what is left.
	for _, c := range cands {
		if c.err == nil && !unchanged(c) {
			if err := claim(c.path, c.decls); err != nil {
				snap.Errors = append(snap.Errors, err.(*Error))
				keep(c)
				continue
			}
			next[c.path] = &fileState{good: c.decls, goodData: c.data}
		}
	}
	s.files = next

	for _, d := range claimed {
		snap.Declarations = append(snap.Declarations, d)
	}
	slices.SortFunc(snap.Declarations, func(a, b Declaration) int { return strings.Compare(a.ID.String(), b.ID.String()) })
	slices.SortStableFunc(snap.Errors, func(a, b *Error) int {
		return cmp.Or(strings.Compare(a.File, b.File), cmp.Compare(a.Line, b.Line))
	})
	for _, e := range snap.Errors {
		s.log.Warn("declaration refused", "file", e.File, "line", e.Line, "reason", e.Reason)
	}
	if listErr != nil {
		return snap, fmt.Errorf("listing declarations in %s: %w", s.dir, listErr)
	}
	return snap, nil
}

func (s *Store) list() ([]string, error) {
	entries, err := os.ReadDir(s.dir)
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
		p := filepath.Join(s.dir, name)
		fi, err := os.Stat(p) // follows the symlinks of ConfigMap mounts
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		out = append(out, p)
	}
	return out, nil
}
