package proxy

import (
	"crypto/tls"

	"github.com/prometheus/client_golang/prometheus"

	"latch.dev/latch/identity"
)

// Metrics are the data plane's Prometheus collectors. A nil *Metrics is valid
// and records nothing. Label values are bounded: listener names come from the
// configuration, directions, reasons, flows and classes from small fixed sets;
// remote addresses and peer IDs are never labels (they are in the access log).
type Metrics struct {
	accepted          *prometheus.CounterVec
	active            *prometheus.GaugeVec
	maxConns          *prometheus.GaugeVec
	closed            *prometheus.CounterVec
	handshakeDuration *prometheus.HistogramVec
	handshakes        *prometheus.CounterVec
	handshakeFailures *prometheus.CounterVec
	denials           *prometheus.CounterVec
	bytes             *prometheus.CounterVec
	connectFailures   *prometheus.CounterVec
	configInfo        *prometheus.GaugeVec
}

// Flow label values of latch_bytes_total: which way the bytes went, as seen
// by the local application.
const (
	FlowAppToPeer = "app_to_peer"
	FlowPeerToApp = "peer_to_app"
)

// NewMetrics creates the collectors and registers them with reg (nil: not
// registered, e.g. in benchmarks).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_connections_accepted_total",
			Help: "Connections accepted by a listener.",
		}, []string{"listener", "direction"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "latch_connections_active",
			Help: "Connections open on a listener, handshaking ones included.",
		}, []string{"listener", "direction"}),
		maxConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "latch_listener_max_connections",
			Help: "A listener's connection limit (maxConnections). At latch_connections_active = this, new connections wait in the kernel's backlog, unaccepted: alert on the ratio.",
		}, []string{"listener", "direction"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_connections_closed_total",
			Help: "Connections closed, by reason (eof, idle_timeout, policy_revoked, trust_revoked, server_id_changed, upstream_reset, downstream_reset, truncated, drain, handshake_failed, upstream_unreachable).",
		}, []string{"listener", "direction", "reason"}),
		handshakeDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "latch_handshake_duration_seconds",
			Help:    "Duration of successful mTLS handshakes.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"listener", "direction"}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_handshakes_total",
			Help: "Completed mTLS handshakes, by key exchange group: X25519MLKEM768 is the post-quantum hybrid, X25519 and P-256 are classical, none is a TLS 1.2 resumption without a key exchange.",
		}, []string{"listener", "direction", "group"}),
		handshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_handshake_failures_total",
			Help: "Failed or refused mTLS handshakes, by class.",
		}, []string{"listener", "direction", "class"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_authorization_denials_total",
			Help: "Verified peers refused by an inbound listener's allow-list.",
		}, []string{"listener"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_bytes_total",
			Help: "Bytes forwarded, by flow (app_to_peer, peer_to_app).",
		}, []string{"listener", "direction", "flow"}),
		connectFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_upstream_connect_failures_total",
			Help: "Failed TCP connects to the app (inbound) or to an upstream endpoint (outbound).",
		}, []string{"listener", "direction"}),
		configInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "latch_config_info",
			Help: "The running proxy configuration: 1 for its version and source.",
		}, []string{"version", "source"}),
	}
	if reg != nil {
		reg.MustRegister(m.accepted, m.active, m.maxConns, m.closed, m.handshakeDuration, m.handshakes, m.handshakeFailures,
			m.denials, m.bytes, m.connectFailures, m.configInfo)
	}
	return m
}

func (m *Metrics) setConfig(version, source string) {
	if m == nil {
		return
	}
	m.configInfo.Reset()
	m.configInfo.WithLabelValues(version, source).Set(1)
}

// listenerMetrics holds the children of every vector for one listener,
// resolved once when the listener is bound, so the per-connection and
// per-read paths touch only atomics, never a label lookup. Its zero value
// (from a nil *Metrics) records nothing.
type listenerMetrics struct {
	on                bool
	m                 *Metrics
	name, direction   string
	accepted          prometheus.Counter
	active            prometheus.Gauge
	handshakeDuration prometheus.Observer
	handshakes        map[tls.CurveID]prometheus.Counter // by group, see groupLabel
	otherHandshakes   prometheus.Counter
	denials           prometheus.Counter
	connectFailures   prometheus.Counter
	appToPeer         prometheus.Counter
	peerToApp         prometheus.Counter
}

func (m *Metrics) forListener(name string, dir Direction) listenerMetrics {
	if m == nil {
		return listenerMetrics{}
	}
	d := string(dir)
	lm := listenerMetrics{
		on:                true,
		m:                 m,
		name:              name,
		direction:         d,
		accepted:          m.accepted.WithLabelValues(name, d),
		active:            m.active.WithLabelValues(name, d),
		handshakeDuration: m.handshakeDuration.WithLabelValues(name, d),
		connectFailures:   m.connectFailures.WithLabelValues(name, d),
		appToPeer:         m.bytes.WithLabelValues(name, d, FlowAppToPeer),
		peerToApp:         m.bytes.WithLabelValues(name, d, FlowPeerToApp),
	}
	if dir == DirectionInbound {
		lm.denials = m.denials.WithLabelValues(name)
	}
	lm.handshakes = make(map[tls.CurveID]prometheus.Counter, len(handshakeGroups))
	for _, g := range handshakeGroups {
		lm.handshakes[g] = m.handshakes.WithLabelValues(name, d, groupLabel(g))
	}
	lm.otherHandshakes = m.handshakes.WithLabelValues(name, d, "other")
	return lm
}

// handshakeGroups are the values of the group label: every key exchange
// group a profile may allow (Validate refuses others), and 0 for none. A
// group outside them, which no handshake of latch's can negotiate, would be
// counted as "other".
var handshakeGroups = append([]tls.CurveID{0}, identity.Intermediate().Curves...)

func groupLabel(g tls.CurveID) string {
	if g == 0 {
		return "none"
	}
	return identity.GroupName(g)
}

// setLimit publishes the listener's connection limit (set on every Apply, as
// a kept listener's limit may change).
func (lm *listenerMetrics) setLimit(n int) {
	if lm.on {
		lm.m.maxConns.WithLabelValues(lm.name, lm.direction).Set(float64(n))
	}
}

// forgetLimit drops the limit of a listener that is gone, so that a
// dashboard's ratio does not show a removed listener as idle forever.
func (lm *listenerMetrics) forgetLimit() {
	if lm.on {
		lm.m.maxConns.DeleteLabelValues(lm.name, lm.direction)
	}
}

func (lm *listenerMetrics) connOpened() {
	if lm.on {
		lm.accepted.Inc()
		lm.active.Inc()
	}
}

func (lm *listenerMetrics) connClosed(reason string) {
	if lm.on {
		lm.active.Dec()
		lm.m.closed.WithLabelValues(lm.name, lm.direction, reason).Inc()
	}
}

func (lm *listenerMetrics) handshakeOK(seconds float64, group tls.CurveID) {
	if !lm.on {
		return
	}
	lm.handshakeDuration.Observe(seconds)
	if c, ok := lm.handshakes[group]; ok {
		c.Inc()
	} else {
		lm.otherHandshakes.Inc()
	}
}

func (lm *listenerMetrics) handshakeFailed(class identity.Class) {
	if !lm.on {
		return
	}
	lm.m.handshakeFailures.WithLabelValues(lm.name, lm.direction, string(class)).Inc()
	if class == identity.ClassNotAllowed && lm.denials != nil {
		lm.denials.Inc()
	}
}

func (lm *listenerMetrics) connectFailed() {
	if lm.on {
		lm.connectFailures.Inc()
	}
}

// flowCounter returns the byte counter for data read from the downstream
// (accepted) side when fromDownstream, else from the upstream (dialed) side.
func (lm *listenerMetrics) flowCounter(fromDownstream bool) prometheus.Counter {
	if !lm.on {
		return nil
	}
	// Inbound: downstream is the peer, upstream the app. Outbound: the other
	// way round.
	inbound := lm.direction == string(DirectionInbound)
	if fromDownstream == inbound {
		return lm.peerToApp
	}
	return lm.appToPeer
}
