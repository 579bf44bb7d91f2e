package devca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
)

// Warning is the message of the line a CA logs when it starts, and the value of
// the "warning" key on its other lines worth a human's attention.
const Warning = "DEVELOPMENT CA — NOT FOR PRODUCTION"

// Defaults for the zero Options.
const (
	DefaultSVIDTTL = time.Hour
	DefaultCATTL   = 24 * time.Hour
)

// Errors callers can branch on.
var (
	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("devca: closed")
	// ErrRollInProgress is returned by RollCA while a new CA is still pending.
	ErrRollInProgress = errors.New("devca: a CA rollover is already in progress")
	// ErrNoPendingCA is returned by ActivateCA when no rollover is in progress.
	ErrNoPendingCA = errors.New("devca: no pending CA to activate")
)

// Options configures a development CA. The zero value is usable: one-hour
// SVIDs rotated every thirty minutes, a CA rolled over well before its 24 hours
// are up, sockets in a private temporary directory, logs to slog.Default.
type Options struct {
	// SVIDTTL is the lifetime of every X.509-SVID (default 1h, at least 1s:
	// certificates carry whole seconds).
	SVIDTTL time.Duration
	// RotateEvery is how long after its issuance an SVID is replaced (default
	// SVIDTTL/2; must be shorter than SVIDTTL so a workload never holds an
	// expired SVID).
	RotateEvery time.Duration
	// CATTL is the lifetime of each CA certificate (default 24h). A timed
	// rollover starts at half of it, or earlier if needed so that the CA outlives
	// every SVID it signs; it must exceed CAOverlap+SVIDTTL.
	CATTL time.Duration
	// CAOverlap is how long a new CA sits in the bundle before it signs anything
	// (default RotateEvery), so that every workload has it before it meets an
	// SVID signed by it. RollCA can override it per rollover.
	CAOverlap time.Duration
	// SocketDir is where the Workload API sockets are created. Empty means a
	// fresh private (0700) temporary directory that Close removes; a directory
	// given here is created if missing and kept, only the sockets are removed.
	SocketDir string
	// Logger receives the CA's logs; nil means slog.Default. Every line carries
	// devca=true.
	Logger *slog.Logger
}

// CA is a DEVELOPMENT CA — NOT FOR PRODUCTION: an in-memory certificate
// authority for one trust domain with a SPIFFE Workload API server per
// registered workload. See the package documentation. All methods are safe for
// concurrent use.
type CA struct {
	td          spiffeid.TrustDomain
	svidTTL     time.Duration
	rotateEvery time.Duration
	caTTL       time.Duration
	caOverlap   time.Duration
	socketDir   string
	ownDir      bool // socketDir was made by New and is removed by Close
	log         *slog.Logger

	mu          sync.Mutex
	closed      bool
	active      *authority
	pending     *authority
	retired     []*authority // oldest first
	workloads   map[spiffeid.ID]*workload
	order       []spiffeid.ID // registration order, for stable socket names and Status
	rollRetryAt time.Time     // after a failed timed rollover, when to try again
	bundleGen   uint64        // bumped whenever the set of published authorities changes
	changed     chan struct{} // closed and replaced on every change streams care about
	subs        map[*subscriber]struct{}
	federated   map[spiffeid.TrustDomain]*x509bundle.Bundle // served as federated bundles
	entries     map[string][]byte                           // federated_bundles entries served as given (SetFederatedBundleEntry)
	following   map[spiffeid.TrustDomain]chan struct{}      // FederateWith followers, closed to stop

	wake      chan struct{} // nudges the scheduler after a change of plan
	done      chan struct{} // closed by Close
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// workload is one registered identity with its socket and gRPC server.
type workload struct {
	id       spiffeid.ID
	addr     string // "unix:///abs/path.sock"
	path     string
	svid     *x509svid.SVID
	certDER  []byte // the SVID chain, concatenated DER, as the Workload API sends it
	keyDER   []byte // PKCS#8
	rotateAt time.Time
	streams  int // open FetchX509SVID streams
	server   *grpc.Server
}

// New starts a DEVELOPMENT CA — NOT FOR PRODUCTION — for trustDomain (for
// example "demo.test"): it generates the first CA in memory and starts the
// rotation scheduler. Workload API sockets appear with AddWorkload. Close stops
// everything and must be called.
func New(trustDomain string, opts Options) (*CA, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("devca: trust domain %q: %w", trustDomain, err)
	}
	ca := &CA{
		td:          td,
		svidTTL:     opts.SVIDTTL,
		rotateEvery: opts.RotateEvery,
		caTTL:       opts.CATTL,
		caOverlap:   opts.CAOverlap,
		log:         opts.Logger,
		workloads:   make(map[spiffeid.ID]*workload),
		changed:     make(chan struct{}),
		subs:        make(map[*subscriber]struct{}),
		federated:   make(map[spiffeid.TrustDomain]*x509bundle.Bundle),
		entries:     make(map[string][]byte),
		following:   make(map[spiffeid.TrustDomain]chan struct{}),
		wake:        make(chan struct{}, 1),
		done:        make(chan struct{}),
	}
	if ca.svidTTL == 0 {
		ca.svidTTL = DefaultSVIDTTL
	}
	if ca.rotateEvery == 0 {
		ca.rotateEvery = ca.svidTTL / 2
	}
	if ca.caTTL == 0 {
		ca.caTTL = DefaultCATTL
	}
	if ca.caOverlap == 0 {
		ca.caOverlap = ca.rotateEvery
	}
	switch {
	case ca.svidTTL < time.Second:
		return nil, fmt.Errorf("devca: SVIDTTL %v: must be at least 1s", ca.svidTTL)
	case ca.rotateEvery <= 0 || ca.rotateEvery >= ca.svidTTL:
		return nil, fmt.Errorf("devca: RotateEvery %v: must be positive and shorter than SVIDTTL %v", ca.rotateEvery, ca.svidTTL)
	case ca.caOverlap < 0:
		return nil, fmt.Errorf("devca: CAOverlap %v: must not be negative", ca.caOverlap)
	case ca.caTTL <= ca.caOverlap+ca.svidTTL:
		return nil, fmt.Errorf("devca: CATTL %v: must exceed CAOverlap+SVIDTTL (%v) so a CA outlives the SVIDs it signs", ca.caTTL, ca.caOverlap+ca.svidTTL)
	}
	if ca.log == nil {
		ca.log = slog.Default()
	}
	ca.log = ca.log.With("devca", true, "trust_domain", td.Name())

	if opts.SocketDir == "" {
		// MkdirTemp creates the directory 0700: only this user can reach the
		// sockets, which is all the "attestation" a dev CA offers.
		dir, err := os.MkdirTemp("", "latch-devca-")
		if err != nil {
			return nil, fmt.Errorf("devca: creating socket directory: %w", err)
		}
		ca.socketDir, ca.ownDir = dir, true
	} else {
		// Absolute, because the address handed out is a unix:// URL.
		dir, err := filepath.Abs(opts.SocketDir)
		if err != nil {
			return nil, fmt.Errorf("devca: socket directory %q: %w", opts.SocketDir, err)
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("devca: creating socket directory: %w", err)
		}
		ca.socketDir = dir
		if fi, err := os.Stat(dir); err == nil && fi.Mode().Perm()&0o077 != 0 {
			ca.log.Warn("socket directory is reachable by other users: any of them can fetch these SVIDs",
				"socket_dir", dir, "mode", fi.Mode().Perm().String())
		}
	}

	now := time.Now()
	first, err := newAuthority(td, now, ca.caTTL)
	if err != nil {
		ca.removeDir()
		return nil, fmt.Errorf("devca: %w", err)
	}
	first.activateAt = now
	ca.active = first
	ca.bundleGen = 1

	ca.log.Warn(Warning,
		"ca_serial", serialHex(first.cert),
		"ca_not_after", first.cert.NotAfter,
		"svid_ttl", ca.svidTTL,
		"rotate_every", ca.rotateEvery,
		"ca_ttl", ca.caTTL,
		"ca_overlap", ca.caOverlap,
		"socket_dir", ca.socketDir)

	ca.wg.Add(1)
	go ca.schedule()
	return ca, nil
}

// TrustDomain returns the trust domain the CA issues for.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// SocketDir returns the directory holding the Workload API sockets.
func (ca *CA) SocketDir() string { return ca.socketDir }

// Issue signs a fresh X.509-SVID for id with the active CA, for tests that want
// certificates without going through gRPC. id must be in the CA's trust domain.
// The SVID counts like any other: a retired CA stays in the bundle until it
// expires.
func (ca *CA) Issue(id string) (*x509svid.SVID, error) {
	sid, err := ca.parseID(id)
	if err != nil {
		return nil, err
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return nil, ErrClosed
	}
	svid, err := ca.issueLocked(sid, time.Now(), "Issue")
	if err != nil {
		return nil, err
	}
	ca.wakeScheduler() // the issuing authority may now retire later
	return svid, nil
}

// Bundle returns the X.509 bundle for the trust domain as published right now:
// the active CA plus any pending and retired ones. The caller owns the result.
func (ca *CA) Bundle() *x509bundle.Bundle {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	return ca.bundleLocked()
}

// GetX509BundleForTrustDomain makes the CA an x509bundle.Source, so it can be
// handed directly to verifiers in tests.
func (ca *CA) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != ca.td {
		return nil, fmt.Errorf("devca: no bundle for trust domain %q (serving %q)", td.Name(), ca.td.Name())
	}
	return ca.Bundle(), nil
}

// RotateNow re-issues the SVID of every registered workload at once and pushes
// the new ones to connected streams.
func (ca *CA) RotateNow() error {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return ErrClosed
	}
	now := time.Now()
	for _, id := range ca.order {
		if err := ca.rotateLocked(ca.workloads[id], now, "forced"); err != nil {
			return err
		}
	}
	ca.notifyLocked()
	ca.wakeScheduler()
	return nil
}

// RollOption adjusts one CA rollover.
type RollOption func(*rollConfig)

type rollConfig struct {
	overlap time.Duration
}

// RollOverlap sets how long the new CA is published before it starts signing,
// instead of Options.CAOverlap. The overlap is cut short if the active CA would
// otherwise have to sign SVIDs that outlive it. Zero activates the new CA in
// the same step, right after publishing it: fine for tests of the mechanics,
// but workloads then have no time to learn the new CA before they meet SVIDs
// signed by it.
func RollOverlap(d time.Duration) RollOption {
	return func(c *rollConfig) { c.overlap = d }
}

// RollCA starts a CA rollover. Phase 1 happens before RollCA returns: a new CA
// is generated and published in the bundle next to the active one, signing
// nothing yet. Phase 2 follows after the overlap (or at ActivateCA): the new CA
// signs every SVID issued from then on, and the old one retires. Phase 3: the
// retired CA leaves the bundle once the last SVID it signed has expired.
// Subscribe or Status show each phase.
func (ca *CA) RollCA(opts ...RollOption) error {
	cfg := rollConfig{overlap: ca.caOverlap}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.overlap < 0 {
		return fmt.Errorf("devca: rollover overlap %v: must not be negative", cfg.overlap)
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return ErrClosed
	}
	if ca.pending != nil {
		return ErrRollInProgress
	}
	now := time.Now()
	if err := ca.publishLocked(now, cfg.overlap, "requested"); err != nil {
		return err
	}
	if cfg.overlap == 0 {
		ca.activateLocked(now)
	}
	ca.wakeScheduler()
	return nil
}

// ActivateCA ends the overlap of a rollover now: the pending CA starts signing
// and the active one retires. It does not re-issue SVIDs; call RotateNow for
// that.
func (ca *CA) ActivateCA() error {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return ErrClosed
	}
	if ca.pending == nil {
		return ErrNoPendingCA
	}
	ca.activateLocked(time.Now())
	ca.wakeScheduler()
	return nil
}

// Serve ties the CA's lifetime to ctx: it blocks until ctx is done (or the CA
// is closed) and then closes the CA. Workloads are served from AddWorkload on
// whether or not Serve runs.
func (ca *CA) Serve(ctx context.Context) error {
	select {
	case <-ctx.Done():
	case <-ca.done:
	}
	return ca.Close()
}

// Close stops every Workload API server and the scheduler, waits for all of
// their goroutines, closes the event channels and removes the sockets (and the
// socket directory if New created it). It is safe to call more than once.
func (ca *CA) Close() error {
	ca.closeOnce.Do(func() {
		ca.mu.Lock()
		ca.closed = true
		close(ca.done)
		var servers []*grpc.Server
		var paths []string
		for _, id := range ca.order {
			w := ca.workloads[id]
			servers = append(servers, w.server)
			paths = append(paths, w.path)
		}
		ca.mu.Unlock()

		// Stream handlers return on ca.done; Stop cuts the connections and,
		// with WaitForHandlers, waits for the handlers to be gone.
		for _, s := range servers {
			s.Stop()
		}
		ca.wg.Wait()

		var errs []error
		for _, p := range paths {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("devca: removing socket: %w", err))
			}
		}
		if err := ca.removeDir(); err != nil {
			errs = append(errs, err)
		}

		ca.mu.Lock()
		for s := range ca.subs {
			close(s.ch)
			delete(ca.subs, s)
		}
		ca.mu.Unlock()
		ca.closeErr = errors.Join(errs...)
		ca.log.Info("development CA closed", "warning", Warning)
	})
	return ca.closeErr
}

func (ca *CA) removeDir() error {
	if !ca.ownDir {
		return nil
	}
	if err := os.RemoveAll(ca.socketDir); err != nil {
		return fmt.Errorf("devca: removing socket directory: %w", err)
	}
	return nil
}

func (ca *CA) parseID(id string) (spiffeid.ID, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("devca: SPIFFE ID %q: %w", id, err)
	}
	if sid.TrustDomain() != ca.td {
		return spiffeid.ID{}, fmt.Errorf("devca: SPIFFE ID %q: not in trust domain %q", id, ca.td.Name())
	}
	return sid, nil
}

// bundleLocked builds the published bundle: retired, active, pending.
func (ca *CA) bundleLocked() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, ca.authorityCertsLocked())
}

func (ca *CA) authorityCertsLocked() []*x509.Certificate {
	certs := make([]*x509.Certificate, 0, len(ca.retired)+2)
	for _, a := range ca.retired {
		certs = append(certs, a.cert)
	}
	certs = append(certs, ca.active.cert)
	if ca.pending != nil {
		certs = append(certs, ca.pending.cert)
	}
	return certs
}

// issueLocked signs an SVID with the active CA and records how long that CA
// must stay in the bundle because of it.
func (ca *CA) issueLocked(id spiffeid.ID, now time.Time, reason string) (*x509svid.SVID, error) {
	svid, err := ca.active.sign(id, now, ca.svidTTL)
	if err != nil {
		return nil, fmt.Errorf("devca: %w", err)
	}
	leaf := svid.Certificates[0]
	if leaf.NotAfter.After(ca.active.lastSVIDExpiry) {
		ca.active.lastSVIDExpiry = leaf.NotAfter
	}
	ca.log.Info("issued SVID",
		"spiffe_id", id.String(),
		"serial", serialHex(leaf),
		"not_after", leaf.NotAfter,
		"ca_serial", serialHex(ca.active.cert),
		"reason", reason)
	ca.emitLocked(Event{Kind: EventSVIDIssued, Time: now, SVID: svid, CA: ca.active.cert})
	return svid, nil
}

// rotateLocked gives w a fresh SVID and schedules the next one. The caller
// notifies streams.
func (ca *CA) rotateLocked(w *workload, now time.Time, reason string) error {
	svid, err := ca.issueLocked(w.id, now, reason)
	if err != nil {
		return err
	}
	certDER, keyDER, err := svid.MarshalRaw()
	if err != nil {
		return fmt.Errorf("devca: encoding SVID for %s: %w", w.id, err)
	}
	leaf := svid.Certificates[0]
	w.svid, w.certDER, w.keyDER = svid, certDER, keyDER
	w.rotateAt = now.Add(ca.rotateEvery)
	// An SVID cut short by its CA's expiry is replaced at half of what it got.
	if life := leaf.NotAfter.Sub(now); life < ca.svidTTL {
		w.rotateAt = now.Add(min(ca.rotateEvery, life/2))
	}
	return nil
}

// publishLocked is phase 1 of a rollover: a new CA enters the bundle.
func (ca *CA) publishLocked(now time.Time, overlap time.Duration, reason string) error {
	next, err := newAuthority(ca.td, now, ca.caTTL)
	if err != nil {
		return fmt.Errorf("devca: rolling CA: %w", err)
	}
	next.activateAt = now.Add(overlap)
	ca.pending = next
	ca.bundleGen++
	ca.log.Warn("published new CA in bundle; not signing yet",
		"ca_serial", serialHex(next.cert),
		"ca_not_after", next.cert.NotAfter,
		"activate_at", next.activateAt,
		"reason", reason,
		"warning", Warning)
	ca.emitLocked(Event{Kind: EventCAPublished, Time: now, CA: next.cert})
	ca.notifyLocked()
	return nil
}

// activateLocked is phase 2: the pending CA signs from now on, the active one
// retires and stays published until its last SVID has expired (phase 3, in
// dropRetiredLocked).
func (ca *CA) activateLocked(now time.Time) {
	old := ca.active
	ca.active, ca.pending = ca.pending, nil
	ca.active.activateAt = now
	ca.retired = append(ca.retired, old)
	ca.log.Warn("new CA now signing; old CA retired",
		"ca_serial", serialHex(ca.active.cert),
		"retired_ca_serial", serialHex(old.cert),
		"retired_until", old.lastSVIDExpiry,
		"warning", Warning)
	ca.emitLocked(Event{Kind: EventCAActivated, Time: now, CA: ca.active.cert})
	// The bundle is unchanged, but streams are woken anyway: cheap, and it keeps
	// "every phase is pushed" true without special cases.
	ca.notifyLocked()
}

// dropRetiredLocked is phase 3: retired CAs whose every SVID has expired leave
// the bundle. Certificates are valid up to and including NotAfter, hence After.
func (ca *CA) dropRetiredLocked(now time.Time) {
	var dropped []*authority
	kept := make([]*authority, 0, len(ca.retired))
	for _, a := range ca.retired {
		if now.After(a.lastSVIDExpiry) {
			dropped = append(dropped, a)
		} else {
			kept = append(kept, a)
		}
	}
	if len(dropped) == 0 {
		return
	}
	ca.retired = kept
	ca.bundleGen++
	for _, a := range dropped {
		ca.log.Warn("dropped retired CA from bundle: its last SVID has expired",
			"ca_serial", serialHex(a.cert),
			"last_svid_expiry", a.lastSVIDExpiry,
			"warning", Warning)
		ca.emitLocked(Event{Kind: EventCADropped, Time: now, CA: a.cert})
	}
	ca.notifyLocked()
}

// rollAt is when a timed rollover of the active CA starts: at half its life,
// or earlier if the overlap plus one SVID lifetime would not fit before it
// expires.
func (ca *CA) rollAtLocked() time.Time {
	c := ca.active.cert
	half := c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
	// The slack absorbs timer lateness and whole-second certificate times, so
	// the full overlap fits before the CA must hand over.
	const slack = time.Second
	latest := c.NotAfter.Add(-ca.caOverlap - ca.svidTTL - slack)
	return later(c.NotBefore, earlier(half, latest))
}

// activateAtLocked is when the pending CA takes over: at the end of its
// overlap, or earlier if the active CA could otherwise no longer issue a
// full-length SVID (a long overlap asked of a short-lived CA).
func (ca *CA) activateAtLocked() time.Time {
	return earlier(ca.pending.activateAt, ca.active.cert.NotAfter.Add(-ca.svidTTL))
}

// schedule runs every timed step (SVID rotation, CA activation, retirement and
// timed rollover) in the one goroutine, so the steps never race each other.
func (ca *CA) schedule() {
	defer ca.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := ca.step(time.Now())
		timer.Reset(time.Until(next))
		select {
		case <-ca.done:
			return
		case <-ca.wake:
		case <-timer.C:
		}
	}
}

// step performs whatever is due at now and returns when it should run next.
func (ca *CA) step(now time.Time) time.Time {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return now.Add(time.Hour)
	}
	changed := false
	if ca.pending == nil && !now.Before(ca.rollAtLocked()) && !now.Before(ca.rollRetryAt) {
		if err := ca.publishLocked(now, ca.caOverlap, "timed"); err != nil {
			ca.log.Error("timed CA rollover failed", "error", err, "warning", Warning)
			ca.rollRetryAt = now.Add(time.Second)
		}
	}
	if ca.pending != nil && !now.Before(ca.activateAtLocked()) {
		ca.activateLocked(now)
	}
	for _, id := range ca.order {
		w := ca.workloads[id]
		if !now.Before(w.rotateAt) {
			if err := ca.rotateLocked(w, now, "scheduled"); err != nil {
				ca.log.Error("SVID rotation failed", "spiffe_id", id.String(), "error", err, "warning", Warning)
				w.rotateAt = now.Add(time.Second) // try again soon
				continue
			}
			changed = true
		}
	}
	ca.dropRetiredLocked(now)
	if changed {
		ca.notifyLocked()
	}

	next := now.Add(time.Hour)
	if ca.pending != nil {
		next = earlier(next, ca.activateAtLocked())
	} else {
		next = earlier(next, later(ca.rollAtLocked(), ca.rollRetryAt))
	}
	for _, a := range ca.retired {
		next = earlier(next, a.lastSVIDExpiry.Add(time.Millisecond))
	}
	for _, w := range ca.workloads {
		next = earlier(next, w.rotateAt)
	}
	return next
}

// wakeScheduler makes the scheduler recompute its next deadline.
func (ca *CA) wakeScheduler() {
	select {
	case ca.wake <- struct{}{}:
	default:
	}
}

// notifyLocked wakes every Workload API stream to compare what it last sent
// with the current state.
func (ca *CA) notifyLocked() {
	close(ca.changed)
	ca.changed = make(chan struct{})
}

func serialHex(c *x509.Certificate) string { return fmt.Sprintf("%x", c.SerialNumber) }

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
