package devca_test

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"latch.dev/latch/identity/devca"
)

func TestTimedRotationReachesTheSourceWithoutReconnecting(t *testing.T) {
	t.Parallel() // waits on wall-clock expiry, not CPU
	ca := newCA(t, devca.Options{SVIDTTL: 2 * time.Second, RotateEvery: 200 * time.Millisecond})
	addr := addWorkload(t, ca, "spiffe://devca.test/rotating")
	ctx := testContext(t)

	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	w := watch(t, addr)

	first, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := src.WaitUntilUpdated(ctx); err != nil {
			t.Fatalf("source saw no rotation: %v", err)
		}
	}
	rotated, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if rotated.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) == 0 {
		t.Errorf("source still holds serial %x after rotations", first.Certificates[0].SerialNumber)
	}
	if rotated.ID != first.ID {
		t.Errorf("rotation changed the ID from %s to %s", first.ID, rotated.ID)
	}

	// The watcher's one stream delivers successive SVIDs; it never had to
	// reconnect, and the server still counts a single stream per client.
	a := w.next(t).DefaultSVID()
	b := w.until(t, func(c *workloadapi.X509Context) bool {
		return c.DefaultSVID().Certificates[0].SerialNumber.Cmp(a.Certificates[0].SerialNumber) != 0
	}, nil).DefaultSVID()
	if !b.Certificates[0].NotAfter.After(a.Certificates[0].NotBefore) {
		t.Errorf("rotated SVID is not newer")
	}
	if errs := w.watchErrors(); len(errs) != 0 {
		t.Errorf("watch stream broke during rotation: %v", errs)
	}
	if st := ca.Status().Workloads[0]; st.Streams != 2 {
		t.Errorf("server counts %d open FetchX509SVID streams, want 2 (source + watcher)", st.Streams)
	}
}

func TestRotateNowReissuesEverySVID(t *testing.T) {
	ca := newCA(t, devca.Options{}) // hour-long SVIDs: only RotateNow rotates here
	wa := watch(t, addWorkload(t, ca, "spiffe://devca.test/a"))
	wb := watch(t, addWorkload(t, ca, "spiffe://devca.test/b"))
	a0, b0 := wa.next(t).DefaultSVID(), wb.next(t).DefaultSVID()

	if err := ca.RotateNow(); err != nil {
		t.Fatal(err)
	}
	a1, b1 := wa.next(t).DefaultSVID(), wb.next(t).DefaultSVID()
	for _, p := range []struct{ before, after *x509svid.SVID }{{a0, a1}, {b0, b1}} {
		if p.before.Certificates[0].SerialNumber.Cmp(p.after.Certificates[0].SerialNumber) == 0 {
			t.Errorf("%s: RotateNow pushed the same serial", p.before.ID)
		}
		if p.before.ID != p.after.ID {
			t.Errorf("%s became %s", p.before.ID, p.after.ID)
		}
	}
}

// ledger checks the property that makes a rollover cost no handshake: at the
// instant of every event, every SVID issued so far and not yet expired verifies
// against the bundle published at that instant.
type ledger struct {
	svids []*x509svid.SVID
}

func (l *ledger) observe(t *testing.T, e devca.Event) {
	t.Helper()
	if e.Kind == devca.EventSVIDIssued {
		l.svids = append(l.svids, e.SVID)
		if e.SVID.Certificates[0].NotAfter.After(e.CA.NotAfter) {
			t.Errorf("SVID %s outlives the CA that signed it (%s > %s)", e.SVID.ID, e.SVID.Certificates[0].NotAfter, e.CA.NotAfter)
		}
	}
	for _, s := range l.svids {
		leaf := s.Certificates[0]
		if e.Time.After(leaf.NotAfter) {
			continue
		}
		if _, _, err := x509svid.Verify(s.Certificates, e.Bundle, x509svid.WithTime(e.Time)); err != nil {
			t.Errorf("at %s (%s): unexpired SVID %s serial %x does not verify against the published bundle: %v",
				e.Kind, e.Time.Format(time.StampMilli), s.ID, leaf.SerialNumber, err)
		}
	}
}

// lastExpiryBy is the latest expiry of the SVIDs signed by ca so far.
func (l *ledger) lastExpiryBy(ca *x509.Certificate) time.Time {
	var last time.Time
	for _, s := range l.svids {
		if signedBy(s, ca) && s.Certificates[0].NotAfter.After(last) {
			last = s.Certificates[0].NotAfter
		}
	}
	return last
}

// await reads events, checking each with the ledger, until one of kind
// arrives, and returns it.
func await(t *testing.T, events <-chan devca.Event, l *ledger, kind devca.EventKind, check func(devca.Event)) devca.Event {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e, ok := <-events:
			if !ok {
				t.Fatalf("event channel closed while waiting for %s", kind)
			}
			l.observe(t, e)
			if check != nil {
				check(e)
			}
			if e.Kind == kind {
				return e
			}
		case <-timeout:
			t.Fatalf("no %s event within 10s", kind)
		}
	}
}

func inBundle(e devca.Event, c *x509.Certificate) bool { return e.Bundle.HasX509Authority(c) }

func TestCARolloverPhases(t *testing.T) {
	t.Parallel() // waits on wall-clock expiry, not CPU
	ca := newCA(t, devca.Options{SVIDTTL: 2 * time.Second, RotateEvery: time.Second, CATTL: time.Hour})
	events, stop := ca.Subscribe(4096)
	t.Cleanup(stop)
	var l ledger

	wa := watch(t, addWorkload(t, ca, "spiffe://devca.test/a"))
	wb := watch(t, addWorkload(t, ca, "spiffe://devca.test/b"))
	wa.next(t)
	wb.next(t)
	oldCA := ca.Status().Active()

	// Phase 1: the new CA is published and signs nothing.
	if err := ca.RollCA(devca.RollOverlap(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := ca.RollCA(); err != devca.ErrRollInProgress {
		t.Errorf("second RollCA during a rollover: %v, want ErrRollInProgress", err)
	}
	published := await(t, events, &l, devca.EventCAPublished, nil)
	newCA := published.CA
	if !inBundle(published, oldCA) || !inBundle(published, newCA) {
		t.Fatalf("after publication the bundle must hold both CAs")
	}
	st := ca.Status()
	if len(st.Authorities) != 2 || st.Authorities[0].State != devca.AuthorityActive || st.Authorities[1].State != devca.AuthorityPending ||
		!st.Authorities[1].Certificate.Equal(newCA) {
		t.Fatalf("status after publication: %s, want active old CA + pending new CA", st)
	}
	// Both workloads learn the new CA while still holding SVIDs from the old one.
	for _, w := range []*watcher{wa, wb} {
		w.until(t, func(c *workloadapi.X509Context) bool { return bundleOf(t, c).HasX509Authority(newCA) },
			func(c *workloadapi.X509Context) {
				if !signedBy(c.DefaultSVID(), oldCA) {
					t.Errorf("%s got an SVID not signed by the old CA before activation", c.DefaultSVID().ID)
				}
			})
	}

	// Phase 2: the new CA signs; the old one stays published.
	if err := ca.ActivateCA(); err != nil {
		t.Fatal(err)
	}
	activated := await(t, events, &l, devca.EventCAActivated, func(e devca.Event) {
		if e.Kind == devca.EventSVIDIssued && !signedBy(e.SVID, oldCA) {
			t.Errorf("SVID %s signed by the new CA before activation", e.SVID.ID)
		}
	})
	if !activated.CA.Equal(newCA) || !inBundle(activated, oldCA) {
		t.Fatalf("activation: CA %x, old CA still published %v", activated.CA.SerialNumber, inBundle(activated, oldCA))
	}
	if err := ca.ActivateCA(); err != devca.ErrNoPendingCA {
		t.Errorf("ActivateCA with nothing pending: %v, want ErrNoPendingCA", err)
	}
	st = ca.Status()
	if st.Active() == nil || !st.Active().Equal(newCA) || st.Authorities[0].State != devca.AuthorityRetired {
		t.Fatalf("status after activation: %s, want retired old CA + active new CA", st)
	}
	if err := ca.RotateNow(); err != nil {
		t.Fatal(err)
	}
	// Each workload's new SVID verifies against the bundle its peer holds.
	var latest [2]*workloadapi.X509Context
	for i, w := range []*watcher{wa, wb} {
		latest[i] = w.until(t, func(c *workloadapi.X509Context) bool { return signedBy(c.DefaultSVID(), newCA) }, nil)
	}
	for i := range latest {
		peer := latest[1-i]
		if _, _, err := x509svid.Verify(latest[i].DefaultSVID().Certificates, peer.Bundles); err != nil {
			t.Errorf("%s's new SVID fails against its peer's bundle: %v", latest[i].DefaultSVID().ID, err)
		}
	}

	// Phase 3: the old CA goes only once its last SVID has expired.
	dropped := await(t, events, &l, devca.EventCADropped, func(e devca.Event) {
		if e.Kind == devca.EventSVIDIssued && !signedBy(e.SVID, newCA) {
			t.Errorf("SVID %s signed by the old CA after activation", e.SVID.ID)
		}
	})
	if !dropped.CA.Equal(oldCA) {
		t.Fatalf("dropped CA %x, want the old one %x", dropped.CA.SerialNumber, oldCA.SerialNumber)
	}
	if last := l.lastExpiryBy(oldCA); !dropped.Time.After(last) {
		t.Errorf("old CA dropped at %s, before its last SVID expired at %s", dropped.Time, last)
	}
	if inBundle(dropped, oldCA) || !inBundle(dropped, newCA) {
		t.Errorf("after the drop the bundle must hold the new CA only")
	}
	for _, w := range []*watcher{wa, wb} {
		w.until(t, func(c *workloadapi.X509Context) bool { return !bundleOf(t, c).HasX509Authority(oldCA) }, nil)
		if errs := w.watchErrors(); len(errs) != 0 {
			t.Errorf("watch stream broke during rollover: %v", errs)
		}
	}
	if st := ca.Status(); len(st.Authorities) != 1 || !st.Active().Equal(newCA) {
		t.Errorf("status after the drop: %s, want the new CA only", st)
	}
}

// TestTimedCARollover lets a short-lived CA roll over on its own, with two
// workloads watching, and checks the ordering of the phases and the
// verification property at every event.
func TestTimedCARollover(t *testing.T) {
	t.Parallel() // waits on wall-clock expiry, not CPU
	ca := newCA(t, devca.Options{
		SVIDTTL:     time.Second,
		RotateEvery: 300 * time.Millisecond,
		CAOverlap:   500 * time.Millisecond,
		CATTL:       3 * time.Second,
	})
	events, stop := ca.Subscribe(4096)
	t.Cleanup(stop)
	var l ledger
	first := ca.Status().Active()

	wa := watch(t, addWorkload(t, ca, "spiffe://devca.test/a"))
	wb := watch(t, addWorkload(t, ca, "spiffe://devca.test/b"))

	published := await(t, events, &l, devca.EventCAPublished, nil)
	second := published.CA
	publishedAt := published.Time
	activated := await(t, events, &l, devca.EventCAActivated, func(e devca.Event) {
		if e.Kind == devca.EventSVIDIssued && signedBy(e.SVID, second) {
			t.Errorf("SVID signed by the new CA during the overlap")
		}
	})
	if !activated.CA.Equal(second) {
		t.Fatalf("activated %x, want the published CA %x", activated.CA.SerialNumber, second.SerialNumber)
	}
	if overlap := activated.Time.Sub(publishedAt); overlap < 500*time.Millisecond {
		t.Errorf("new CA signed %v after publication, want at least the 500ms overlap", overlap)
	}
	dropped := await(t, events, &l, devca.EventCADropped, nil)
	if !dropped.CA.Equal(first) || !dropped.Time.After(l.lastExpiryBy(first)) {
		t.Errorf("dropped %x at %s; want the first CA, after its last SVID expired at %s",
			dropped.CA.SerialNumber, dropped.Time, l.lastExpiryBy(first))
	}
	if first.NotAfter.Before(l.lastExpiryBy(first)) {
		t.Errorf("first CA expires at %s, before an SVID it signed (%s)", first.NotAfter, l.lastExpiryBy(first))
	}

	// From the workloads' side: whenever one of them holds an SVID from the
	// second CA, the other's bundle already trusts it.
	var latest [2]*workloadapi.X509Context
	for i, w := range []*watcher{wa, wb} {
	drain:
		for {
			select {
			case c := <-w.updates:
				latest[i] = c
			default:
				break drain
			}
		}
		if latest[i] == nil {
			t.Fatalf("watcher %d got nothing", i)
		}
	}
	for i := range latest {
		if _, _, err := x509svid.Verify(latest[i].DefaultSVID().Certificates, latest[1-i].Bundles); err != nil {
			t.Errorf("%s's SVID fails against its peer's bundle after the rollover: %v", latest[i].DefaultSVID().ID, err)
		}
		if errs := []*watcher{wa, wb}[i].watchErrors(); len(errs) != 0 {
			t.Errorf("watch stream broke during rollover: %v", errs)
		}
	}
}

// TestLongOverlapIsCutShortBeforeTheCAExpires asks a three-second CA for an
// hour of overlap: the new CA must take over while the old one can still sign
// full-length SVIDs.
func TestLongOverlapIsCutShortBeforeTheCAExpires(t *testing.T) {
	t.Parallel() // waits on wall-clock expiry, not CPU
	const svidTTL = time.Second
	ca := newCA(t, devca.Options{SVIDTTL: svidTTL, RotateEvery: 400 * time.Millisecond, CATTL: 3 * time.Second})
	events, stop := ca.Subscribe(4096)
	t.Cleanup(stop)
	var l ledger
	addWorkload(t, ca, "spiffe://devca.test/a")
	old := ca.Status().Active()
	if err := ca.RollCA(devca.RollOverlap(time.Hour)); err != nil {
		t.Fatal(err)
	}
	activated := await(t, events, &l, devca.EventCAActivated, nil)
	if deadline := old.NotAfter.Add(-svidTTL); activated.Time.After(deadline.Add(100 * time.Millisecond)) {
		t.Errorf("new CA activated at %s, after the old one could last sign a full SVID (%s)", activated.Time, deadline)
	}
	for _, s := range l.svids {
		if signedBy(s, old) && s.Certificates[0].NotAfter.Sub(s.Certificates[0].NotBefore) < svidTTL {
			t.Errorf("old CA issued a short SVID (%s) instead of handing over", s.Certificates[0].NotAfter.Sub(s.Certificates[0].NotBefore))
		}
	}
}
