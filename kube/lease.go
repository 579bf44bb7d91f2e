package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// The election of the status writer: a coordination.k8s.io Lease, held the
// way client-go's tools/leaderelection holds one, written through the
// dynamic client.
//
// Why not client-go's leaderelection: the package imports the generated
// clientset and its informers (every API group's types, clients, listers and
// apply configurations) and so registers all of them in
// k8s.io/client-go/kubernetes/scheme at package init. latch is one binary:
// that init runs in every sidecar, which never talks to the API server. It
// cost each sidecar 16 MB of binary, 83 more packages initialised, 1.5 MB
// more heap at start and 14 MB more RSS at rest, 1.3 MB of it anonymous
// (figures in docs/performance.md); a regression test in cmd/latch keeps it
// out.
//
// The algorithm is client-go's (tryAcquireOrRenew, release): a candidate
// takes the Lease when it is free (no holder) or when the record has not
// changed for leaseDurationSeconds *as this replica observed it* — its own
// clock, never the holder's renewTime, so skew between nodes does not matter;
// the holder renews every RetryPeriod; every write is conditional on the
// resourceVersion read (or last written), so of two candidates acting on the
// same record one gets a conflict; leaseTransitions counts changes of holder;
// a holder that stops writes an empty holder so the next takes over at once.
// Three choices are stricter than client-go's, all on the side of never
// having two writers:
//   - the renew deadline runs from the start of the last successful renewal,
//     not from the start of a retry round, and the holder stops writing status
//     the moment it passes (client-go can overrun it by a RetryPeriod);
//   - a renewal that finds the Lease naming another holder, or none, or gone
//     ends leadership at once instead of retrying until the deadline, even
//     where the Lease could be taken again (someone else may be leading on
//     it already: the next term starts from what it reads);
//   - status writers have stopped before the Lease is released, and release
//     checks that the Lease it read still names this replica (client-go's
//     writes an empty holder over whichever replica took the Lease meanwhile);
//   - a Lease deleted while another replica held it is created only once
//     that holder's term, as observed, has run out (client-go creates it at
//     once, while the holder may lead until its next renewal).
//
// Nothing but the replicas should write the Lease: a holder forged or
// released by someone else is taken at once, and the leader, which finds out
// at its next renewal, may lead beside the new holder until then, a
// RetryPeriod at most.
//
// And a hostile or garbled Lease (any holder, durations of any sign, fields
// missing or of the wrong type, leaseTransitions at its maximum) is read as
// "free" or "held" without error, never as two holders.

var leases = schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}

// jitterFactor spreads the candidates' attempts to acquire, as client-go's
// leaderelection.JitterFactor.
const jitterFactor = 1.2

// validateElection checks the election's timing as client-go's
// NewLeaderElector does, and one thing more: the Lease stores whole seconds,
// so RenewDeadline must be shorter than the whole seconds of LeaseDuration
// (a 500 ms lease would be written as 0 s: expired to every other replica).
func validateElection(leaseDuration, renewDeadline, retryPeriod time.Duration) error {
	switch {
	case leaseDuration < time.Second:
		return fmt.Errorf("LeaseDuration %v: at least 1s (the Lease counts whole seconds)", leaseDuration)
	case renewDeadline <= 0 || retryPeriod <= 0:
		return fmt.Errorf("RenewDeadline %v and RetryPeriod %v must be positive", renewDeadline, retryPeriod)
	case renewDeadline >= leaseDuration.Truncate(time.Second):
		return fmt.Errorf("RenewDeadline %v must be shorter than LeaseDuration %v (in whole seconds)", renewDeadline, leaseDuration)
	case renewDeadline <= time.Duration(jitterFactor*float64(retryPeriod)):
		return fmt.Errorf("RenewDeadline %v must be longer than %v × RetryPeriod %v", renewDeadline, jitterFactor, retryPeriod)
	}
	return nil
}

// leaseRecord is what a Lease's spec says about its holder.
type leaseRecord struct {
	holder      string
	duration    time.Duration // leaseDurationSeconds; zero when absent, negative or unreadable: expired
	acquire     time.Time
	renew       time.Time
	transitions int32
	raw         string // the spec as read, to notice any change of it
	unreadable  bool   // the object carries no spec map at all
	noVersion   bool   // the object has no resourceVersion: a write could not be conditional
}

// readLease reads u's spec, whatever it holds: the API server validates a
// Lease, but nothing here relies on it.
func readLease(u *unstructured.Unstructured) leaseRecord {
	var r leaseRecord
	spec, ok := u.Object["spec"].(map[string]any)
	r.unreadable = !ok && u.Object["spec"] != nil
	raw, err := json.Marshal(u.Object["spec"]) // map keys sorted: the same spec, the same text
	if err != nil {
		raw = []byte(fmt.Sprintf("%#v", u.Object["spec"]))
	}
	r.raw = string(raw)
	r.noVersion = u.GetResourceVersion() == ""
	r.holder, _ = spec["holderIdentity"].(string)
	if s, ok := integer(spec["leaseDurationSeconds"]); ok && s > 0 {
		r.duration = time.Duration(min(s, math.MaxInt32)) * time.Second
	}
	if n, ok := integer(spec["leaseTransitions"]); ok && n > 0 {
		r.transitions = int32(min(n, math.MaxInt32))
	}
	r.acquire = microTime(spec["acquireTime"])
	r.renew = microTime(spec["renewTime"])
	return r
}

// integer reads a JSON number as unstructured content holds it.
func integer(v any) (int64, bool) {
	switch n := v.(type) {
	case int64:
		return n, true
	case int32:
		return int64(n), true
	case int:
		return int64(n), true
	case float64:
		if n != n || n > math.MaxInt64 || n < math.MinInt64 { // NaN, or out of range
			return 0, false
		}
		return int64(n), true
	}
	return 0, false
}

func microTime(v any) time.Time {
	s, _ := v.(string)
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}
	}
	return t
}

// spec is the Lease spec saying r, as client-go's
// LeaderElectionRecordToLeaseSpec writes it.
func (r leaseRecord) spec() map[string]any {
	return map[string]any{
		"holderIdentity":       r.holder,
		"leaseDurationSeconds": int64(r.duration / time.Second),
		"acquireTime":          r.acquire.UTC().Format(metav1.RFC3339Micro),
		"renewTime":            r.renew.UTC().Format(metav1.RFC3339Micro),
		"leaseTransitions":     int64(r.transitions),
	}
}

// election is one replica's candidacy for one term: Run acquires the Lease,
// leads while it renews it and releases it. Its state belongs to the goroutine
// calling Run; a fresh election starts each term, as client-go builds a
// LeaderElector per term.
type election struct {
	leases                                    dynamic.ResourceInterface
	name, identity                            string
	leaseDuration, renewDeadline, retryPeriod time.Duration
	log                                       *slog.Logger
	onNewLeader                               func(holder string)

	lease      *unstructured.Unstructured // as last read or written: its resourceVersion conditions the next write
	observed   leaseRecord
	observedAt time.Time // when this replica saw the record change, by its own clock
	reported   string    // the holder last passed to onNewLeader
	lost       bool      // the Lease was found deleted while this replica held it
}

func (e *election) isLeader() bool { return e.observed.holder == e.identity }

// valid says whether the observed record is live at now: it has not changed
// for less than its duration, as seen from here.
func (e *election) valid(now time.Time) bool {
	return e.observedAt.Add(e.observed.duration).After(now)
}

func (e *election) observe(r leaseRecord, at time.Time) {
	e.observed, e.observedAt = r, at
}

// term is how long a leader may still write: until the renew deadline of
// its last renewal. lead's context ends when the goroutine renewing the
// Lease finds the term over, but that goroutine may get to run late (a
// starved process, a renewal that does not return at its deadline), and
// another replica may take the Lease leaseDuration after the last renewal
// it saw, whatever this one does. So each write of the leader's takes its
// context from the term: none is sent, and none goes on, after the deadline.
type term struct {
	end atomic.Pointer[time.Time] // with the monotonic reading: immune to clock steps
}

func newTerm(renewed time.Time, renewDeadline time.Duration) *term {
	t := &term{}
	t.extend(renewed, renewDeadline)
	return t
}

// extend moves the end of the term after a renewal that started at renewed.
func (t *term) extend(renewed time.Time, renewDeadline time.Duration) {
	end := renewed.Add(renewDeadline)
	t.end.Store(&end)
}

// live says whether the term has not ended at the time of the call.
func (t *term) live() bool { return time.Now().Before(*t.end.Load()) }

// context returns ctx bounded by the end of the term as it stands now.
func (t *term) context(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithDeadline(ctx, *t.end.Load())
}

// Run takes part in one term until ctx is done or leadership is lost: it
// tries to acquire the Lease every RetryPeriod (jittered); once it holds it,
// lead runs with a context that ends when a renewal fails past RenewDeadline,
// when another replica is found holding the Lease, or with ctx, and with the
// term its writes are bounded by. The Lease is released after lead has
// returned.
func (e *election) Run(ctx context.Context, lead func(context.Context, *term)) {
	var renewed time.Time // start of the last successful write: the renew deadline runs from it
	for {
		now := time.Now()
		ok := e.tryAcquireOrRenew(ctx, now, false)
		e.reportLeader()
		if ok {
			renewed = now
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(e.retryPeriod + time.Duration(rand.Float64()*jitterFactor*float64(e.retryPeriod))):
		}
	}

	leadCtx, stop := context.WithCancel(ctx)
	t := newTerm(renewed, e.renewDeadline)
	done := make(chan struct{})
	go func() { defer close(done); lead(leadCtx, t) }()
	reason := e.renew(ctx, renewed, t)
	stop()
	<-done
	if reason != "" {
		e.log.Warn("leadership lost: no longer writing status", "lease", e.name, "reason", reason)
	}
	e.release()
}

// renew renews the Lease every RetryPeriod until ctx is done ("" returned)
// or leadership is lost (why returned), extending t at each renewal.
func (e *election) renew(ctx context.Context, renewed time.Time, t *term) string {
	timer := time.NewTimer(e.retryPeriod)
	defer timer.Stop()
	for {
		deadline := renewed.Add(e.renewDeadline)
		wait := min(e.retryPeriod, time.Until(deadline))
		timer.Reset(max(wait, 0))
		select {
		case <-ctx.Done():
			return ""
		case <-timer.C:
		}
		now := time.Now()
		if !now.Before(deadline) {
			return fmt.Sprintf("not renewed within the renew deadline (%v)", e.renewDeadline)
		}
		rctx, cancel := context.WithDeadline(ctx, deadline)
		ok := e.tryAcquireOrRenew(rctx, now, true)
		cancel()
		e.reportLeader()
		switch {
		case ctx.Err() != nil:
			return ""
		case ok:
			renewed = now
			t.extend(renewed, e.renewDeadline)
		case e.lost:
			return "the Lease was deleted"
		case !e.isLeader() && e.observed.holder == "":
			return "the Lease was released by another"
		case !e.isLeader():
			return fmt.Sprintf("the Lease is held by %q", e.observed.holder)
		}
	}
}

// tryAcquireOrRenew is client-go's: it writes this replica as holder if the
// Lease is free, expired as observed from here, or already this replica's.
// When renewing, it only renews: a Lease found naming another holder, or
// none, or deleted, ends the term even if it could be taken, since another
// replica may have taken it meanwhile and be leading already; a new term
// (and a new lead) starts from what it reads.
func (e *election) tryAcquireOrRenew(ctx context.Context, now time.Time, renewing bool) bool {
	want := leaseRecord{holder: e.identity, duration: e.leaseDuration.Truncate(time.Second), acquire: now, renew: now}

	// Fast path: the holder renews on the resourceVersion it last wrote,
	// without reading first. A conflict means the Lease changed meanwhile.
	if e.isLeader() && e.valid(now) && e.lease != nil {
		want.acquire, want.transitions = e.observed.acquire, e.observed.transitions
		if err := e.write(ctx, want); err == nil {
			return true
		} else if ctx.Err() == nil {
			e.log.Debug("Lease not renewed on the last version written; reading it", "lease", e.name, "reason", err)
		}
	}

	u, err := e.leases.Get(ctx, e.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err) && renewing:
		e.lost = true
		return false
	case apierrors.IsNotFound(err):
		if e.observed.holder != "" && !e.isLeader() && e.valid(now) {
			// Deleted under a holder this replica saw alive: it may lead
			// until its next renewal finds the Lease gone, so its term
			// is waited out as if the Lease were still there.
			return false
		}
		return e.create(ctx, want)
	case err != nil:
		if ctx.Err() == nil {
			e.log.Warn("Lease not read", "lease", e.name, "reason", err)
		}
		return false
	}
	e.lease = u
	got := readLease(u)
	if got.raw != e.observed.raw {
		e.observe(got, time.Now())
	}
	if got.unreadable || got.noVersion {
		// Not a Lease this code can write conditionally: no holder is
		// better than two.
		e.log.Warn("Lease unreadable; not competing for it", "lease", e.name, "spec", clip(got.raw, 256))
		return false
	}
	if renewing && !e.isLeader() {
		return false
	}
	if got.holder != "" && e.valid(now) && !e.isLeader() {
		return false // held, and alive as far as this replica can tell
	}
	if e.isLeader() {
		want.acquire, want.transitions = got.acquire, got.transitions
	} else if got.transitions < math.MaxInt32 {
		want.transitions = got.transitions + 1
	} else {
		want.transitions = got.transitions // a count at its limit stays there rather than wrap negative (refused by validation)
	}
	if err := e.write(ctx, want); err != nil {
		if ctx.Err() == nil && !apierrors.IsConflict(err) {
			e.log.Warn("Lease not written", "lease", e.name, "reason", err)
		}
		return false
	}
	return true
}

// write replaces the spec of the Lease last read or written with r, on its
// resourceVersion: it fails with a conflict if anyone wrote in between.
func (e *election) write(ctx context.Context, r leaseRecord) error {
	if e.lease == nil || e.lease.GetResourceVersion() == "" {
		return errors.New("no resourceVersion to write on")
	}
	u := e.lease.DeepCopy()
	u.Object["spec"] = r.spec()
	got, err := e.leases.Update(ctx, u, metav1.UpdateOptions{FieldManager: FieldManager})
	if err != nil {
		return err
	}
	e.lease = got
	e.observe(readLease(got), time.Now())
	return nil
}

func (e *election) create(ctx context.Context, r leaseRecord) bool {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
		"metadata": map[string]any{"name": e.name, "labels": map[string]any{"app.kubernetes.io/managed-by": "latch"}},
		"spec":     r.spec(),
	}}
	got, err := e.leases.Create(ctx, u, metav1.CreateOptions{FieldManager: FieldManager})
	if err != nil {
		if ctx.Err() == nil && !apierrors.IsAlreadyExists(err) {
			e.log.Warn("Lease not created", "lease", e.name, "reason", err)
		}
		return false
	}
	e.lease = got
	e.observe(readLease(got), time.Now())
	return true
}

// release gives the Lease up so that another replica takes over at once
// rather than after LeaseDuration: an empty holder and a one-second
// duration, as client-go's release writes. Only a Lease that still names
// this replica is released.
func (e *election) release() {
	ctx, cancel := context.WithTimeout(context.Background(), e.renewDeadline)
	defer cancel()
	for ctx.Err() == nil {
		u, err := e.leases.Get(ctx, e.name, metav1.GetOptions{})
		if err != nil {
			if !apierrors.IsNotFound(err) {
				e.log.Warn("Lease not released; another replica takes over when it expires", "lease", e.name, "reason", err)
			}
			return
		}
		got := readLease(u)
		if got.holder != e.identity || got.unreadable || got.noVersion {
			return // not ours any more: nothing to give up
		}
		e.lease = u
		now := time.Now()
		err = e.write(ctx, leaseRecord{duration: time.Second, acquire: now, renew: now, transitions: got.transitions})
		switch {
		case err == nil:
			e.log.Info("Lease released", "lease", e.name)
			return
		case !apierrors.IsConflict(err):
			e.log.Warn("Lease not released; another replica takes over when it expires", "lease", e.name, "reason", err)
			return
		}
	}
}

// reportLeader tells onNewLeader when the observed holder changes.
func (e *election) reportLeader() {
	if h := e.observed.holder; h != e.reported {
		e.reported = h
		if h != "" && e.onNewLeader != nil {
			e.onNewLeader(h)
		}
	}
}
