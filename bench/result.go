package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Result is one run of the harness, ready for encoding/json.
type Result struct {
	Started  time.Time      `json:"started"`
	Finished time.Time      `json:"finished"`
	Host     Host           `json:"host"`
	Options  OptionsSummary `json:"options"`
	// FileLimit is the RLIMIT_NOFILE the harness and its sidecars ran with.
	FileLimit  uint64           `json:"fileLimit"`
	Topologies []TopologyResult `json:"topologies"`
	Skipped    []Skipped        `json:"skipped,omitempty"`
}

// Host describes the machine.
type Host struct {
	GOOS      string `json:"goos"`
	GOARCH    string `json:"goarch"`
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpuModel,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	GoVersion string `json:"goVersion"`
}

// OptionsSummary records what was asked for.
type OptionsSummary struct {
	Duration       string `json:"duration"`
	Rounds         int    `json:"rounds"`
	BulkConns      []int  `json:"bulkConns"`
	MessageSize    int    `json:"messageSize"`
	ConnectWorkers int    `json:"connectWorkers"`
	IdleConns      int    `json:"idleConns"`
}

func (o Options) summary() OptionsSummary {
	return OptionsSummary{
		Duration: o.Duration.String(), Rounds: o.Rounds, BulkConns: o.BulkConns,
		MessageSize: o.MessageSize, ConnectWorkers: o.ConnectWorkers, IdleConns: o.IdleConns,
	}
}

// Skipped is a topology that did not run, and why.
type Skipped struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// TopologyResult is everything measured of one topology.
type TopologyResult struct {
	Name    string         `json:"name"`
	Version string         `json:"version"`
	Notes   []string       `json:"notes,omitempty"`
	Bulk    []*BulkFigures `json:"bulk"`
	// CPUSecondsPerGB is the pair's CPU time (both sidecars) per 10^9
	// payload bytes over all bulk runs; nil for the direct baseline.
	CPUSecondsPerGB   *float64           `json:"cpuSecondsPerGB,omitempty"`
	CPUPerGBBySidecar map[string]float64 `json:"cpuSecondsPerGBBySidecar,omitempty"`
	Latency           *LatencyResult     `json:"latency,omitempty"`
	Connect           *ConnectResult     `json:"connect,omitempty"`
	Memory            []SidecarMemory    `json:"memory,omitempty"`
	// Resumption is how many of the inbound sidecar's connections resumed
	// a TLS session (latch only: read from its access log).
	Resumption *Resumption `json:"resumption,omitempty"`
	// Profiles maps a load ("bulk8", "connect") to a perf report file.
	Profiles map[string]string `json:"profiles,omitempty"`
	Errors   []string          `json:"errors,omitempty"`

	connectRounds []float64
}

// BulkFigures is the bulk throughput at one connection count.
type BulkFigures struct {
	Conns int `json:"conns"`
	// MBps is total payload bytes over total time, all rounds.
	MBps       float64   `json:"MBps"`
	Bytes      uint64    `json:"bytes"`
	RoundsMBps []float64 `json:"roundsMBps"`
}

// LatencyResult is the round-trip time of an echo on a persistent
// connection, over all rounds' samples.
type LatencyResult struct {
	Samples int     `json:"samples"`
	P50us   float64 `json:"p50us"`
	P90us   float64 `json:"p90us"`
	P99us   float64 `json:"p99us"`
	P999us  float64 `json:"p999us"`
	// Added* are the same percentiles minus the direct baseline's.
	AddedP50us  *float64 `json:"addedP50us,omitempty"`
	AddedP90us  *float64 `json:"addedP90us,omitempty"`
	AddedP99us  *float64 `json:"addedP99us,omitempty"`
	AddedP999us *float64 `json:"addedP999us,omitempty"`
}

// ConnectResult is the new-connection test.
type ConnectResult struct {
	Count           int       `json:"count"`
	PerSecond       float64   `json:"perSecond"`
	RoundsPerSecond []float64 `json:"roundsPerSecond"`
	TTFBP50ms       float64   `json:"ttfbP50ms"`
	TTFBP99ms       float64   `json:"ttfbP99ms"`
	// PairCPUmsPerConn is both sidecars' CPU time per connection.
	PairCPUmsPerConn *float64 `json:"pairCPUmsPerConn,omitempty"`
}

// Resumption counts resumed TLS sessions among the inbound side's closed
// connections.
type Resumption struct {
	Resumed     int `json:"resumed"`
	Connections int `json:"connections"`
}

// SidecarMemory is one proxy process's resident memory, each reading as
// RSS, its anonymous part and PSS (see Usage).
type SidecarMemory struct {
	Sidecar string `json:"sidecar"`
	// Idle is right after start-up, before any load.
	IdleKB     int64 `json:"idleKB"`
	IdleAnonKB int64 `json:"idleAnonKB"`
	IdlePSSKB  int64 `json:"idlePssKB"`
	// Before is just before the idle connections were opened (after the
	// load tests, so with the code and buffers the load used).
	BeforeKB     int64 `json:"beforeKB"`
	BeforeAnonKB int64 `json:"beforeAnonKB"`
	BeforePSSKB  int64 `json:"beforePssKB"`
	// WithConnsKB is the RSS while Conns of them were open; PerConnKB what
	// each added to it.
	WithConnsKB int64   `json:"withConnsKB"`
	Conns       int     `json:"conns"`
	PerConnKB   float64 `json:"perConnKB"`
}

func (t *TopologyResult) bulk(conns int) *BulkFigures {
	for _, b := range t.Bulk {
		if b.Conns == conns {
			return b
		}
	}
	b := &BulkFigures{Conns: conns}
	t.Bulk = append(t.Bulk, b)
	return b
}

func (t *TopologyResult) bulkRound(conns int, mbps float64) {
	b := t.bulk(conns)
	b.RoundsMBps = append(b.RoundsMBps, mbps)
}

func (t *TopologyResult) connectRound(rate float64) {
	t.connectRounds = append(t.connectRounds, rate)
}

func (r *Result) find(name string) *TopologyResult {
	for i := range r.Topologies {
		if r.Topologies[i].Name == name {
			return &r.Topologies[i]
		}
	}
	return nil
}

// addLatencyOverDirect fills the Added* latency figures.
func (r *Result) addLatencyOverDirect() {
	d := r.find("direct")
	if d == nil || d.Latency == nil {
		return
	}
	for i := range r.Topologies {
		l := r.Topologies[i].Latency
		if l == nil {
			continue
		}
		sub := func(a, b float64) *float64 { v := a - b; return &v }
		l.AddedP50us = sub(l.P50us, d.Latency.P50us)
		l.AddedP90us = sub(l.P90us, d.Latency.P90us)
		l.AddedP99us = sub(l.P99us, d.Latency.P99us)
		l.AddedP999us = sub(l.P999us, d.Latency.P999us)
	}
}

// percentile returns the nearest-rank percentile p (0..1) of samples, which
// it sorts.
func percentile(samples []time.Duration, p float64) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	slices.Sort(samples)
	i := int(math.Ceil(p*float64(len(samples)))) - 1
	return samples[max(0, min(i, len(samples)-1))]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
func millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// metric is one column of the comparison: how to read it from a topology and
// which direction is better.
type metric struct {
	name         string
	higherBetter bool
	get          func(*TopologyResult) (float64, bool)
}

func (r *Result) metrics() []metric {
	ms := []metric{}
	for _, b := range r.Options.BulkConns {
		ms = append(ms, metric{fmt.Sprintf("bulk ×%d MB/s", b), true, func(t *TopologyResult) (float64, bool) {
			for _, f := range t.Bulk {
				if f.Conns == b && f.Bytes > 0 {
					return f.MBps, true
				}
			}
			return 0, false
		}})
	}
	ms = append(ms,
		metric{"pair CPU s/GB", false, func(t *TopologyResult) (float64, bool) {
			if t.CPUSecondsPerGB == nil {
				return 0, false
			}
			return *t.CPUSecondsPerGB, true
		}},
		metric{"added p99 µs", false, func(t *TopologyResult) (float64, bool) {
			if t.Latency == nil || t.Latency.AddedP99us == nil {
				return 0, false
			}
			return *t.Latency.AddedP99us, true
		}},
		metric{"conn/s", true, func(t *TopologyResult) (float64, bool) {
			if t.Connect == nil {
				return 0, false
			}
			return t.Connect.PerSecond, true
		}},
		metric{"max idle RSS MB", false, func(t *TopologyResult) (float64, bool) {
			return maxMemory(t, func(m SidecarMemory) float64 { return float64(m.IdleKB) / 1024 })
		}},
		metric{"max idle anon MB", false, func(t *TopologyResult) (float64, bool) {
			return maxMemory(t, func(m SidecarMemory) float64 { return float64(m.IdleAnonKB) / 1024 })
		}},
		metric{"max idle PSS MB", false, func(t *TopologyResult) (float64, bool) {
			return maxMemory(t, func(m SidecarMemory) float64 { return float64(m.IdlePSSKB) / 1024 })
		}},
		metric{"max KB/conn", false, func(t *TopologyResult) (float64, bool) {
			return maxMemory(t, func(m SidecarMemory) float64 {
				if m.Conns == 0 {
					return math.NaN()
				}
				return m.PerConnKB
			})
		}},
	)
	return ms
}

func maxMemory(t *TopologyResult, f func(SidecarMemory) float64) (float64, bool) {
	best, ok := 0.0, false
	for _, m := range t.Memory {
		v := f(m)
		if math.IsNaN(v) {
			return 0, false
		}
		if !ok || v > best {
			best, ok = v, true
		}
	}
	return best, ok
}

// best returns the best value of m among the proxies (not direct) other
// than exclude, and who holds it.
func (r *Result) best(m metric, exclude string) (float64, string, bool) {
	var best float64
	var who string
	found := false
	for i := range r.Topologies {
		t := &r.Topologies[i]
		if t.Name == "direct" || t.Name == exclude {
			continue
		}
		v, ok := m.get(t)
		if !ok {
			continue
		}
		if !found || (m.higherBetter && v > best) || (!m.higherBetter && v < best) {
			best, who, found = v, t.Name, true
		}
	}
	return best, who, found
}

// WriteMarkdown prints the tables: figures per topology, ratios to the best
// proxy, and latch against the targets.
func (r *Result) WriteMarkdown(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("latch-bench %s · %d × %s · %s, %d CPUs, %s, Linux %s\n\n",
		r.Started.Format("2006-01-02 15:04 UTC"), r.Options.Rounds, r.Options.Duration,
		r.Host.CPUModel, r.Host.CPUs, r.Host.GoVersion, r.Host.Kernel)

	// Two tables, so each fits a page: the data path, then connections and
	// memory.
	p("| topology | version |")
	for _, conns := range r.Options.BulkConns {
		p(" bulk ×%d MB/s |", conns)
	}
	p(" pair CPU s/GB | echo p50 µs | p90 | p99 | p99.9 | added p50 µs | added p99 µs | added p99.9 µs |\n")
	p("|---|---|%s\n", strings.Repeat("---:|", len(r.Options.BulkConns)+8))
	for i := range r.Topologies {
		t := &r.Topologies[i]
		row := []string{t.Name, t.Version}
		for _, conns := range r.Options.BulkConns {
			row = append(row, orDash(func() (string, bool) {
				for _, b := range t.Bulk {
					if b.Conns == conns && b.Bytes > 0 {
						return fmt.Sprintf("%.0f", b.MBps), true
					}
				}
				return "", false
			}))
		}
		row = append(row, orDash(func() (string, bool) {
			if t.CPUSecondsPerGB == nil {
				return "", false
			}
			return fmt.Sprintf("%.2f", *t.CPUSecondsPerGB), true
		}))
		if l := t.Latency; l != nil {
			row = append(row, f1(l.P50us), f1(l.P90us), f1(l.P99us), f1(l.P999us), f1p(l.AddedP50us), f1p(l.AddedP99us), f1p(l.AddedP999us))
		} else {
			row = append(row, "–", "–", "–", "–", "–", "–", "–")
		}
		p("| %s |\n", strings.Join(row, " | "))
	}

	p("\n| topology | new conn/s | first byte p50 ms | p99 ms | pair CPU ms/conn | RSS idle MB (out / in) | of which anon MB | PSS idle MB | RSS after load MB | anon after load MB | RSS with %d conns MB | KB/conn |\n", r.Options.IdleConns)
	p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for i := range r.Topologies {
		t := &r.Topologies[i]
		row := []string{t.Name}
		if c := t.Connect; c != nil {
			cpu := "–"
			if c.PairCPUmsPerConn != nil {
				cpu = fmt.Sprintf("%.2f", *c.PairCPUmsPerConn)
			}
			row = append(row, fmt.Sprintf("%.0f", c.PerSecond), fmt.Sprintf("%.2f", c.TTFBP50ms), fmt.Sprintf("%.2f", c.TTFBP99ms), cpu)
		} else {
			row = append(row, "–", "–", "–", "–")
		}
		row = append(row, memCol(t, func(m SidecarMemory) string { return fmt.Sprintf("%.1f", float64(m.IdleKB)/1024) }),
			memCol(t, func(m SidecarMemory) string { return fmt.Sprintf("%.1f", float64(m.IdleAnonKB)/1024) }),
			memCol(t, func(m SidecarMemory) string { return fmt.Sprintf("%.1f", float64(m.IdlePSSKB)/1024) }),
			memCol(t, func(m SidecarMemory) string {
				if m.Conns == 0 {
					return "–"
				}
				return fmt.Sprintf("%.1f", float64(m.BeforeKB)/1024)
			}),
			memCol(t, func(m SidecarMemory) string {
				if m.Conns == 0 {
					return "–"
				}
				return fmt.Sprintf("%.1f", float64(m.BeforeAnonKB)/1024)
			}),
			memCol(t, func(m SidecarMemory) string {
				if m.Conns == 0 {
					return "–"
				}
				return fmt.Sprintf("%.1f", float64(m.WithConnsKB)/1024)
			}),
			memCol(t, func(m SidecarMemory) string {
				if m.Conns == 0 {
					return "–"
				}
				return fmt.Sprintf("%.1f", m.PerConnKB)
			}))
		p("| %s |\n", strings.Join(row, " | "))
	}

	ms := r.metrics()
	p("\nRatio to the best proxy per column (1.00 = best; above 1 is better for MB/s and conn/s, worse for the others):\n\n")
	p("| topology |")
	for _, m := range ms {
		p(" %s |", m.name)
	}
	p("\n|---|%s\n", strings.Repeat("---:|", len(ms)))
	for i := range r.Topologies {
		t := &r.Topologies[i]
		if t.Name == "direct" {
			continue
		}
		p("| %s |", t.Name)
		for _, m := range ms {
			v, ok := m.get(t)
			b, _, okb := r.best(m, "")
			switch {
			case !ok || !okb:
				p(" – |")
			case b == 0:
				p(" %s |", trimFloat(v))
			default:
				p(" %.2f |", v/b)
			}
		}
		p("\n")
	}

	if l := r.find("latch"); l != nil {
		p("\nlatch against its performance targets:\n\n| target | latch | reference | met |\n|---|---:|---|:---:|\n")
		for _, row := range r.targets(l) {
			p("| %s | %s | %s | %s |\n", row.target, row.latch, row.ref, row.met)
		}
	}
	for i := range r.Topologies {
		t := &r.Topologies[i]
		if rs := t.Resumption; rs != nil {
			p("\n%s: %d of %d connections closed by the inbound sidecar so far resumed a TLS session.\n", t.Name, rs.Resumed, rs.Connections)
		}
		for _, n := range t.Notes {
			p("\nNote (%s): %s\n", t.Name, n)
		}
		for _, e := range t.Errors {
			p("\nError (%s): %s\n", t.Name, e)
		}
	}
	for _, s := range r.Skipped {
		p("\nSkipped %s: %s\n", s.Name, s.Reason)
	}
}

type targetRow struct{ target, latch, ref, met string }

// targets checks latch against its performance targets, each against the best
// other proxy in the same run.
func (r *Result) targets(l *TopologyResult) []targetRow {
	var rows []targetRow
	yes := func(ok bool) string {
		if ok {
			return "yes"
		}
		return "**no**"
	}
	ms := r.metrics()
	byName := func(name string) metric {
		for _, m := range ms {
			if m.name == name {
				return m
			}
		}
		panic("unknown metric " + name)
	}
	direct := r.find("direct")
	for _, conns := range r.Options.BulkConns {
		m := byName(fmt.Sprintf("bulk ×%d MB/s", conns))
		v, ok := m.get(l)
		if !ok {
			rows = append(rows, targetRow{m.name + " ≥ every peer", "–", "not measured", "–"})
			continue
		}
		if b, who, okb := r.best(m, "latch"); okb {
			rows = append(rows, targetRow{fmt.Sprintf("bulk ×%d ≥ every peer", conns), fmt.Sprintf("%.0f MB/s", v),
				fmt.Sprintf("%s %.0f MB/s (×%.2f)", who, b, v/b), yes(v >= b)})
		}
		if direct != nil {
			if d, okd := m.get(direct); okd && d > 0 {
				rows = append(rows, targetRow{fmt.Sprintf("bulk ×%d ≥ 60%% of direct", conns), fmt.Sprintf("%.0f%%", 100*v/d),
					fmt.Sprintf("direct %.0f MB/s", d), yes(v >= 0.6*d)})
			}
		}
	}
	if v, ok := byName("pair CPU s/GB").get(l); ok {
		ref := "1.0 s/GB"
		if b, who, okb := r.best(byName("pair CPU s/GB"), "latch"); okb {
			ref += fmt.Sprintf(" (best peer %s %.2f)", who, b)
		}
		rows = append(rows, targetRow{"CPU ≤ 1.0 s per GB (pair)", fmt.Sprintf("%.2f s/GB", v), ref, yes(v <= 1.0)})
	}
	for _, c := range []struct {
		name, target string
	}{
		{"added p99 µs", "added p99 latency ≤ best peer's"},
		{"conn/s", "new connections/s ≥ every peer"},
	} {
		m := byName(c.name)
		v, ok := m.get(l)
		b, who, okb := r.best(m, "latch")
		if !ok || !okb {
			continue
		}
		met := v <= b
		if m.higherBetter {
			met = v >= b
		}
		rows = append(rows, targetRow{c.target, trimFloat(v), fmt.Sprintf("%s %s", who, trimFloat(b)), yes(met)})
	}
	if v, ok := byName("max idle RSS MB").get(l); ok {
		// RSS is the target's figure; anon and PSS say how much of it is
		// the sidecar's own and how much the binary shared in the page cache.
		anon, _ := byName("max idle anon MB").get(l)
		pss, _ := byName("max idle PSS MB").get(l)
		rows = append(rows, targetRow{"RSS ≤ 12 MB idle per sidecar", fmt.Sprintf("%.1f MB (anon %.1f, PSS %.1f)", v, anon, pss), "12 MB", yes(v <= 12)})
	}
	if v, ok := byName("max KB/conn").get(l); ok {
		rows = append(rows, targetRow{"≤ 16 KB per idle proxied connection", fmt.Sprintf("%.1f KB", v), "16 KB", yes(v <= 16)})
	}
	return rows
}

func orDash(f func() (string, bool)) string {
	if s, ok := f(); ok {
		return s
	}
	return "–"
}

func memCol(t *TopologyResult, f func(SidecarMemory) string) string {
	if len(t.Memory) == 0 {
		return "–"
	}
	parts := make([]string, len(t.Memory))
	for i, m := range t.Memory {
		parts[i] = f(m)
	}
	return strings.Join(parts, " / ")
}

func f1(v float64) string { return fmt.Sprintf("%.1f", v) }
func f1p(v *float64) string {
	if v == nil {
		return "–"
	}
	return f1(*v)
}

func trimFloat(v float64) string {
	if math.Abs(v) >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}
