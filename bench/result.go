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
	// LoadBefore and LoadAfter are /proc/loadavg's 1, 5 and 15 minute
	// figures when the run started and ended: what else the machine ran.
	LoadBefore string `json:"loadBefore,omitempty"`
	LoadAfter  string `json:"loadAfter,omitempty"`
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
	Rest           string `json:"rest"`
	BulkConns      []int  `json:"bulkConns"`
	MessageSize    int    `json:"messageSize"`
	ConnectWorkers int    `json:"connectWorkers"`
	IdleConns      int    `json:"idleConns"`
}

func (o Options) summary() OptionsSummary {
	return OptionsSummary{
		Duration: o.Duration.String(), Rounds: o.Rounds, Rest: o.Rest.String(), BulkConns: o.BulkConns,
		MessageSize: o.MessageSize, ConnectWorkers: o.ConnectWorkers, IdleConns: o.IdleConns,
	}
}

// Skipped is a topology that did not run, and why.
type Skipped struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// TopologyResult is everything measured of one topology. Every figure is
// the median of the rounds' figures; the rounds are kept beside it.
type TopologyResult struct {
	Name    string         `json:"name"`
	Version string         `json:"version"`
	Notes   []string       `json:"notes,omitempty"`
	Bulk    []*BulkFigures `json:"bulk"`
	Latency *LatencyResult `json:"latency,omitempty"`
	// Connect is the new-connection test with full handshakes (session
	// resumption off everywhere).
	Connect *ConnectResult `json:"connect,omitempty"`
	// ConnectResumed is the same test on a second pair with session
	// resumption on; nil where the client side cannot resume.
	ConnectResumed *ConnectResult `json:"connectResumed,omitempty"`
	// Counts are perf stat's counts per round trip and per connection.
	Counts *Counts         `json:"counts,omitempty"`
	Memory []SidecarMemory `json:"memory,omitempty"`
	// Resumption is how many of the inbound sidecar's connections resumed
	// a TLS session (latch only: read from its access log).
	Resumption *Resumption `json:"resumption,omitempty"`
	// Profiles maps a load ("bulk8", "latency", "connect") to a perf
	// report file.
	Profiles map[string]string `json:"profiles,omitempty"`
	Errors   []string          `json:"errors,omitempty"`
}

// BulkFigures is the bulk throughput at one connection count.
type BulkFigures struct {
	Conns      int       `json:"conns"`
	MBps       float64   `json:"MBps"`
	RoundsMBps []float64 `json:"roundsMBps"`
	Bytes      uint64    `json:"bytes"`
	// CPUSecondsPerGB is the pair's CPU time (both sidecars, to the end of
	// the rest after each run) per 10^9 payload bytes; nil for baselines.
	CPUSecondsPerGB       *float64  `json:"cpuSecondsPerGB,omitempty"`
	RoundsCPUSecondsPerGB []float64 `json:"roundsCPUSecondsPerGB,omitempty"`
	// HarnessCPUSecondsPerGB is the harness's own CPU time (the load client
	// and the backend; for go-mtls both TLS ends) per 10^9 payload bytes,
	// over the same span: what the rest of the path cost beside the pair.
	HarnessCPUSecondsPerGB       *float64  `json:"harnessCPUSecondsPerGB,omitempty"`
	RoundsHarnessCPUSecondsPerGB []float64 `json:"roundsHarnessCPUSecondsPerGB,omitempty"`
}

// LatencyResult is the round-trip time of an echo on a persistent
// connection: each percentile taken per round, then the median of the
// rounds.
type LatencyResult struct {
	RoundTrips  int       `json:"roundTrips"`
	P50us       float64   `json:"p50us"`
	P90us       float64   `json:"p90us"`
	P99us       float64   `json:"p99us"`
	P999us      float64   `json:"p999us"`
	RoundsP50us []float64 `json:"roundsP50us"`
	RoundsP99us []float64 `json:"roundsP99us"`
	// PooledP50us and PooledP99us are over every round's samples together.
	PooledP50us float64 `json:"pooledP50us"`
	PooledP99us float64 `json:"pooledP99us"`
	// CPUusPerRoundTrip is the pair's CPU time per round trip, and
	// ContextSwitchesPerRoundTrip its context switches (from /proc); nil
	// for baselines.
	CPUusPerRoundTrip           *float64  `json:"cpuUsPerRoundTrip,omitempty"`
	RoundsCPUusPerRoundTrip     []float64 `json:"roundsCPUUsPerRoundTrip,omitempty"`
	ContextSwitchesPerRoundTrip *float64  `json:"contextSwitchesPerRoundTrip,omitempty"`
	// Added* are the same percentiles minus the direct baseline's.
	AddedP50us *float64 `json:"addedP50us,omitempty"`
	AddedP99us *float64 `json:"addedP99us,omitempty"`
}

// ConnectResult is a new-connection test.
type ConnectResult struct {
	Count           int       `json:"count"`
	PerSecond       float64   `json:"perSecond"`
	RoundsPerSecond []float64 `json:"roundsPerSecond"`
	TTFBP50ms       float64   `json:"ttfbP50ms"`
	TTFBP99ms       float64   `json:"ttfbP99ms"`
	// PairCPUmsPerConn is both sidecars' CPU time per connection.
	PairCPUmsPerConn       *float64  `json:"pairCPUmsPerConn,omitempty"`
	RoundsPairCPUmsPerConn []float64 `json:"roundsPairCPUmsPerConn,omitempty"`
}

// Counts are what perf stat counted on both sidecars over one
// request/response run and one new-connection run (full handshakes) after
// the rounds.
type Counts struct {
	RoundTrips                  int     `json:"roundTrips"`
	SyscallsPerRoundTrip        float64 `json:"syscallsPerRoundTrip"`
	ContextSwitchesPerRoundTrip float64 `json:"contextSwitchesPerRoundTrip"`
	CPUusPerRoundTrip           float64 `json:"cpuUsPerRoundTrip"`
	Connections                 int     `json:"connections"`
	SyscallsPerConn             float64 `json:"syscallsPerConn"`
	ContextSwitchesPerConn      float64 `json:"contextSwitchesPerConn"`
	CPUmsPerConn                float64 `json:"cpuMsPerConn"`
}

// Resumption counts resumed TLS sessions among the inbound side's closed
// connections: of the pair told not to resume, and of the pair with
// resumption on.
type Resumption struct {
	FullResumed     int `json:"fullResumed"`
	FullConnections int `json:"fullConnections"`
	Resumed         int `json:"resumed"`
	Connections     int `json:"connections"`
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
	// load tests and a rest, so with the code and buffers the load used).
	BeforeKB     int64 `json:"beforeKB"`
	BeforeAnonKB int64 `json:"beforeAnonKB"`
	BeforePSSKB  int64 `json:"beforePssKB"`
	// WithConns is while Conns of them were open, after a rest; PerConn*
	// what each added to it. PerConnFreshKB is the RSS per connection
	// read right after the last one opened, before the rest.
	WithConnsKB     int64   `json:"withConnsKB"`
	WithConnsAnonKB int64   `json:"withConnsAnonKB"`
	WithConnsPSSKB  int64   `json:"withConnsPssKB"`
	Conns           int     `json:"conns"`
	PerConnKB       float64 `json:"perConnKB"`
	PerConnAnonKB   float64 `json:"perConnAnonKB"`
	PerConnPSSKB    float64 `json:"perConnPssKB"`
	PerConnFreshKB  float64 `json:"perConnFreshKB"`
	// Threads before the idle connections were opened and with them open
	// (after the rest).
	BeforeThreads    int `json:"beforeThreads"`
	WithConnsThreads int `json:"withConnsThreads"`
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

func (t *TopologyResult) bulkAt(conns int) *BulkFigures {
	for _, b := range t.Bulk {
		if b.Conns == conns && b.Bytes > 0 {
			return b
		}
	}
	return nil
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
		l.AddedP99us = sub(l.P99us, d.Latency.P99us)
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

// metric is one figure of the comparison: how to read it from a topology and
// which direction is better.
type metric struct {
	name         string
	higherBetter bool
	get          func(*TopologyResult) (float64, bool)
}

func (r *Result) metrics() []metric {
	ms := []metric{
		{"p50 µs", false, func(t *TopologyResult) (float64, bool) {
			return ptrOK(t.Latency != nil, func() float64 { return t.Latency.P50us })
		}},
		{"p99 µs", false, func(t *TopologyResult) (float64, bool) {
			return ptrOK(t.Latency != nil, func() float64 { return t.Latency.P99us })
		}},
		{"CPU µs/round trip", false, func(t *TopologyResult) (float64, bool) {
			if t.Latency == nil || t.Latency.CPUusPerRoundTrip == nil {
				return 0, false
			}
			return *t.Latency.CPUusPerRoundTrip, true
		}},
	}
	for _, b := range r.Options.BulkConns {
		ms = append(ms,
			metric{fmt.Sprintf("bulk ×%d MB/s", b), true, func(t *TopologyResult) (float64, bool) {
				f := t.bulkAt(b)
				return ptrOK(f != nil, func() float64 { return f.MBps })
			}},
			metric{fmt.Sprintf("CPU s/GB ×%d", b), false, func(t *TopologyResult) (float64, bool) {
				f := t.bulkAt(b)
				if f == nil || f.CPUSecondsPerGB == nil {
					return 0, false
				}
				return *f.CPUSecondsPerGB, true
			}})
	}
	ms = append(ms,
		metric{"full conn/s", true, func(t *TopologyResult) (float64, bool) {
			return ptrOK(t.Connect != nil, func() float64 { return t.Connect.PerSecond })
		}},
		metric{"CPU ms/full conn", false, func(t *TopologyResult) (float64, bool) {
			if t.Connect == nil || t.Connect.PairCPUmsPerConn == nil {
				return 0, false
			}
			return *t.Connect.PairCPUmsPerConn, true
		}},
		metric{"resumed conn/s", true, func(t *TopologyResult) (float64, bool) {
			return ptrOK(t.ConnectResumed != nil, func() float64 { return t.ConnectResumed.PerSecond })
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

func ptrOK(ok bool, f func() float64) (float64, bool) {
	if !ok {
		return 0, false
	}
	return f(), true
}

func (r *Result) metric(name string) metric {
	for _, m := range r.metrics() {
		if m.name == name {
			return m
		}
	}
	panic("unknown metric " + name)
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

// best returns the best value of m among the proxy pairs (not the
// baselines) other than exclude, and who holds it.
func (r *Result) best(m metric, exclude string) (float64, string, bool) {
	var best float64
	var who string
	found := false
	for i := range r.Topologies {
		t := &r.Topologies[i]
		if isBaseline(t.Name) || t.Name == exclude {
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

// WriteMarkdown prints the tables: request/response, bulk, new connections,
// memory, ratios to the best proxy, and latch against its targets.
func (r *Result) WriteMarkdown(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("latch-bench %s · %d rounds × %s, %s rest after each · %s, %d CPUs, %s, Linux %s · load average %s at the start, %s at the end\n\n",
		r.Started.Format("2006-01-02 15:04 UTC"), r.Options.Rounds, r.Options.Duration, r.Options.Rest,
		r.Host.CPUModel, r.Host.CPUs, r.Host.GoVersion, r.Host.Kernel, orNone(r.LoadBefore), orNone(r.LoadAfter))
	p("Every figure is the median of the rounds' figures. Pair CPU is both sidecars' user + system time from the start of a measurement to the end of the rest after it.\n\n")

	counted := slices.ContainsFunc(r.Topologies, func(t TopologyResult) bool { return t.Counts != nil })
	p("Request/response: one connection, %d-byte echo, one message at a time.\n\n", r.Options.MessageSize)
	p("| topology | version | p50 µs | p90 | p99 | p99.9 | added p50 | added p99 | pair CPU µs / round trip | context switches / round trip |")
	if counted {
		p(" syscalls / round trip (perf) |")
	}
	p("\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|%s\n", map[bool]string{true: "---:|"}[counted])
	for i := range r.Topologies {
		t := &r.Topologies[i]
		row := []string{t.Name, t.Version}
		if l := t.Latency; l != nil {
			row = append(row, f1(l.P50us), f1(l.P90us), f1(l.P99us), f1(l.P999us), f1p(l.AddedP50us), f1p(l.AddedP99us), f1p(l.CPUusPerRoundTrip), f1p(l.ContextSwitchesPerRoundTrip))
		} else {
			row = append(row, dashes(8)...)
		}
		if counted {
			row = append(row, orDash(func() (string, bool) {
				return ptrFmt(t.Counts != nil, func() string { return f1(t.Counts.SyscallsPerRoundTrip) })
			}))
		}
		p("| %s |\n", strings.Join(row, " | "))
	}

	p("\nBulk: 64 KiB frames streamed for the duration, checked by count and CRC-32C at the backend. Client+backend CPU: the harness process's own CPU time over the same span (the load client and the backend, for go-mtls both TLS ends; for a proxy pair, the rest of the path beside it).\n\n| topology |")
	for _, c := range r.Options.BulkConns {
		p(" bulk ×%d MB/s | pair CPU s/GB ×%d |", c, c)
	}
	p(" client+backend CPU s/GB ×1 |")
	goref := r.find("go-mtls")
	if goref != nil {
		p(" ×1 of go-mtls |")
	}
	p("\n|---|%s---:|%s\n", strings.Repeat("---:|", 2*len(r.Options.BulkConns)), map[bool]string{true: "---:|"}[goref != nil])
	for i := range r.Topologies {
		t := &r.Topologies[i]
		row := []string{t.Name}
		for _, c := range r.Options.BulkConns {
			b := t.bulkAt(c)
			row = append(row, orDash(func() (string, bool) { return ptrFmt(b != nil, func() string { return fmt.Sprintf("%.0f", b.MBps) }) }),
				orDash(func() (string, bool) {
					return ptrFmt(b != nil && b.CPUSecondsPerGB != nil, func() string { return fmt.Sprintf("%.2f", *b.CPUSecondsPerGB) })
				}))
		}
		row = append(row, orDash(func() (string, bool) {
			b := t.bulkAt(1)
			return ptrFmt(b != nil && b.HarnessCPUSecondsPerGB != nil, func() string { return fmt.Sprintf("%.2f", *b.HarnessCPUSecondsPerGB) })
		}))
		if goref != nil {
			row = append(row, orDash(func() (string, bool) {
				b, g := t.bulkAt(1), goref.bulkAt(1)
				return ptrFmt(b != nil && g != nil && g.MBps > 0, func() string { return fmt.Sprintf("%.0f%%", 100*b.MBps/g.MBps) })
			}))
		}
		p("| %s |\n", strings.Join(row, " | "))
	}

	p("\nNew connections: %d workers loop over connect, 1-byte echo, close. Full handshakes: session resumption off on every client side; resumed: a second pair of the same proxy with resumption on (its default).\n\n", r.Options.ConnectWorkers)
	p("| topology | full handshakes conn/s | first byte p50 ms | p99 ms | pair CPU ms/conn |")
	if counted {
		p(" syscalls / conn (perf) |")
	}
	p(" resumed conn/s | first byte p50 ms | pair CPU ms/conn |\n|---|---:|---:|---:|---:|%s---:|---:|---:|\n", map[bool]string{true: "---:|"}[counted])
	for i := range r.Topologies {
		t := &r.Topologies[i]
		row := []string{t.Name}
		if c := t.Connect; c != nil {
			row = append(row, fmt.Sprintf("%.0f", c.PerSecond), fmt.Sprintf("%.2f", c.TTFBP50ms), fmt.Sprintf("%.2f", c.TTFBP99ms), f2p(c.PairCPUmsPerConn))
		} else {
			row = append(row, dashes(4)...)
		}
		if counted {
			row = append(row, orDash(func() (string, bool) {
				return ptrFmt(t.Counts != nil, func() string { return fmt.Sprintf("%.0f", t.Counts.SyscallsPerConn) })
			}))
		}
		if c := t.ConnectResumed; c != nil {
			row = append(row, fmt.Sprintf("%.0f", c.PerSecond), fmt.Sprintf("%.2f", c.TTFBP50ms), f2p(c.PairCPUmsPerConn))
		} else {
			row = append(row, dashes(3)...)
		}
		p("| %s |\n", strings.Join(row, " | "))
	}

	p("\nMemory (MB; out / in sidecar), from /proc/PID/smaps_rollup summed over each sidecar's processes: RSS, its anonymous part (heap, stacks) and PSS (shared pages divided among the processes sharing them). Idle: after start-up and a %s rest; after load: after every test and a rest; per connection: (with %d idle connections − after load) ÷ %d, after a rest, and RSS right after the last one opened; threads: OS threads after load and with the connections open.\n\n", settle, r.Options.IdleConns, r.Options.IdleConns)
	p("| topology | RSS idle | anon idle | PSS idle | RSS after load | anon after load | PSS after load | RSS with %d conns | KB/conn RSS | anon | PSS | RSS right after opening | threads |\n", r.Options.IdleConns)
	p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for i := range r.Topologies {
		t := &r.Topologies[i]
		if len(t.Memory) == 0 {
			continue
		}
		withConns := func(f func(SidecarMemory) string) string {
			return memCol(t, func(m SidecarMemory) string {
				if m.Conns == 0 {
					return "–"
				}
				return f(m)
			})
		}
		kb := func(v int64) string { return fmt.Sprintf("%.1f", float64(v)/1024) }
		p("| %s |\n", strings.Join([]string{t.Name,
			memCol(t, func(m SidecarMemory) string { return kb(m.IdleKB) }),
			memCol(t, func(m SidecarMemory) string { return kb(m.IdleAnonKB) }),
			memCol(t, func(m SidecarMemory) string { return kb(m.IdlePSSKB) }),
			withConns(func(m SidecarMemory) string { return kb(m.BeforeKB) }),
			withConns(func(m SidecarMemory) string { return kb(m.BeforeAnonKB) }),
			withConns(func(m SidecarMemory) string { return kb(m.BeforePSSKB) }),
			withConns(func(m SidecarMemory) string { return kb(m.WithConnsKB) }),
			withConns(func(m SidecarMemory) string { return f1(m.PerConnKB) }),
			withConns(func(m SidecarMemory) string { return f1(m.PerConnAnonKB) }),
			withConns(func(m SidecarMemory) string { return f1(m.PerConnPSSKB) }),
			withConns(func(m SidecarMemory) string { return f1(m.PerConnFreshKB) }),
			withConns(func(m SidecarMemory) string { return fmt.Sprintf("%d→%d", m.BeforeThreads, m.WithConnsThreads) }),
		}, " | "))
	}

	ms := r.metrics()
	p("\nRatio to the best proxy pair per column (1.00 = best; above 1 is better for MB/s and conn/s, worse for the others):\n\n| topology |")
	for _, m := range ms {
		p(" %s |", m.name)
	}
	p("\n|---|%s\n", strings.Repeat("---:|", len(ms)))
	for i := range r.Topologies {
		t := &r.Topologies[i]
		if isBaseline(t.Name) {
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
			p("\n%s: of the connections the inbound sidecar closed, %d of %d resumed a TLS session on the pair told not to resume, %d of %d on the pair with resumption on.\n",
				t.Name, rs.FullResumed, rs.FullConnections, rs.Resumed, rs.Connections)
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

// targets checks latch against its performance targets, each against the
// other proxies or the baselines in the same run.
func (r *Result) targets(l *TopologyResult) []targetRow {
	var rows []targetRow
	yes := func(ok bool) string {
		if ok {
			return "yes"
		}
		return "**no**"
	}
	cmp := func(m metric, v, ref, factor float64) bool {
		if m.higherBetter {
			return v >= ref*factor
		}
		return v <= ref*factor
	}
	// Request/response against ghostunnel, then against 0.8× the best
	// other pair.
	for _, name := range []string{"p50 µs", "p99 µs", "CPU µs/round trip"} {
		m := r.metric(name)
		v, ok := m.get(l)
		if !ok {
			continue
		}
		if g := r.find("ghostunnel"); g != nil {
			if gv, ok := m.get(g); ok {
				rows = append(rows, targetRow{"request/response " + name + " ≤ ghostunnel's", trimFloat(v),
					fmt.Sprintf("ghostunnel %s (×%.2f)", trimFloat(gv), v/gv), yes(cmp(m, v, gv, 1))})
			}
		}
		if b, who, ok := r.best(m, "latch"); ok {
			rows = append(rows, targetRow{"request/response " + name + " ≤ 0.8 × best peer's", trimFloat(v),
				fmt.Sprintf("%s %s (×%.2f)", who, trimFloat(b), v/b), yes(cmp(m, v, b, 0.8))})
		}
	}
	if b, g := l.bulkAt(1), r.find("go-mtls"); b != nil && g != nil && g.bulkAt(1) != nil {
		ref := g.bulkAt(1).MBps
		rows = append(rows, targetRow{"bulk ×1 ≥ 85% of Go mTLS with no proxies", fmt.Sprintf("%.0f MB/s (%.0f%%)", b.MBps, 100*b.MBps/ref),
			fmt.Sprintf("go-mtls %.0f MB/s", ref), yes(b.MBps >= 0.85*ref)})
	}
	for _, name := range []string{"full conn/s", "CPU ms/full conn"} {
		m := r.metric(name)
		v, ok := m.get(l)
		b, who, okb := r.best(m, "latch")
		if !ok || !okb {
			continue
		}
		rows = append(rows, targetRow{"new connections, full handshake: " + name + " better than every peer", trimFloat(v),
			fmt.Sprintf("%s %s (×%.2f)", who, trimFloat(b), v/b), yes(cmp(m, v, b, 1) && v != b)})
	}
	for _, c := range r.Options.BulkConns {
		m := r.metric(fmt.Sprintf("bulk ×%d MB/s", c))
		v, ok := m.get(l)
		b, who, okb := r.best(m, "latch")
		if !ok || !okb {
			continue
		}
		rows = append(rows, targetRow{fmt.Sprintf("bulk ×%d ≥ every peer", c), fmt.Sprintf("%.0f MB/s", v),
			fmt.Sprintf("%s %.0f MB/s (×%.2f)", who, b, v/b), yes(v >= b)})
	}
	if v, ok := maxMemory(l, func(m SidecarMemory) float64 { return float64(m.IdleKB) / 1024 }); ok {
		// RSS is the target's figure; anon and PSS say how much of it is
		// the sidecar's own and how much the binary shared in the page cache.
		anon, _ := maxMemory(l, func(m SidecarMemory) float64 { return float64(m.IdleAnonKB) / 1024 })
		pss, _ := maxMemory(l, func(m SidecarMemory) float64 { return float64(m.IdlePSSKB) / 1024 })
		rows = append(rows, targetRow{"RSS ≤ 12 MB idle per sidecar", fmt.Sprintf("%.1f MB (anon %.1f, PSS %.1f)", v, anon, pss), "12 MB", yes(v <= 12)})
	}
	if v, ok := r.metric("max KB/conn").get(l); ok {
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

func ptrFmt(ok bool, f func() string) (string, bool) {
	if !ok {
		return "", false
	}
	return f(), true
}

func dashes(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "–"
	}
	return out
}

func orNone(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
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
func f2p(v *float64) string {
	if v == nil {
		return "–"
	}
	return fmt.Sprintf("%.2f", *v)
}

func trimFloat(v float64) string {
	if math.Abs(v) >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	if math.Abs(v) >= 10 {
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}
