package server

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the control plane's Prometheus metrics. A nil *Metrics is a
// valid no-op.
type Metrics struct {
	connectedSidecars prometheus.Gauge
	nodesDeclared     prometheus.Gauge
	pushes            *prometheus.CounterVec
	nacks             *prometheus.CounterVec
	refusedStreams    *prometheus.CounterVec
	declErrors        prometheus.Gauge
}

// NewMetrics registers the metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		connectedSidecars: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "latch_xds_connected_streams", Help: "Open xDS streams from sidecars.",
		}),
		nodesDeclared: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "latch_xds_declared_nodes", Help: "Workloads with an accepted declaration.",
		}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_xds_pushes_total", Help: "Discovery responses sent, by resource type.",
		}, []string{"type"}),
		// A node is the SPIFFE ID the peer proved (any other is refused
		// before it can NACK), so each workload identity adds at most one
		// label, whatever it sends; the label goes when the server forgets
		// the node (no declaration, no stream), so the series are those of
		// declared and connected workloads.
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_xds_nacks_total", Help: "Updates refused by sidecars, by node.",
		}, []string{"node"}),
		refusedStreams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_xds_refused_streams_total", Help: "xDS streams (and, for connection_limit, connections) refused, by reason.",
		}, []string{"reason"}),
		declErrors: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "latch_declaration_errors", Help: "Refusals in the current declarations (each names file and line in the log).",
		}),
	}
	reg.MustRegister(m.connectedSidecars, m.nodesDeclared, m.pushes, m.nacks, m.refusedStreams, m.declErrors)
	return m
}

func (m *Metrics) connected(n int) {
	if m != nil {
		m.connectedSidecars.Set(float64(n))
	}
}

func (m *Metrics) nodes(n int) {
	if m != nil {
		m.nodesDeclared.Set(float64(n))
	}
}

func (m *Metrics) pushed(typeURL string) {
	if m != nil {
		m.pushes.WithLabelValues(shortType(typeURL)).Inc()
	}
}

func (m *Metrics) nack(node string) {
	if m != nil {
		m.nacks.WithLabelValues(node).Inc()
	}
}

// forgetNode drops node's series.
func (m *Metrics) forgetNode(node string) {
	if m != nil {
		m.nacks.DeleteLabelValues(node)
	}
}

func (m *Metrics) refused(reason string) {
	if m != nil {
		m.refusedStreams.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) declarationErrors(n int) {
	if m != nil {
		m.declErrors.Set(float64(n))
	}
}

// shortType keeps the label readable and bounded: an unknown type URL from a
// client becomes "other".
func shortType(typeURL string) string {
	switch typeURL {
	case "type.googleapis.com/envoy.config.listener.v3.Listener":
		return "listener"
	case "type.googleapis.com/envoy.config.cluster.v3.Cluster":
		return "cluster"
	case "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment":
		return "endpoints"
	}
	return "other"
}
