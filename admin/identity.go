package admin

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"latch.dev/latch/identity"
)

// Source is what the identity monitor reads: the current X.509-SVID and the
// trust bundles. *identity.WorkloadSource satisfies it.
type Source interface {
	x509svid.Source
	x509bundle.Source
}

// updater is the optional half of a source that announces changes, as the
// go-spiffe X509Source does with Updated.
type updater interface{ Updated() <-chan struct{} }

// MonitorOptions configure an IdentityMonitor.
type MonitorOptions struct {
	// TrustDomain is the local trust domain; its bundle is watched.
	TrustDomain spiffeid.TrustDomain
	// Federated are further trust domains whose bundles are watched too,
	// even while the source holds none (the status then says so). A source
	// that lists its bundles (identity.BundleLister, as the Workload API
	// source does) has every federated bundle it holds watched anyway.
	Federated []spiffeid.TrustDomain
	// SVIDWarnBefore is how close to its expiry the SVID raises the alarm.
	// Zero means a quarter of the SVID's lifetime: rotation is due at half
	// of it, so a quarter left means rotation has been missed for a while.
	SVIDWarnBefore time.Duration
	// CAWarnBefore is how close to its expiry a bundle CA raises the alarm.
	// Zero means a quarter of the CA's lifetime. A CA near its end is only
	// an alarm when no other CA of its bundle outlives the threshold: an old
	// CA fading out next to its successor is a rollover going to plan.
	CAWarnBefore time.Duration
	// Interval between evaluations besides those triggered by source
	// updates; zero means one minute.
	Interval time.Duration
	// RepeatWarning is how often a standing alarm is logged again; zero
	// means ten minutes. The metric is updated on every evaluation.
	RepeatWarning time.Duration
	// Updated, when set, triggers an evaluation per receive. When nil and
	// the source has an Updated() <-chan struct{} method (X509Source), that
	// channel is used. That channel has one slot: give the monitor the only
	// receiver, or updates will be split between receivers.
	Updated <-chan struct{}
	// Logger receives alarms and bundle changes; nil means slog.Default().
	Logger *slog.Logger
	// Now is the clock; nil means time.Now. Tests move it.
	Now func() time.Time
}

// IdentityMonitor exports the state of the workload's identity as metrics
// (it is a prometheus.Collector), serves it to /status, reports whether an
// SVID is held (for /readyz), and with Run watches for near expiry and bundle
// changes.
type IdentityMonitor struct {
	src  Source
	opts MonitorOptions
	log  *slog.Logger

	svidExpiry  *prometheus.Desc
	caExpiry    *prometheus.Desc
	bundleSize  *prometheus.Desc
	fedRefused  *prometheus.Desc
	changes     *prometheus.CounterVec
	rotations   prometheus.Counter
	alarm       *prometheus.GaugeVec
	alarmCounts *prometheus.CounterVec

	mu         sync.Mutex
	known      map[spiffeid.TrustDomain]map[string]*x509.Certificate // key: caKey
	svidSerial string
	lastWarned map[string]time.Time
	warnedNow  map[string]bool // keys warned about in the current evaluation
	evaluated  bool
}

// Metric names exported by the IdentityMonitor and RegisterBuildInfo.
const (
	MetricSVIDExpiry    = "latch_svid_expiry_seconds"
	MetricCAExpiry      = "latch_bundle_ca_expiry_seconds"
	MetricBundleCAs     = "latch_bundle_cas"
	MetricFedRefused    = "latch_federated_bundle_refused"
	MetricBundleChanges = "latch_bundle_changes_total"
	MetricSVIDRotations = "latch_svid_rotations_total"
	MetricExpiryAlarm   = "latch_expiry_alarm"
	MetricExpiryWarns   = "latch_expiry_warnings_total"
	MetricBuildInfo     = "latch_build_info"
)

// NewIdentityMonitor returns a monitor of src. Register it with a Prometheus
// registry (it is a Collector) and start Run for the alarms.
func NewIdentityMonitor(src Source, opts MonitorOptions) *IdentityMonitor {
	if opts.Interval <= 0 {
		opts.Interval = time.Minute
	}
	if opts.RepeatWarning <= 0 {
		opts.RepeatWarning = 10 * time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	opts.Federated = slices.Clone(opts.Federated)
	return &IdentityMonitor{
		src:  src,
		opts: opts,
		log:  log,
		svidExpiry: prometheus.NewDesc(MetricSVIDExpiry,
			"Seconds until the workload's X.509-SVID expires (negative once expired).", nil, nil),
		caExpiry: prometheus.NewDesc(MetricCAExpiry,
			"Seconds until a CA certificate of a trust bundle expires.",
			[]string{"trust_domain", "subject_key_id", "subject"}, nil),
		bundleSize: prometheus.NewDesc(MetricBundleCAs,
			"Number of CA certificates in a trust bundle, the local trust domain's and every federated one (latch_federated_bundle_refused exists for the federated ones).", []string{"trust_domain"}, nil),
		fedRefused: prometheus.NewDesc(MetricFedRefused,
			"1 for a federated bundle latch refuses (it holds a CA of the local trust domain), 0 for one it verifies peers with.", []string{"trust_domain"}, nil),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricBundleChanges,
			Help: "CA certificates added to or removed from a trust bundle since start.",
		}, []string{"trust_domain", "change"}),
		rotations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricSVIDRotations,
			Help: "Times the workload's X.509-SVID was replaced since start.",
		}),
		alarm: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: MetricExpiryAlarm,
			Help: "Certificates of a kind (svid, bundle_ca) that are within their warning threshold of expiry, as of the last evaluation.",
		}, []string{"kind"}),
		alarmCounts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricExpiryWarns,
			Help: "Near-expiry warnings logged, by kind (svid, bundle_ca).",
		}, []string{"kind"}),
		known:      make(map[spiffeid.TrustDomain]map[string]*x509.Certificate),
		lastWarned: make(map[string]time.Time),
	}
}

// trustDomains is the local trust domain, then the federated ones: those
// configured and those the source holds bundles of, by name.
func (m *IdentityMonitor) trustDomains() []spiffeid.TrustDomain {
	fed := slices.Clone(m.opts.Federated)
	if l, ok := m.src.(identity.BundleLister); ok {
		for _, b := range l.X509Bundles() {
			fed = append(fed, b.TrustDomain())
		}
	}
	fed = slices.DeleteFunc(fed, func(td spiffeid.TrustDomain) bool { return td == m.opts.TrustDomain })
	slices.SortFunc(fed, func(a, b spiffeid.TrustDomain) int { return strings.Compare(a.Name(), b.Name()) })
	return append([]spiffeid.TrustDomain{m.opts.TrustDomain}, slices.Compact(fed)...)
}

// federatedRefusal says why latch refuses the federated bundle b (nil: it
// does not): identity.CheckFederatedBundle against the local bundle.
func (m *IdentityMonitor) federatedRefusal(b *x509bundle.Bundle) error {
	local, err := m.src.GetX509BundleForTrustDomain(m.opts.TrustDomain)
	if err != nil {
		return nil // no local bundle: nothing to compare, and no peer verifies anyway
	}
	return identity.CheckFederatedBundle(b, local)
}

// Describe implements prometheus.Collector.
func (m *IdentityMonitor) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.svidExpiry
	ch <- m.caExpiry
	ch <- m.bundleSize
	ch <- m.fedRefused
	m.changes.Describe(ch)
	m.rotations.Describe(ch)
	m.alarm.Describe(ch)
	m.alarmCounts.Describe(ch)
}

// Collect implements prometheus.Collector. Expiry gauges are computed from
// the source at scrape time, so they are never stale.
func (m *IdentityMonitor) Collect(ch chan<- prometheus.Metric) {
	now := m.opts.Now()
	if svid, err := m.src.GetX509SVID(); err == nil && len(svid.Certificates) > 0 {
		ch <- prometheus.MustNewConstMetric(m.svidExpiry, prometheus.GaugeValue,
			svid.Certificates[0].NotAfter.Sub(now).Seconds())
	}
	for _, td := range m.trustDomains() {
		b, err := m.src.GetX509BundleForTrustDomain(td)
		if err != nil {
			continue
		}
		cas := b.X509Authorities()
		federated := td != m.opts.TrustDomain
		ch <- prometheus.MustNewConstMetric(m.bundleSize, prometheus.GaugeValue, float64(len(cas)), td.Name())
		if federated {
			refused := 0.0
			if m.federatedRefusal(b) != nil {
				refused = 1
			}
			ch <- prometheus.MustNewConstMetric(m.fedRefused, prometheus.GaugeValue, refused, td.Name())
		}
		seen := make(map[string]bool, len(cas))
		for _, ca := range cas {
			// A CA re-issued with the same key and subject shares the key
			// ID; two series with the same labels would fail the scrape.
			id := keyID(ca)
			if seen[id] {
				id += "-" + caKey(ca)[:8]
			}
			seen[id] = true
			ch <- prometheus.MustNewConstMetric(m.caExpiry, prometheus.GaugeValue,
				ca.NotAfter.Sub(now).Seconds(), td.Name(), id, ca.Subject.CommonName)
		}
	}
	m.changes.Collect(ch)
	m.rotations.Collect(ch)
	m.alarm.Collect(ch)
	m.alarmCounts.Collect(ch)
}

// SVIDReady returns nil when the source holds an SVID that is valid now,
// and otherwise says what is wrong; use it as a readiness check.
func (m *IdentityMonitor) SVIDReady() error {
	svid, err := m.src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("no X.509-SVID from the Workload API yet: %w", err)
	}
	if len(svid.Certificates) == 0 {
		return errors.New("X.509-SVID has no certificate")
	}
	leaf, now := svid.Certificates[0], m.opts.Now()
	if now.After(leaf.NotAfter) {
		return fmt.Errorf("X.509-SVID %s expired at %s", svid.ID, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		return fmt.Errorf("X.509-SVID %s not valid before %s", svid.ID, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

// CertStatus describes one certificate in /status.
type CertStatus struct {
	Subject      string    `json:"subject"`
	Issuer       string    `json:"issuer"`
	Serial       string    `json:"serial"`
	SubjectKeyID string    `json:"subject_key_id"`
	SHA256       string    `json:"sha256"`
	NotBefore    time.Time `json:"not_before"`
	NotAfter     time.Time `json:"not_after"`
	ExpiresIn    string    `json:"expires_in"`
}

// BundleStatus describes one trust bundle in /status.
type BundleStatus struct {
	TrustDomain string `json:"trust_domain"`
	// Federated marks the bundle of a foreign trust domain, which verifies
	// that trust domain's peers on listeners that federate with it.
	Federated bool `json:"federated"`
	// Refused says why latch verifies nobody with this federated bundle.
	Refused string       `json:"refused,omitempty"`
	Error   string       `json:"error,omitempty"`
	CAs     []CertStatus `json:"cas"`
}

// IdentityStatus is the identity part of /status.
type IdentityStatus struct {
	SPIFFEID  string         `json:"spiffe_id,omitempty"`
	SVID      *CertStatus    `json:"svid,omitempty"`
	SVIDError string         `json:"svid_error,omitempty"`
	Bundles   []BundleStatus `json:"bundles"`
}

// Status returns the identity as it is now, for /status.
func (m *IdentityMonitor) Status() IdentityStatus {
	now := m.opts.Now()
	var st IdentityStatus
	if svid, err := m.src.GetX509SVID(); err != nil {
		st.SVIDError = err.Error()
	} else if len(svid.Certificates) > 0 {
		st.SPIFFEID = svid.ID.String()
		cs := certStatus(svid.Certificates[0], now)
		st.SVID = &cs
	}
	for _, td := range m.trustDomains() {
		bs := BundleStatus{TrustDomain: td.Name(), Federated: td != m.opts.TrustDomain, CAs: []CertStatus{}}
		if b, err := m.src.GetX509BundleForTrustDomain(td); err != nil {
			bs.Error = err.Error()
		} else {
			for _, ca := range b.X509Authorities() {
				bs.CAs = append(bs.CAs, certStatus(ca, now))
			}
			if bs.Federated {
				if err := m.federatedRefusal(b); err != nil {
					bs.Refused = err.Error()
				}
			}
		}
		st.Bundles = append(st.Bundles, bs)
	}
	return st
}

func certStatus(c *x509.Certificate, now time.Time) CertStatus {
	sum := sha256.Sum256(c.Raw)
	return CertStatus{
		Subject:      c.Subject.String(),
		Issuer:       c.Issuer.String(),
		Serial:       strings.ToUpper(c.SerialNumber.Text(16)),
		SubjectKeyID: keyID(c),
		SHA256:       strings.ToUpper(hex.EncodeToString(sum[:])),
		NotBefore:    c.NotBefore.UTC(),
		NotAfter:     c.NotAfter.UTC(),
		ExpiresIn:    c.NotAfter.Sub(now).Round(time.Second).String(),
	}
}

// keyID names a CA in labels and logs: its subject key identifier, or for a
// CA without one the first 20 bytes of its SHA-256 fingerprint. Either is
// bounded by the size of the bundle, unlike a serial across rotations.
func keyID(c *x509.Certificate) string {
	if len(c.SubjectKeyId) > 0 {
		return hex.EncodeToString(c.SubjectKeyId)
	}
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:20])
}

// Run evaluates the identity now, then on every source update and every
// Interval, until ctx is done. It logs the SVID and bundle CAs near expiry
// (WARN), bundle changes (INFO for an added CA, WARN for a removed one) and
// SVID rotations (INFO), and keeps the alarm metrics current.
func (m *IdentityMonitor) Run(ctx context.Context) error {
	updated := m.opts.Updated
	if updated == nil {
		if u, ok := m.src.(updater); ok {
			updated = u.Updated()
		}
	}
	tick := time.NewTicker(m.opts.Interval)
	defer tick.Stop()
	for {
		m.evaluate()
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		case <-updated:
		}
	}
}

func (m *IdentityMonitor) evaluate() {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.opts.Now()
	first := !m.evaluated
	m.evaluated = true
	// Warnings are keyed by certificate; keys of certificates gone since
	// the last evaluation are dropped so the map does not grow with every
	// rotation.
	m.warnedNow = make(map[string]bool)
	defer func() {
		for k := range m.lastWarned {
			if !m.warnedNow[k] {
				delete(m.lastWarned, k)
			}
		}
	}()

	svidAlarms := 0
	if svid, err := m.src.GetX509SVID(); err != nil {
		m.warnLevel(slog.LevelWarn, "no-svid", now, "", "no X.509-SVID", "reason", err.Error())
	} else if len(svid.Certificates) > 0 {
		leaf := svid.Certificates[0]
		serial := leaf.SerialNumber.Text(16)
		if !first && serial != m.svidSerial && m.svidSerial != "" {
			m.rotations.Inc()
			m.log.Info("X.509-SVID rotated", "spiffe_id", svid.ID.String(), "serial", serial,
				"not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		m.svidSerial = serial
		if within(leaf, now, m.opts.SVIDWarnBefore) {
			svidAlarms++
			m.warn("svid:"+serial, now, "svid", "X.509-SVID expires soon",
				"spiffe_id", svid.ID.String(), "serial", serial,
				"not_after", leaf.NotAfter.UTC().Format(time.RFC3339),
				"expires_in", leaf.NotAfter.Sub(now).Round(time.Second).String())
		}
	}
	m.alarm.WithLabelValues("svid").Set(float64(svidAlarms))

	caAlarms := 0
	tds := m.trustDomains()
	for td, prev := range m.known {
		if td == m.opts.TrustDomain || slices.Contains(tds, td) {
			continue
		}
		// A federated bundle the Workload API no longer hands out: its
		// peers are refused from now on, and cut (proxy.RecheckTrust).
		m.changes.WithLabelValues(td.Name(), "removed").Add(float64(len(prev)))
		m.log.Warn("federated bundle removed", "trust_domain", td.Name(), "cas", len(prev))
		delete(m.known, td)
	}
	for _, td := range tds {
		b, err := m.src.GetX509BundleForTrustDomain(td)
		if err != nil {
			m.warnLevel(slog.LevelWarn, "no-bundle:"+td.Name(), now, "", "no trust bundle", "trust_domain", td.Name(), "reason", err.Error())
			continue
		}
		if td != m.opts.TrustDomain {
			if err := m.federatedRefusal(b); err != nil {
				m.warnLevel(slog.LevelWarn, "fed-refused:"+td.Name(), now, "", "federated bundle refused", "trust_domain", td.Name(), "reason", err.Error())
			}
		}
		cas := b.X509Authorities()
		current := make(map[string]*x509.Certificate, len(cas))
		for _, ca := range cas {
			current[caKey(ca)] = ca
		}
		m.logBundleChanges(td, current, first)
		m.known[td] = current

		for _, ca := range cas {
			if !within(ca, now, m.opts.CAWarnBefore) {
				continue
			}
			if successor := successorOf(ca, cas, now, m.opts.CAWarnBefore); successor != nil {
				// A rollover going to plan: say so once, without the alarm.
				m.warnLevel(slog.LevelInfo, "ca-successor:"+caKey(ca), now, "", "bundle CA nears expiry; a successor CA is in the bundle",
					"trust_domain", td.Name(), "subject", ca.Subject.String(), "subject_key_id", keyID(ca),
					"not_after", ca.NotAfter.UTC().Format(time.RFC3339),
					"successor_subject", successor.Subject.String(), "successor_not_after", successor.NotAfter.UTC().Format(time.RFC3339))
				continue
			}
			caAlarms++
			m.warn("ca:"+caKey(ca), now, "bundle_ca", "bundle CA expires soon and no successor CA is in the bundle",
				"trust_domain", td.Name(), "subject", ca.Subject.String(), "subject_key_id", keyID(ca),
				"not_after", ca.NotAfter.UTC().Format(time.RFC3339),
				"expires_in", ca.NotAfter.Sub(now).Round(time.Second).String())
		}
	}
	m.alarm.WithLabelValues("bundle_ca").Set(float64(caAlarms))
}

func (m *IdentityMonitor) logBundleChanges(td spiffeid.TrustDomain, current map[string]*x509.Certificate, first bool) {
	if first {
		for _, ca := range current {
			m.log.Info("bundle CA", "trust_domain", td.Name(), "subject", ca.Subject.String(),
				"subject_key_id", keyID(ca), "not_after", ca.NotAfter.UTC().Format(time.RFC3339))
		}
		return
	}
	prev := m.known[td]
	for k, ca := range current {
		if _, ok := prev[k]; ok {
			continue
		}
		m.changes.WithLabelValues(td.Name(), "added").Inc()
		m.log.Info("bundle CA added", "trust_domain", td.Name(), "subject", ca.Subject.String(),
			"subject_key_id", keyID(ca), "not_before", ca.NotBefore.UTC().Format(time.RFC3339),
			"not_after", ca.NotAfter.UTC().Format(time.RFC3339), "cas", len(current))
	}
	for k, ca := range prev {
		if _, ok := current[k]; ok {
			continue
		}
		m.changes.WithLabelValues(td.Name(), "removed").Inc()
		// WARN: peers still presenting certificates from this CA fail from now on.
		m.log.Warn("bundle CA removed", "trust_domain", td.Name(), "subject", ca.Subject.String(),
			"subject_key_id", keyID(ca), "not_after", ca.NotAfter.UTC().Format(time.RFC3339), "cas", len(current))
	}
}

func (m *IdentityMonitor) warn(key string, now time.Time, kind, msg string, args ...any) {
	m.warnLevel(slog.LevelWarn, key, now, kind, msg, args...)
}

// warnLevel logs msg at most once per RepeatWarning for key.
func (m *IdentityMonitor) warnLevel(level slog.Level, key string, now time.Time, kind, msg string, args ...any) {
	m.warnedNow[key] = true
	if last, ok := m.lastWarned[key]; ok && now.Sub(last) < m.opts.RepeatWarning {
		return
	}
	m.lastWarned[key] = now
	if kind != "" {
		m.alarmCounts.WithLabelValues(kind).Inc()
	}
	m.log.Log(context.Background(), level, msg, args...)
}

// within reports whether c expires within threshold of now (a quarter of its
// lifetime when threshold is zero), or already has.
func within(c *x509.Certificate, now time.Time, threshold time.Duration) bool {
	if threshold <= 0 {
		threshold = c.NotAfter.Sub(c.NotBefore) / 4
	}
	return c.NotAfter.Sub(now) <= threshold
}

// successorOf returns a CA of the bundle that stays valid beyond the warning
// threshold, or nil.
func successorOf(ca *x509.Certificate, cas []*x509.Certificate, now time.Time, threshold time.Duration) *x509.Certificate {
	for _, other := range cas {
		if other == ca || other.NotAfter.Before(ca.NotAfter) || within(other, now, threshold) {
			continue
		}
		return other
	}
	return nil
}

// caKey identifies a CA certificate across evaluations: two CAs may share a
// key (a re-issued CA), so the whole certificate's hash is the key.
func caKey(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// RegisterBuildInfo registers latch_build_info{version,go_version} = 1.
func RegisterBuildInfo(reg prometheus.Registerer, version string) error {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        MetricBuildInfo,
		Help:        "Always 1; the labels say which latch build is running.",
		ConstLabels: prometheus.Labels{"version": version, "go_version": runtime.Version()},
	})
	g.Set(1)
	if err := reg.Register(g); err != nil {
		return fmt.Errorf("register %s: %w", MetricBuildInfo, err)
	}
	return nil
}
