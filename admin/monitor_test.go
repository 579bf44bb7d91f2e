package admin

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"log/slog"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// settle returns once the evaluation in progress has finished: Run
// receives from updated only between evaluations, so a completed send on the
// unbuffered channel means the previous one is done (and starts another,
// which changes nothing the test has not already seen).
func settle(updated chan<- struct{}) { updated <- struct{}{} }

// runMonitor starts mon.Run and stops it at the end of the test.
func runMonitor(t *testing.T, mon *IdentityMonitor) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- mon.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

// TestMetricsAfterTraffic scrapes /metrics over HTTP after real handshakes
// with the test endpoint, accepted and refused, and checks every latch
// metric of the package against what happened and what the source holds.
func TestMetricsAfterTraffic(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	src := ca.Source(t, sidecarID)
	reg := prometheus.NewPedanticRegistry()
	mon := NewIdentityMonitor(src, MonitorOptions{TrustDomain: td, Logger: slog.New(slog.DiscardHandler)})
	reg.MustRegister(mon)
	if err := RegisterBuildInfo(reg, "v1.2.3-test"); err != nil {
		t.Fatal(err)
	}
	base := startServer(t, Options{Gatherer: reg})
	nobody := identity.NewAllowList()
	open := startTestEndpoint(t, src, TestEndpointOptions{Registerer: reg})
	for range 3 {
		if _, _, err := dialEndpoint(t, ca, open.Addr().String(), identity.Modern()); err != nil {
			t.Fatal(err)
		}
	}
	closedReg := prometheus.NewRegistry()
	closed := startTestEndpoint(t, src, TestEndpointOptions{Allow: &nobody, Registerer: closedReg})
	if _, _, err := dialEndpoint(t, ca, closed.Addr().String(), identity.Modern()); err == nil {
		t.Fatal("deny-all test endpoint answered")
	}
	runMonitor(t, mon)
	// Each connection is counted when the endpoint's goroutine for it ends,
	// which can be just after the client has its answer (or its refusal).
	waitCount(t, reg, MetricTestEndpointConnections, "result", "ok", 3)
	waitCount(t, closedReg, MetricTestEndpointConnections, "result", string(identity.ClassNotAllowed), 1)

	fams := scrape(t, base)
	svid, _ := src.GetX509SVID()
	leaf := svid.Certificates[0]
	checks := []struct {
		name   string
		labels []string
		want   float64
		tol    float64
	}{
		{MetricTestEndpointConnections, []string{"result=ok"}, 3, 0},
		{MetricBuildInfo, []string{"version=v1.2.3-test"}, 1, 0},
		{MetricSVIDExpiry, nil, time.Until(leaf.NotAfter).Seconds(), 60},
		{MetricCAExpiry, []string{"trust_domain=mesh.test", "subject_key_id=" + keyID(ca.Cert()), "subject=" + ca.Cert().Subject.CommonName},
			time.Until(ca.Cert().NotAfter).Seconds(), 60},
		{MetricBundleCAs, []string{"trust_domain=mesh.test"}, 1, 0},
	}
	for _, c := range checks {
		got, ok := value(fams, c.name, c.labels...)
		if !ok {
			t.Errorf("%s%v not exported", c.name, c.labels)
			continue
		}
		if math.Abs(got-c.want) > c.tol {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// The refusal is counted by class on the other endpoint's registry.
	if n := testutilCount(t, closedReg, MetricTestEndpointConnections, "result", string(identity.ClassNotAllowed)); n != 1 {
		t.Errorf("refused connections counted %v, want 1", n)
	}
}

// waitCount waits (bounded) until the counter reaches want; the assertions
// that follow check the exact value.
func waitCount(t *testing.T, g prometheus.Gatherer, name, label, value string, want float64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if testutilCount(t, g, name, label, value) >= want {
			return
		}
	}
}

func testutilCount(t *testing.T, g prometheus.Gatherer, name, label, value string) float64 {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == label && l.GetValue() == value {
					return m.Counter.GetValue()
				}
			}
		}
	}
	return 0
}

// TestSVIDNearExpiryAlarm: an SVID within the threshold raises the WARN line
// and the alarm metric; after rotation to a fresh SVID the alarm clears and
// the rotation is logged and counted.
func TestSVIDNearExpiryAlarm(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	src := ca.Source(t, sidecarID, identitytest.NotAfter(time.Now().Add(2*time.Minute)))
	logs := newLogRecorder()
	updated := make(chan struct{})
	reg := prometheus.NewRegistry()
	mon := NewIdentityMonitor(src, MonitorOptions{
		TrustDomain:    td,
		SVIDWarnBefore: 5 * time.Minute,
		Updated:        updated,
		Interval:       time.Hour,
		Logger:         slog.New(logs),
	})
	reg.MustRegister(mon)
	base := startServer(t, Options{Gatherer: reg})
	runMonitor(t, mon)

	attrs := logs.wait(t, slog.LevelWarn, "X.509-SVID expires soon")
	if attrs["spiffe_id"] != sidecarID || attrs["not_after"] == "" {
		t.Errorf("warning attributes %v", attrs)
	}
	settle(updated)
	fams := scrape(t, base)
	if v, _ := value(fams, MetricExpiryAlarm, "kind=svid"); v != 1 {
		t.Errorf("svid alarm = %v, want 1", v)
	}
	if v, _ := value(fams, MetricExpiryWarns, "kind=svid"); v != 1 {
		t.Errorf("svid warnings = %v, want 1", v)
	}

	src.SetSVID(ca.SVID(t, sidecarID))
	updated <- struct{}{}
	logs.wait(t, slog.LevelInfo, "X.509-SVID rotated")
	settle(updated)
	fams = scrape(t, base)
	if v, ok := value(fams, MetricExpiryAlarm, "kind=svid"); !ok || v != 0 {
		t.Errorf("svid alarm after rotation = %v (exported %v), want 0", v, ok)
	}
	if v, _ := value(fams, MetricSVIDRotations); v != 1 {
		t.Errorf("rotations = %v, want 1", v)
	}
	if n := logs.count(slog.LevelWarn, "X.509-SVID expires soon"); n != 0 {
		t.Errorf("%d more warnings after rotation", n)
	}
}

// TestBundleCAAlarmsAndRollover walks a CA rollover: the old CA alone near
// its end is an alarm; a successor CA added to the bundle is logged and
// turns the alarm into a planned rollover; removing the old CA is logged
// as a WARN and counted.
func TestBundleCAAlarmsAndRollover(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain) // valid for a day
	src := ca.Source(t, sidecarID)
	logs := newLogRecorder()
	updated := make(chan struct{})
	reg := prometheus.NewRegistry()
	// The clock stands 23 hours ahead: the old CA has an hour left.
	now := func() time.Time { return time.Now().Add(23 * time.Hour) }
	mon := NewIdentityMonitor(src, MonitorOptions{
		TrustDomain:    td,
		CAWarnBefore:   2 * time.Hour,
		SVIDWarnBefore: time.Minute,
		Updated:        updated,
		Interval:       time.Hour,
		Logger:         slog.New(logs),
		Now:            now,
	})
	reg.MustRegister(mon)
	base := startServer(t, Options{Gatherer: reg})
	runMonitor(t, mon)

	attrs := logs.wait(t, slog.LevelWarn, "bundle CA expires soon and no successor CA is in the bundle")
	if attrs["subject"] != ca.Cert().Subject.String() || attrs["subject_key_id"] != keyID(ca.Cert()) {
		t.Errorf("alarm attributes %v", attrs)
	}
	settle(updated)
	fams := scrape(t, base)
	if v, _ := value(fams, MetricExpiryAlarm, "kind=bundle_ca"); v != 1 {
		t.Errorf("bundle_ca alarm = %v, want 1", v)
	}
	if v, _ := value(fams, MetricCAExpiry, "subject_key_id="+keyID(ca.Cert())); v > 3600 || v < 3500 {
		t.Errorf("CA expiry seconds = %v, want about 3600", v)
	}

	// The successor arrives.
	next := longLivedCA(t, "root CA mesh.test 2", time.Now().Add(30*24*time.Hour))
	src.SetBundle(x509bundle.FromX509Authorities(td, []*x509.Certificate{ca.Cert(), next}))
	updated <- struct{}{}
	added := logs.wait(t, slog.LevelInfo, "bundle CA added")
	if added["subject"] != "CN=root CA mesh.test 2" || added["cas"] != "2" {
		t.Errorf("added attributes %v", added)
	}
	logs.wait(t, slog.LevelInfo, "bundle CA nears expiry; a successor CA is in the bundle")
	settle(updated)
	fams = scrape(t, base)
	if v, _ := value(fams, MetricExpiryAlarm, "kind=bundle_ca"); v != 0 {
		t.Errorf("bundle_ca alarm with successor = %v, want 0", v)
	}
	if v, _ := value(fams, MetricBundleChanges, "change=added"); v != 1 {
		t.Errorf("added = %v, want 1", v)
	}
	if v, _ := value(fams, MetricBundleCAs); v != 2 {
		t.Errorf("bundle CAs = %v, want 2", v)
	}

	// The old CA leaves the bundle.
	src.SetBundle(x509bundle.FromX509Authorities(td, []*x509.Certificate{next}))
	updated <- struct{}{}
	removed := logs.wait(t, slog.LevelWarn, "bundle CA removed")
	if removed["subject"] != ca.Cert().Subject.String() {
		t.Errorf("removed attributes %v", removed)
	}
	settle(updated)
	fams = scrape(t, base)
	if v, _ := value(fams, MetricBundleChanges, "change=removed"); v != 1 {
		t.Errorf("removed = %v, want 1", v)
	}
	if n := logs.count(slog.LevelWarn, "bundle CA expires soon and no successor CA is in the bundle"); n != 0 {
		t.Errorf("%d alarms repeated within RepeatWarning", n)
	}
}

// TestReissuedCA: a CA re-issued with the same key and subject shares its
// subject key ID with the original; both must still be exported (distinct
// series), or the whole scrape would fail.
func TestReissuedCA(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	a := caWithKey(t, key, "root", time.Now().Add(24*time.Hour))
	b := caWithKey(t, key, "root", time.Now().Add(48*time.Hour))
	if keyID(a) != keyID(b) {
		t.Fatalf("test setup: subject key IDs differ")
	}
	ca := identitytest.NewCA(t, trustDomain)
	src := identitytest.NewSource(ca.SVID(t, sidecarID), x509bundle.FromX509Authorities(td, []*x509.Certificate{a, b}))
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewIdentityMonitor(src, MonitorOptions{TrustDomain: td}))
	fams := scrape(t, startServer(t, Options{Gatherer: reg}))
	if n := len(fams[MetricCAExpiry].GetMetric()); n != 2 {
		t.Errorf("%d CA expiry series, want 2", n)
	}
}

// TestFederatedBundles: every federated bundle the source holds is listed in
// /status and the metrics with its authorities and expiry, a federated
// bundle holding the local CA is marked refused (status, metric, WARN), and
// a federated bundle that goes away is logged.
func TestFederatedBundles(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	partner := identitytest.NewCA(t, "partner.test")
	src := ca.Source(t, sidecarID)
	src.SetBundle(partner.Bundle())
	evil := spiffeid.RequireTrustDomainFromString("evil.test")
	src.SetBundle(x509bundle.FromX509Authorities(evil, []*x509.Certificate{ca.Cert()}))
	logs := newLogRecorder()
	updated := make(chan struct{})
	reg := prometheus.NewRegistry()
	mon := NewIdentityMonitor(src, MonitorOptions{TrustDomain: td, Updated: updated, Interval: time.Hour, Logger: slog.New(logs)})
	reg.MustRegister(mon)
	base := startServer(t, Options{Gatherer: reg})
	runMonitor(t, mon)
	refusal := logs.wait(t, slog.LevelWarn, "federated bundle refused")
	if refusal["trust_domain"] != "evil.test" || !strings.Contains(refusal["reason"], "holds a CA of the local trust domain") {
		t.Errorf("refusal attributes %v", refusal)
	}

	st := mon.Status()
	got := map[string]BundleStatus{}
	var order []string
	for _, b := range st.Bundles {
		got[b.TrustDomain] = b
		order = append(order, b.TrustDomain)
	}
	if strings.Join(order, " ") != "mesh.test evil.test partner.test" {
		t.Errorf("bundles listed %v, want the local one first, then the federated ones by name", order)
	}
	if b := got["mesh.test"]; b.Federated || b.Refused != "" {
		t.Errorf("local bundle %+v", b)
	}
	if b := got["partner.test"]; !b.Federated || b.Refused != "" || len(b.CAs) != 1 || b.CAs[0].Subject != partner.Cert().Subject.String() || b.CAs[0].ExpiresIn == "" {
		t.Errorf("partner.test %+v", b)
	}
	if b := got["evil.test"]; !b.Federated || !strings.Contains(b.Refused, "holds a CA of the local trust domain") {
		t.Errorf("evil.test %+v", b)
	}

	fams := scrape(t, base)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{MetricBundleCAs, []string{"trust_domain=partner.test"}, 1},
		{MetricFedRefused, []string{"trust_domain=partner.test"}, 0},
		{MetricFedRefused, []string{"trust_domain=evil.test"}, 1},
	} {
		if v, ok := value(fams, c.name, c.labels...); !ok || v != c.want {
			t.Errorf("%s%v = %v (exported %v), want %v", c.name, c.labels, v, ok, c.want)
		}
	}
	if v, ok := value(fams, MetricCAExpiry, "trust_domain=partner.test", "subject_key_id="+keyID(partner.Cert())); !ok || v < 3600 {
		t.Errorf("partner.test CA expiry %v (exported %v)", v, ok)
	}
	if _, ok := value(fams, MetricFedRefused, "trust_domain=mesh.test"); ok {
		t.Error("the local bundle has a federated_bundle_refused series")
	}

	src.RemoveBundle(spiffeid.RequireTrustDomainFromString("partner.test"))
	updated <- struct{}{}
	if gone := logs.wait(t, slog.LevelWarn, "federated bundle removed"); gone["trust_domain"] != "partner.test" {
		t.Errorf("removal attributes %v", gone)
	}
	settle(updated)
	if _, ok := value(scrape(t, base), MetricBundleCAs, "trust_domain=partner.test"); ok {
		t.Error("a removed federated bundle is still exported")
	}
}
