package policy

import (
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Source is where declarations come from: a file (File set), or a
// ServicePolicy object read from the Kubernetes API server (Namespace and
// Name set).
type Source struct {
	File      string
	Namespace string
	Name      string
}

// FileSource is the source of the file at path.
func FileSource(path string) Source { return Source{File: path} }

// ObjectSource is the source of the ServicePolicy namespace/name.
func ObjectSource(namespace, name string) Source { return Source{Namespace: namespace, Name: name} }

// IsObject reports whether the source is an API object.
func (s Source) IsObject() bool { return s.File == "" }

// String is the file's path, or "ServicePolicy namespace/name": what errors
// and logs call the source.
func (s Source) String() string {
	if s.File != "" {
		return s.File
	}
	return Kind + " " + s.Namespace + "/" + s.Name
}

func (s Source) compare(o Source) int {
	return cmp.Or(strings.Compare(s.File, o.File), strings.Compare(s.Namespace, o.Namespace), strings.Compare(s.Name, o.Name))
}

// Snapshot is the policy a Store serves at one moment: every served
// declaration, sorted by SPIFFE ID, and every refusal of the sources' latest
// versions.
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

// Change is what one update of a Store changed.
type Change struct {
	// IDs are the workloads whose served declaration was added, changed or
	// removed: the only nodes that need a new xDS snapshot.
	IDs []spiffeid.ID
	// Sources are the sources whose state (what they serve, or why their
	// latest version is refused) changed: the statuses to rewrite. A
	// conflict's loser appears here when the winner lets go of the ID.
	Sources []Source
}

// Empty reports whether nothing changed.
func (c Change) Empty() bool { return len(c.IDs) == 0 && len(c.Sources) == 0 }

// Merge adds o's changes to c, without duplicates.
func (c *Change) Merge(o Change) {
	for _, id := range o.IDs {
		if !slices.Contains(c.IDs, id) {
			c.IDs = append(c.IDs, id)
		}
	}
	for _, s := range o.Sources {
		if !slices.Contains(c.Sources, s) {
			c.Sources = append(c.Sources, s)
		}
	}
}

// Reasons a source's latest version is not served, for Kubernetes
// conditions and metrics.
const (
	ReasonAccepted = "Accepted"
	ReasonInvalid  = "Invalid"  // the decoder refused it
	ReasonNotOwned = "NotOwned" // it names an ID outside its namespace
	ReasonConflict = "Conflict" // another source already serves one of its IDs
)

// State is what the Store knows of one source.
type State struct {
	// Serving is what the source serves: its latest version if accepted,
	// else its last good version (nil if none).
	Serving []Declaration
	// Generation and ServingGeneration are, for an API object, the latest
	// generation given and the one served (0 if none).
	Generation, ServingGeneration int64
	// Reason is ReasonAccepted when the latest version is served, else why
	// not; Errors then say where and why.
	Reason string
	Errors []*Error
}

// Accepted reports whether the source's latest version is the one served.
func (s State) Accepted() bool { return s.Reason == ReasonAccepted }

// ErrNotOwned marks the refusal of an ID a namespace may not declare;
// ErrConflict the refusal of an ID another source already serves.
var (
	ErrNotOwned = errors.New("the ID does not belong to the object's namespace")
	ErrConflict = errors.New("another declaration already serves this ID")
)

// Store holds the declarations of every source and decides which one serves
// each SPIFFE ID. It is updated one source at a time (a changed file, an
// added or changed object) and only that source is parsed; the rest keep
// what they had.
//
// A source whose latest version is refused keeps serving its last good
// version, so a broken edit never removes or changes policy. Which source
// wins a conflict (two declaring the same SPIFFE ID) is decided by
// incumbency, so that an edit can never take policy away from a source that
// was not touched: the source serving an ID keeps it, the newcomer is
// refused (and told who keeps it), and it is retried, in source order, as
// soon as the holder lets go of the ID.
type Store struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	entries map[Source]*entry
	owner   map[spiffeid.ID]Source
}

type entry struct {
	src Source
	// latest is the digest of the content last given (a file's bytes; an
	// object's spec, with its generation), to skip an unchanged one; nil
	// if none was (a file that could not be read). Only the digest: the
	// content itself, kept for every source, was a tenth of what the
	// control plane held per declaration.
	latest     *contentDigest
	generation int64
	// pending is the latest version when it is good but held back by a
	// conflict; nil otherwise.
	pending    []Declaration
	pendingGen int64
	errs       []*Error // why the latest version is not served; nil if it is
	reason     string
	// serving is what this source serves.
	serving    []Declaration
	servingGen int64
}

// contentDigest identifies a source's content.
type contentDigest [sha256.Size]byte

func digestOf(data []byte) *contentDigest {
	d := contentDigest(sha256.Sum256(data))
	return &d
}

// is reports whether d is the digest of the content whose digest is o.
func (d *contentDigest) is(o *contentDigest) bool { return d != nil && o != nil && *d == *o }

// NewStore returns an empty Store.
func NewStore(opts Options, log *slog.Logger) (*Store, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{opts: opts, log: log, entries: map[Source]*entry{}, owner: map[spiffeid.ID]Source{}}, nil
}

// Options are the options the store decodes with.
func (s *Store) Options() Options { return s.opts }

// SetFile gives the store the contents of the file at path, which is parsed
// unless it is unchanged.
func (s *Store) SetFile(path string, data []byte) Change {
	return s.setFile(parsedFile{path: path, data: data})
}

// parsedFile is a file's contents and, if parsed, what Parse made of them
// with the store's options.
type parsedFile struct {
	path   string
	data   []byte
	digest *contentDigest // of data, once taken
	parsed bool
	decls  []Declaration
	err    error
}

// parse parses f unless the store holds its contents already (then the store
// ignores it anyway). It does not change the store, so files can be parsed
// at once and handed to setFile one by one.
func (s *Store) parse(f parsedFile) parsedFile {
	f.digest = digestOf(f.data)
	s.mu.Lock()
	e := s.entries[FileSource(f.path)]
	same := e != nil && e.latest.is(f.digest)
	s.mu.Unlock()
	if !same {
		f.decls, f.err = Parse(f.path, f.data, s.opts)
		f.parsed = true
	}
	return f
}

func (s *Store) setFile(f parsedFile) Change {
	src := FileSource(f.path)
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.digest == nil {
		f.digest = digestOf(f.data)
	}
	if e := s.entries[src]; e != nil && e.latest.is(f.digest) {
		return Change{}
	}
	if !f.parsed {
		f.decls, f.err = Parse(f.path, f.data, s.opts)
	}
	return s.set(src, f.digest, 0, f.decls, f.err)
}

// SetFileError records that the file at path could not be read; it keeps
// serving what it served.
func (s *Store) SetFileError(path string, readErr error) Change {
	src := FileSource(path)
	s.mu.Lock()
	defer s.mu.Unlock()
	err := &FileError{File: path, Errors: []*Error{{File: path, Reason: fmt.Sprintf("reading: %v", readErr)}}}
	return s.set(src, nil, 0, nil, err)
}

// Object is a ServicePolicy read from the Kubernetes API server.
type Object struct {
	Namespace, Name string
	// Generation is metadata.generation, which the API server raises on
	// every change of the spec.
	Generation int64
	// Spec is the object's spec as JSON.
	Spec []byte
}

// SetObject gives the store the latest version of a ServicePolicy object,
// which is parsed unless its generation and spec are those it had.
func (s *Store) SetObject(o Object) Change {
	src := ObjectSource(o.Namespace, o.Name)
	s.mu.Lock()
	defer s.mu.Unlock()
	digest := digestOf(o.Spec)
	if e := s.entries[src]; e != nil && e.generation == o.Generation && e.latest.is(digest) {
		return Change{}
	}
	decls, err := ParseObject(o, s.opts)
	return s.set(src, digest, o.Generation, decls, err)
}

// Remove forgets src: the IDs it served are no longer served, unless a
// source waiting for one of them takes it.
func (s *Store) Remove(src Source) Change {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.entries[src]
	if e == nil {
		return Change{}
	}
	delete(s.entries, src)
	var ch Change
	released := s.release(e, nil)
	ch.IDs = append(ch.IDs, released...)
	ch.Sources = append(ch.Sources, src)
	if len(e.serving) > 0 {
		s.log.Info("declaration source removed", "source", src.String(), "released", len(released))
	}
	ch.Merge(s.retry(released))
	return ch
}

// set installs the outcome of parsing src's latest content. Called with
// s.mu held.
func (s *Store) set(src Source, digest *contentDigest, gen int64, decls []Declaration, parseErr error) Change {
	e := s.entries[src]
	if e == nil {
		e = &entry{src: src}
		s.entries[src] = e
	}
	e.latest, e.generation = digest, gen
	ch := Change{Sources: []Source{src}}
	if parseErr != nil {
		e.pending, e.pendingGen = nil, 0
		e.errs, e.reason = errorsOf(src, parseErr), ReasonInvalid
		if errors.Is(parseErr, ErrNotOwned) {
			e.reason = ReasonNotOwned
		}
		s.logRefusal(e)
		return ch
	}
	e.pending, e.pendingGen = decls, gen
	ch.Merge(s.claim(e))
	return ch
}

// claim serves e's pending version if none of its IDs is served by another
// source, and reports what changed. Called with s.mu held.
func (s *Store) claim(e *entry) Change {
	for _, d := range e.pending {
		if holder, taken := s.owner[d.ID]; taken && holder != e.src {
			held := s.entries[holder]
			e.errs = []*Error{{File: e.src.String(), Line: d.Line, Err: ErrConflict,
				Reason: fmt.Sprintf("spec.spiffeID %s: conflicts with %s, which keeps it", d.ID, describe(held, d.ID))}}
			e.reason = ReasonConflict
			s.logRefusal(e)
			return Change{}
		}
	}
	var ch Change
	next := map[spiffeid.ID]Declaration{}
	for _, d := range e.pending {
		next[d.ID] = d
		prev, had := findDecl(e.serving, d.ID)
		if !had || !reflect.DeepEqual(prev, d) {
			ch.IDs = append(ch.IDs, d.ID)
		}
		s.owner[d.ID] = e.src
	}
	released := s.release(e, next)
	ch.IDs = append(ch.IDs, released...)
	e.serving, e.servingGen = e.pending, e.pendingGen
	e.pending, e.pendingGen, e.errs, e.reason = nil, 0, nil, ReasonAccepted
	ch.Merge(s.retry(released))
	return ch
}

// release gives up the IDs e serves that keep is missing, and returns them.
// Called with s.mu held.
func (s *Store) release(e *entry, keep map[spiffeid.ID]Declaration) []spiffeid.ID {
	var out []spiffeid.ID
	for _, d := range e.serving {
		if _, kept := keep[d.ID]; kept {
			continue
		}
		if s.owner[d.ID] == e.src {
			delete(s.owner, d.ID)
			out = append(out, d.ID)
		}
	}
	return out
}

// retry offers the released IDs to the sources waiting for them, in source
// order. Called with s.mu held.
func (s *Store) retry(released []spiffeid.ID) Change {
	var ch Change
	for len(released) > 0 {
		var waiting []*entry
		for _, e := range s.entries {
			if e.pending != nil && e.reason == ReasonConflict && wantsAny(e.pending, released) {
				waiting = append(waiting, e)
			}
		}
		slices.SortFunc(waiting, func(a, b *entry) int { return a.src.compare(b.src) })
		released = nil
		for _, e := range waiting {
			c := s.claim(e)
			// Its status changes either way: it now serves, or it waits
			// for another holder.
			c.Sources = append(c.Sources, e.src)
			if e.reason == ReasonAccepted {
				s.log.Info("declaration source took over the ID it conflicted on", "source", e.src.String())
			}
			ch.Merge(c)
			// What it let go of in turn may be wanted by others.
			for _, id := range c.IDs {
				if _, served := s.owner[id]; !served {
					released = append(released, id)
				}
			}
		}
	}
	return ch
}

func wantsAny(decls []Declaration, ids []spiffeid.ID) bool {
	for _, d := range decls {
		if slices.Contains(ids, d.ID) {
			return true
		}
	}
	return false
}

func findDecl(decls []Declaration, id spiffeid.ID) (Declaration, bool) {
	for _, d := range decls {
		if d.ID == id {
			return d, true
		}
	}
	return Declaration{}, false
}

// describe names the declaration of id in e for a conflict message.
func describe(e *entry, id spiffeid.ID) string {
	if e == nil {
		return "another declaration"
	}
	if e.src.IsObject() {
		return e.src.String()
	}
	if d, ok := findDecl(e.serving, id); ok {
		return fmt.Sprintf("%s %q at %s:%d", Kind, d.Name, e.src.File, d.Line)
	}
	return e.src.String()
}

func errorsOf(src Source, err error) []*Error {
	var fe *FileError
	if errors.As(err, &fe) {
		return fe.Errors
	}
	return []*Error{{File: src.String(), Reason: err.Error()}}
}

func (s *Store) logRefusal(e *entry) {
	for _, err := range e.errs {
		s.log.Warn("declaration refused", "source", e.src.String(), "line", err.Line, "reason", err.Reason)
	}
	s.log.Warn("declaration source not updated", "source", e.src.String(), "reason", e.reason, "serving", servingNote(e))
}

// servingNote says what a refused source serves instead.
func servingNote(e *entry) string {
	what := "file"
	if e.src.IsObject() {
		what = "object"
	}
	switch {
	case e.serving == nil:
		return "no previous good version: this " + what + " serves nothing until fixed"
	case e.src.IsObject():
		return "serving generation " + strconv.FormatInt(e.servingGen, 10) + ", its last good version"
	}
	return "serving the previous good version of this file"
}

// State returns what the store knows of src.
func (s *Store) State(src Source) (State, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.entries[src]
	if e == nil {
		return State{}, false
	}
	st := State{
		Serving: e.serving, Generation: e.generation, ServingGeneration: e.servingGen,
		Reason: e.reason, Errors: slices.Clone(e.errs),
	}
	if !st.Accepted() {
		st.Errors = append(st.Errors, &Error{File: src.String(), Reason: servingNote(e)})
	}
	return st, true
}

// Owner returns the source serving id.
func (s *Store) Owner(id spiffeid.ID) (Source, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	src, ok := s.owner[id]
	return src, ok
}

// Sources lists every source the store knows, in order.
func (s *Store) Sources() []Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Source, 0, len(s.entries))
	for src := range s.entries {
		out = append(out, src)
	}
	slices.SortFunc(out, Source.compare)
	return out
}

// Snapshot returns everything served now and every refusal.
func (s *Store) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	var snap Snapshot
	for id, src := range s.owner {
		if d, ok := findDecl(s.entries[src].serving, id); ok {
			snap.Declarations = append(snap.Declarations, d)
		}
	}
	for _, e := range s.entries {
		if e.reason != ReasonAccepted {
			snap.Errors = append(snap.Errors, e.errs...)
			snap.Errors = append(snap.Errors, &Error{File: e.src.String(), Reason: servingNote(e)})
		}
	}
	slices.SortFunc(snap.Declarations, func(a, b Declaration) int { return strings.Compare(a.ID.String(), b.ID.String()) })
	slices.SortStableFunc(snap.Errors, func(a, b *Error) int {
		return cmp.Or(strings.Compare(a.File, b.File), cmp.Compare(a.Line, b.Line))
	})
	return snap
}
