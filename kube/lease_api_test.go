package kube_test

import (
	"context"
	"errors"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

// The replicas of these tests hold a Lease of 3 s, renew every 200 ms and
// give up 2 s after their last renewal (replicaOptions in harness_test.go).
const (
	testLeaseDuration = 3 * time.Second
	testRenewDeadline = 2 * time.Second
)

var leaseGVR = schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}

// leaders samples which replicas lead, every millisecond, until the test
// ends: when each started and stopped leading, and whether two ever led at
// once.
type leaders struct {
	mu         sync.Mutex
	started    map[string]time.Time
	stopped    map[string]time.Time
	overlap    []string
	mayOverlap bool
}

// allowOverlap is for a test where something other than the replicas
// writes the Lease: two leading at once is then not a failure.
func (l *leaders) allowOverlap() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mayOverlap = true
}

func watchLeaders(t *testing.T, rs ...*replica) *leaders {
	l := &leaders{started: map[string]time.Time{}, stopped: map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		<-done
		if l.overlap != nil && !l.mayOverlap {
			t.Errorf("two replicas led at once: %v", l.overlap)
		}
	})
	go func() {
		defer close(done)
		was := map[string]bool{}
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			<-tick.C
			now := time.Now()
			var leading []string
			l.mu.Lock()
			for _, r := range rs {
				is := r.ctl.Leading()
				if is {
					leading = append(leading, r.name)
				}
				if is && !was[r.name] {
					l.started[r.name] = now
				}
				if !is && was[r.name] {
					l.stopped[r.name] = now
				}
				was[r.name] = is
			}
			if len(leading) > 1 && l.overlap == nil {
				l.overlap = leading
			}
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *leaders) times(name string) (started, stopped time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.started[name], l.stopped[name]
}

// waitStarted waits until the sampler has seen name lead, and returns when.
// Waiting on the replica itself would not do: on a busy machine the sampler
// may not yet have run since, and a time it has not recorded reads as zero.
func (l *leaders) waitStarted(t *testing.T, name string) time.Time {
	t.Helper()
	waitFor(t, name+" to lead", func() bool { started, _ := l.times(name); return !started.IsZero() })
	started, _ := l.times(name)
	return started
}

// waitStopped waits until the sampler has seen name stop leading, and
// returns when, for the same reason.
func (l *leaders) waitStopped(t *testing.T, name string) time.Time {
	t.Helper()
	waitFor(t, name+" to stop leading", func() bool { _, stopped := l.times(name); return !stopped.IsZero() })
	_, stopped := l.times(name)
	return stopped
}

// cutOff dials the API server over real sockets until cut: then it closes
// every connection it made and new ones hang until their request gives up
// (a partition, the worst case for a leader: its writes neither succeed nor
// fail), until restored.
type cutOff struct {
	mu    sync.Mutex
	cut   chan struct{} // closed while cut
	conns map[net.Conn]struct{}
}

func newCutOff() *cutOff { return &cutOff{conns: map[net.Conn]struct{}{}} }

func (d *cutOff) config(base *rest.Config) *rest.Config {
	cfg := rest.CopyConfig(base)
	cfg.Dial = d.dial
	return cfg
}

func (d *cutOff) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	cut := d.cut
	d.mu.Unlock()
	if cut != nil {
		<-ctx.Done()
		return nil, errors.New("cut off from the API server")
	}
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cut != nil {
		c.Close()
		return nil, errors.New("cut off from the API server")
	}
	d.conns[c] = struct{}{}
	return c, nil
}

func (d *cutOff) setCut(cut bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if cut && d.cut == nil {
		d.cut = make(chan struct{})
		for c := range d.conns {
			c.Close()
		}
		clear(d.conns)
	}
	if !cut && d.cut != nil {
		close(d.cut)
		d.cut = nil
	}
}

func leaseOf(t *testing.T, api dynamic.ResourceInterface, name string) (holder string, duration, transitions int64) {
	t.Helper()
	u, err := api.Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("Lease %s: %v", name, err)
	}
	holder, _, _ = unstructured.NestedString(u.Object, "spec", "holderIdentity")
	duration, _, _ = unstructured.NestedInt64(u.Object, "spec", "leaseDurationSeconds")
	transitions, _, _ = unstructured.NestedInt64(u.Object, "spec", "leaseTransitions")
	return holder, duration, transitions
}

// TestLeaderCutOffFromTheAPIServer: the leader loses its API server (a
// partition: requests hang). It stops writing status within the renew
// deadline of its last renewal — before the Lease can expire for the other
// replica, which takes over once it has seen the Lease unchanged for its
// duration. Back on the network, the old leader finds the Lease held and
// stays a follower; when the new leader stops, it takes over at once.
func TestLeaderCutOffFromTheAPIServer(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "cutoff")
	link := newCutOff()
	a := m.replica("cp-a", replicaOptions{lease: "cutoff", cfg: link.config(c.Config)})
	waitFor(t, "cp-a to lead", a.ctl.Leading)
	b := m.replica("cp-b", replicaOptions{lease: "cutoff"})
	l := watchLeaders(t, a, b)
	api := dynamic.NewForConfigOrDie(c.Config).Resource(leaseGVR).Namespace(controlPlaneNS)
	_, _, before := leaseOf(t, api, "cutoff")

	cut := time.Now()
	link.setCut(true)
	// Both times as the sampler saw them: it samples both replicas at once,
	// so once it has seen cp-b lead it has seen whether cp-a still did.
	bStarted := l.waitStarted(t, "cp-b")
	_, aStopped := l.times("cp-a")
	t.Logf("cut at 0: cp-a stopped writing status at %v, cp-b took over at %v", aStopped.Sub(cut).Round(time.Millisecond), bStarted.Sub(cut).Round(time.Millisecond))
	switch {
	case aStopped.IsZero() || !aStopped.Before(bStarted):
		t.Fatalf("cp-a still led when cp-b took over (stopped %v, cp-b started %v)", aStopped, bStarted)
	case aStopped.Sub(cut) > testRenewDeadline+500*time.Millisecond:
		// It renewed at most once before the cut, so its deadline fell
		// within testRenewDeadline of it.
		t.Errorf("cp-a led %v after the cut, past its renew deadline (%v)", aStopped.Sub(cut), testRenewDeadline)
	case bStarted.Sub(cut) > testLeaseDuration+2*time.Second:
		t.Errorf("cp-b took %v to take over a Lease of %v", bStarted.Sub(cut), testLeaseDuration)
	}
	if holder, duration, transitions := leaseOf(t, api, "cutoff"); holder != "cp-b" || duration != 3 || transitions != before+1 {
		t.Errorf("Lease after the takeover: holder %q, %d s, %d transitions (before: %d)", holder, duration, transitions, before)
	}

	// Back: cp-a reads the Lease held by cp-b, renewed, and waits.
	link.setCut(false)
	time.Sleep(testLeaseDuration + 500*time.Millisecond)
	if a.ctl.Leading() || !b.ctl.Leading() {
		t.Fatalf("after cp-a came back: cp-a leading %v, cp-b leading %v", a.ctl.Leading(), b.ctl.Leading())
	}
	stop := time.Now()
	b.stop()
	waitFor(t, "cp-a to take over from cp-b, released", a.ctl.Leading)
	if took := time.Since(stop); took >= testLeaseDuration {
		t.Errorf("cp-a took %v to take over a released Lease: waited for it to expire", took)
	}
}

// TestHostileLease: a Lease found in any state — garbled, held by no replica,
// renewed "in the future", its transition count at the maximum, its
// duration refused by the API server — neither crashes a replica nor stops
// the election for good: a free or expired Lease is taken, a live one is
// waited for as observed on this replica's clock, never on the holder's.
func TestHostileLease(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "hostile-lease")
	api := dynamic.NewForConfigOrDie(c.Config).Resource(leaseGVR).Namespace(controlPlaneNS)
	future := time.Now().Add(10000 * time.Hour).UTC().Format(metav1.RFC3339Micro)
	create := func(name string, spec map[string]any) error {
		_, err := api.Create(context.Background(), &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
			"metadata": map[string]any{"name": name}, "spec": spec,
		}}, metav1.CreateOptions{})
		return err
	}
	for _, tt := range []struct {
		name        string
		spec        map[string]any
		transitions int64 // once taken
	}{
		{"no-fields", map[string]any{}, 1},
		{"no-holder", map[string]any{"leaseDurationSeconds": int64(3600), "renewTime": future, "leaseTransitions": int64(2)}, 3},
		{"no-duration", map[string]any{"holderIdentity": "ghost", "renewTime": future}, 1},
		{"ghost-renewing-in-the-future", map[string]any{"holderIdentity": "ghost", "leaseDurationSeconds": int64(1), "renewTime": future, "acquireTime": future, "leaseTransitions": int64(5)}, 6},
		{"transitions-at-the-maximum", map[string]any{"holderIdentity": "ghost", "leaseDurationSeconds": int64(1), "leaseTransitions": int64(math.MaxInt32)}, math.MaxInt32},
		{"odd-holder", map[string]any{"holderIdentity": "☃ \"cp-0\"; DROP TABLE leases", "leaseDurationSeconds": int64(1)}, 1},
		{"negative-duration", map[string]any{"holderIdentity": "ghost", "leaseDurationSeconds": int64(-5)}, 1},
		{"negative-transitions", map[string]any{"holderIdentity": "ghost", "leaseTransitions": int64(-3)}, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			want := tt.transitions
			if err := create(tt.name, tt.spec); err != nil {
				if !apierrors.IsInvalid(err) {
					t.Fatal(err)
				}
				// The API server keeps such a Lease out (TestReadLeaseHostile
				// reads one anyway): the replica creates its own.
				t.Logf("refused by the API server: %v", err)
				want = 0
			}
			r := m.replica("cp-"+tt.name, replicaOptions{lease: tt.name})
			waitFor(t, "the replica to take the Lease", r.ctl.Leading)
			if holder, duration, transitions := leaseOf(t, api, tt.name); holder != r.name || duration != 3 || transitions != want {
				t.Errorf("Lease: holder %q, %d s, %d transitions; want %q, 3 s, %d", holder, duration, transitions, r.name, want)
			}
		})
	}

	t.Run("held-by-a-live-ghost", func(t *testing.T) {
		if err := create("ghost", map[string]any{"holderIdentity": "ghost", "leaseDurationSeconds": int64(3600)}); err != nil {
			t.Fatal(err)
		}
		r := m.replica("cp-waiting", replicaOptions{lease: "ghost"})
		time.Sleep(10 * 200 * time.Millisecond) // ten attempts
		if r.ctl.Leading() {
			t.Fatal("took a Lease held by another, not expired")
		}
		u, err := api.Get(context.Background(), "ghost", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		u.Object["spec"] = map[string]any{"holderIdentity": "", "leaseDurationSeconds": int64(1)} // as a holder releases it
		if _, err := api.Update(context.Background(), u, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		released := time.Now()
		waitFor(t, "the replica to take the Lease once released", r.ctl.Leading)
		if took := time.Since(released); took > time.Second {
			t.Errorf("took a released Lease after %v: waited for it to expire", took)
		}
	})

	// The Lease of a holder not known to have stopped is deleted (kubectl
	// delete lease): that holder may go on leading until it notices, so the
	// Lease is created again only once its term, as observed, has run out.
	t.Run("deleted-under-a-live-ghost", func(t *testing.T) {
		if err := create("deleted-ghost", map[string]any{"holderIdentity": "ghost", "leaseDurationSeconds": int64(4)}); err != nil {
			t.Fatal(err)
		}
		start := time.Now() // the replica sees the Lease after this
		r := m.replica("cp-after-ghost", replicaOptions{lease: "deleted-ghost"})
		time.Sleep(time.Second)
		if err := api.Delete(context.Background(), "deleted-ghost", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the replica to create the Lease", r.ctl.Leading)
		if took := time.Since(start); took < 4*time.Second || took > 8*time.Second {
			t.Errorf("created the Lease of a 4 s term deleted under its holder %v after first seeing it", took)
		}
	})

	// An intruder overwrites the Lease the leader holds with a long one of
	// its own: the leader stops at once, and neither replica leads while the
	// intruder's Lease lives.
	t.Run("overwritten-while-held", func(t *testing.T) {
		a := m.replica("cp-held-a", replicaOptions{lease: "overwritten"})
		waitFor(t, "cp-held-a to lead", a.ctl.Leading)
		b := m.replica("cp-held-b", replicaOptions{lease: "overwritten"})
		watchLeaders(t, a, b)
		u, err := api.Get(context.Background(), "overwritten", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		u.Object["spec"] = map[string]any{"holderIdentity": "intruder", "leaseDurationSeconds": int64(3600)}
		for {
			if _, err = api.Update(context.Background(), u, metav1.UpdateOptions{}); !apierrors.IsConflict(err) {
				break
			}
			if u, err = api.Get(context.Background(), "overwritten", metav1.GetOptions{}); err != nil {
				t.Fatal(err)
			}
			u.Object["spec"] = map[string]any{"holderIdentity": "intruder", "leaseDurationSeconds": int64(3600)}
		}
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "cp-held-a to stop leading", func() bool { return !a.ctl.Leading() })
		time.Sleep(testLeaseDuration)
		if a.ctl.Leading() || b.ctl.Leading() {
			t.Fatalf("a replica took the intruder's live Lease: cp-held-a %v, cp-held-b %v", a.ctl.Leading(), b.ctl.Leading())
		}
		if holder, _, _ := leaseOf(t, api, "overwritten"); holder != "intruder" {
			t.Fatalf("the intruder's Lease was overwritten by %q", holder)
		}
	})

	// Four replicas start at once on a Lease that does not exist: one
	// creates it, the others get a conflict; one leads.
	t.Run("racing-to-create", func(t *testing.T) {
		var rs []*replica
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, name := range []string{"cp-race-0", "cp-race-1", "cp-race-2", "cp-race-3"} {
			wg.Go(func() {
				r := m.replica(name, replicaOptions{lease: "race"})
				mu.Lock()
				rs = append(rs, r)
				mu.Unlock()
			})
		}
		wg.Wait()
		watchLeaders(t, rs...)
		waitFor(t, "one replica to lead", func() bool {
			for _, r := range rs {
				if r.ctl.Leading() {
					return true
				}
			}
			return false
		})
		time.Sleep(time.Second)
	})
}

// TestHostileLeaseHolders: another party writes the Lease a replica leads
// on. A foreign holder that keeps renewing is never taken over, however its
// clock is set (its renewTime an hour behind, as a node with a skewed clock
// would write it): a replica judges expiry by when it saw the record change,
// never by the record's times; once the foreign holder stops, the Lease is
// taken after its duration. A Lease deleted, or released by someone else,
// under the leader ends its term at once: another replica may be leading on
// it already.
func TestHostileLeaseHolders(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "lease-holders")
	api := dynamic.NewForConfigOrDie(c.Config).Resource(leaseGVR).Namespace(controlPlaneNS)

	t.Run("foreign-holder-renewing-with-a-skewed-clock", func(t *testing.T) {
		skewed := func(i int) map[string]any {
			at := time.Now().Add(-time.Hour).Add(time.Duration(i) * time.Microsecond).UTC().Format(metav1.RFC3339Micro)
			return map[string]any{"holderIdentity": "foreign", "leaseDurationSeconds": int64(1), "leaseTransitions": int64(4),
				"acquireTime": at, "renewTime": at}
		}
		u, err := api.Create(context.Background(), &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
			"metadata": map[string]any{"name": "foreign"}, "spec": skewed(0),
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// The foreign holder renews every 300 ms, a third of its 1 s lease.
		ctx, cancel := context.WithCancel(context.Background())
		renewing := make(chan struct{})
		go func() {
			defer close(renewing)
			cur := u
			for i := 1; ctx.Err() == nil; i++ {
				select {
				case <-ctx.Done():
					return
				case <-time.After(300 * time.Millisecond):
				}
				cur.Object["spec"] = skewed(i)
				var err error
				if cur, err = api.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
					if ctx.Err() == nil {
						t.Errorf("the foreign holder's renewal: %v", err)
					}
					return
				}
			}
		}()
		defer func() { cancel(); <-renewing }()
		r := m.replica("cp-skew", replicaOptions{lease: "foreign"})
		l := watchLeaders(t, r)
		time.Sleep(3 * time.Second) // three times the lease, fifteen attempts
		if started, _ := l.times("cp-skew"); !started.IsZero() {
			t.Fatalf("took over a Lease renewed every 300 ms, because its renewTime is an hour old")
		}
		cancel()
		<-renewing
		stopped := time.Now()
		waitFor(t, "the replica to take the Lease once the foreign holder stopped", r.ctl.Leading)
		// Its last renewal was at most 300 ms before it stopped; the replica
		// saw it at most RetryPeriod × 2.2 (440 ms) later, and takes the
		// Lease at the first attempt 1 s after that.
		if took := time.Since(stopped); took < 700*time.Millisecond || took > 3500*time.Millisecond {
			t.Errorf("took the Lease %v after its holder stopped renewing a 1 s lease", took)
		}
		if holder, duration, transitions := leaseOf(t, api, "foreign"); holder != "cp-skew" || duration != 3 || transitions != 5 {
			t.Errorf("Lease: holder %q, %d s, %d transitions; want cp-skew, 3 s, 5", holder, duration, transitions)
		}
	})

	// intrude has the leader of lease find it deleted, or released by
	// someone else: it stops leading at its next renewal, and a replica
	// (itself in a new term, or the other) leads again; never two at once
	// unless the Lease was forged.
	intrude := func(t *testing.T, lease string, forged bool, do func(u *unstructured.Unstructured) error) {
		a := m.replica(lease+"-a", replicaOptions{lease: lease})
		waitFor(t, "the first replica to lead", a.ctl.Leading)
		b := m.replica(lease+"-b", replicaOptions{lease: lease})
		l := watchLeaders(t, a, b)
		if forged {
			// The other replica may take the Lease at once, before the
			// leader's next renewal tells it the Lease is not its own.
			l.allowOverlap()
		}
		time.Sleep(100 * time.Millisecond)
		for {
			u, err := api.Get(context.Background(), lease, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err = do(u); err == nil {
				break
			} else if !apierrors.IsConflict(err) {
				t.Fatal(err)
			}
		}
		at := time.Now()
		stopped := l.waitStopped(t, a.name)
		t.Logf("the leader stopped %v after", stopped.Sub(at).Round(time.Millisecond))
		if stopped.Sub(at) > 1500*time.Millisecond {
			t.Errorf("the leader stopped %v after: not at its next renewal but near its renew deadline", stopped.Sub(at))
		}
		waitFor(t, "a replica to lead again", func() bool { return a.ctl.Leading() || b.ctl.Leading() })
		time.Sleep(500 * time.Millisecond)
	}
	t.Run("deleted-while-held", func(t *testing.T) {
		intrude(t, "deleted", false, func(u *unstructured.Unstructured) error {
			return api.Delete(context.Background(), u.GetName(), metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: ptr(u.GetResourceVersion())}})
		})
	})
	t.Run("released-by-another-while-held", func(t *testing.T) {
		intrude(t, "released", true, func(u *unstructured.Unstructured) error {
			u.Object["spec"].(map[string]any)["holderIdentity"] = ""
			_, err := api.Update(context.Background(), u, metav1.UpdateOptions{})
			return err
		})
	})
}

func ptr[T any](v T) *T { return &v }

// gate holds the first Lease update of each of n clients until all n have
// sent one, so that they race on the same resourceVersion.
type gate struct {
	mu      sync.Mutex
	n       int
	arrived chan struct{} // closed when n have arrived
}

func newGate(n int) *gate { return &gate{n: n, arrived: make(chan struct{})} }

// config is base for one client whose first Lease update waits at the gate.
func (g *gate) config(base *rest.Config) *rest.Config {
	cfg := rest.CopyConfig(base)
	var once sync.Once
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripper(func(req *http.Request) (*http.Response, error) {
			if req.Method == http.MethodPut && strings.Contains(req.URL.Path, "/leases/") {
				once.Do(func() {
					g.mu.Lock()
					if g.n--; g.n == 0 {
						close(g.arrived)
					}
					g.mu.Unlock()
					select {
					case <-g.arrived:
					case <-time.After(20 * time.Second):
					}
				})
			}
			return rt.RoundTrip(req)
		})
	})
	return cfg
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(req *http.Request) (*http.Response, error) { return f(req) }

// TestCandidatesRaceForAnExpiredLease: two replicas find the same expired
// Lease and both write themselves as its holder on the same
// resourceVersion, at the same moment: the API server takes one write and
// refuses the other as a conflict; one replica leads, the other, having lost
// the race, waits.
func TestCandidatesRaceForAnExpiredLease(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "lease-race")
	api := dynamic.NewForConfigOrDie(c.Config).Resource(leaseGVR).Namespace(controlPlaneNS)
	if _, err := api.Create(context.Background(), &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
		"metadata": map[string]any{"name": "expired"},
		"spec":     map[string]any{"holderIdentity": "gone", "leaseDurationSeconds": int64(1), "leaseTransitions": int64(7)},
	}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	g := newGate(2)
	a := m.replica("cp-race-a", replicaOptions{lease: "expired", cfg: g.config(c.Config)})
	b := m.replica("cp-race-b", replicaOptions{lease: "expired", cfg: g.config(c.Config)})
	l := watchLeaders(t, a, b)
	select {
	case <-g.arrived:
	case <-time.After(20 * time.Second):
		t.Fatal("the two replicas did not both try to take the Lease")
	}
	waitFor(t, "a replica to lead", func() bool { return a.ctl.Leading() || b.ctl.Leading() })
	time.Sleep(testLeaseDuration) // the loser keeps waiting: the winner renews
	aStarted, _ := l.times(a.name)
	bStarted, _ := l.times(b.name)
	if !aStarted.IsZero() && !bStarted.IsZero() {
		t.Errorf("both replicas led (cp-race-a from %v, cp-race-b from %v)", aStarted, bStarted)
	}
	winner := a.name
	if b.ctl.Leading() {
		winner = b.name
	}
	if holder, duration, transitions := leaseOf(t, api, "expired"); holder != winner || duration != 3 || transitions != 8 {
		t.Errorf("Lease: holder %q, %d s, %d transitions; want %s, 3 s, 8", holder, duration, transitions, winner)
	}
}

// TestLeaseAcrossAPIServerRestart: the API server goes away for longer than
// the Lease while two replicas run. The leader stops writing status within
// its renew deadline, nobody leads while it is down, and once it is back one
// replica leads, never two.
func TestLeaseAcrossAPIServerRestart(t *testing.T) {
	c := cluster(t)
	m := newMesh(t, c, "lease-restart")
	a := m.replica("cp-restart-a", replicaOptions{lease: "restart-lease"})
	waitFor(t, "cp-restart-a to lead", a.ctl.Leading)
	b := m.replica("cp-restart-b", replicaOptions{lease: "restart-lease"})
	l := watchLeaders(t, a, b)

	down := time.Now()
	c.StopAPIServer()
	restarted := false
	defer func() {
		if !restarted {
			_ = c.StartAPIServer(context.Background())
		}
	}()
	stopped := l.waitStopped(t, a.name)
	t.Logf("API server down at 0: cp-restart-a stopped leading at %v", stopped.Sub(down).Round(time.Millisecond))
	if stopped.Sub(down) > testRenewDeadline+500*time.Millisecond {
		t.Errorf("cp-restart-a led %v after the API server went away, past its renew deadline (%v)", stopped.Sub(down), testRenewDeadline)
	}
	time.Sleep(testLeaseDuration + time.Second)
	if a.ctl.Leading() || b.ctl.Leading() {
		t.Fatalf("a replica leads without an API server: cp-restart-a %v, cp-restart-b %v", a.ctl.Leading(), b.ctl.Leading())
	}
	start := time.Now()
	if err := c.StartAPIServer(context.Background()); err != nil {
		t.Fatal(err)
	}
	restarted = true
	back := time.Now()
	waitFor(t, "a replica to lead after the restart", func() bool { return a.ctl.Leading() || b.ctl.Leading() })
	t.Logf("API server restarted at %v, ready %v later; a replica leads %v after that", start.Sub(down).Round(time.Millisecond),
		back.Sub(start).Round(time.Millisecond), time.Since(back).Round(time.Millisecond))
	time.Sleep(time.Second) // watchLeaders looks for two at once meanwhile
	api := dynamic.NewForConfigOrDie(c.Config).Resource(leaseGVR).Namespace(controlPlaneNS)
	holder, _, _ := leaseOf(t, api, "restart-lease")
	if (holder == a.name) != a.ctl.Leading() || (holder == b.name) != b.ctl.Leading() {
		t.Errorf("Lease held by %q; cp-restart-a leading %v, cp-restart-b %v", holder, a.ctl.Leading(), b.ctl.Leading())
	}
}
