package kube_test

import (
	"context"
	"errors"
	"math"
	"net"
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
	mu      sync.Mutex
	started map[string]time.Time
	stopped map[string]time.Time
	overlap []string
}

func watchLeaders(t *testing.T, rs ...*replica) *leaders {
	l := &leaders{started: map[string]time.Time{}, stopped: map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		<-done
		if l.overlap != nil {
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
	waitFor(t, "cp-b to take over", b.ctl.Leading)
	_, aStopped := l.times("cp-a")
	bStarted, _ := l.times("cp-b")
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
		if err := api.Delete(context.Background(), "ghost", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the replica to create the Lease once deleted", r.ctl.Leading)
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
