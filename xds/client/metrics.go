package client

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the ADS client's Prometheus metrics. A nil *Metrics is a valid
// no-op.
type Metrics struct {
	updates    *prometheus.CounterVec
	reconnects prometheus.Counter
}

// NewMetrics registers the metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		updates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_xds_updates_total", Help: "xDS updates by result (applied, nacked).",
		}, []string{"result"}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "latch_xds_reconnects_total", Help: "Times the ADS stream ended and was retried.",
		}),
	}
	reg.MustRegister(m.updates, m.reconnects)
	return m
}

func (m *Metrics) update(result string) {
	if m != nil {
		m.updates.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) reconnect() {
	if m != nil {
		m.reconnects.Inc()
	}
}
