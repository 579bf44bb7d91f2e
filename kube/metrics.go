package kube

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the Kubernetes side's Prometheus metrics. A nil *Metrics is a
// valid no-op.
type Metrics struct {
	synced       prometheus.Gauge
	leader       prometheus.Gauge
	statusWrites *prometheus.CounterVec
	reportWrites *prometheus.CounterVec
}

// NewMetrics registers the metrics on reg; the count of objects by
// condition is read from c when scraped (SetController).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		synced: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "latch_kube_synced", Help: "1 once every ServicePolicy the API server listed has been read (the control plane is ready only then).",
		}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "latch_kube_leader", Help: "1 while this replica holds the Lease and writes ServicePolicy status.",
		}),
		statusWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_kube_status_writes_total", Help: "ServicePolicy status checks by the leader, by result: written, unchanged, gone (deleted meanwhile), failed.",
		}, []string{"result"}),
		reportWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "latch_kube_ack_report_writes_total", Help: "Writes of this replica's ACK report, by result: written or failed.",
		}, []string{"result"}),
	}
	reg.MustRegister(m.synced, m.leader, m.statusWrites, m.reportWrites)
	return m
}

func (m *Metrics) setSynced(v bool) {
	if m != nil {
		m.synced.Set(b2f(v))
	}
}

func (m *Metrics) setLeader(v bool) {
	if m != nil {
		m.leader.Set(b2f(v))
	}
}

func (m *Metrics) statusWrite(result string) {
	if m != nil {
		m.statusWrites.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) reportWrite(result string) {
	if m != nil {
		m.reportWrites.WithLabelValues(result).Inc()
	}
}

func b2f(v bool) float64 {
	if v {
		return 1
	}
	return 0
}

var conditionsDesc = prometheus.NewDesc("latch_servicepolicies",
	"ServicePolicy objects by condition, status and reason. Every replica counts Accepted from what it read; only the leader counts Programmed.",
	[]string{"condition", "status", "reason"}, nil)

// Collector counts the objects by condition when scraped.
func (c *Controller) Collector() prometheus.Collector { return conditionCollector{c} }

type conditionCollector struct{ c *Controller }

func (cc conditionCollector) Describe(ch chan<- *prometheus.Desc) { ch <- conditionsDesc }

func (cc conditionCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct{ cond, status, reason string }
	counts := map[key]int{}
	for _, src := range cc.c.opts.Store.Sources() {
		if !src.IsObject() {
			continue
		}
		st, _ := cc.c.opts.Store.State(src)
		status := "False"
		if st.Accepted() {
			status = "True"
		}
		counts[key{condAccepted, status, st.Reason}]++
	}
	cc.c.mu.Lock()
	for _, cd := range cc.c.lastProgrammed {
		counts[key{condProgrammed, cd.Status, cd.Reason}]++
	}
	cc.c.mu.Unlock()
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(conditionsDesc, prometheus.GaugeValue, float64(n), k.cond, k.status, k.reason)
	}
}
