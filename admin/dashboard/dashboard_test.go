package dashboard

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/admin"
	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/proxy"
	xdsclient "latch.dev/latch/xds/client"
	xdsserver "latch.dev/latch/xds/server"
)

const dashboardFile = "../../charts/latch/dashboards/latch.json"

// recorder is a prometheus.Registerer that keeps the descriptions of what
// is registered, vectors without children included (a Gather would miss
// those).
type recorder struct {
	labels map[string][]string // metric name → its label names
}

var descRE = regexp.MustCompile(`^Desc\{fqName: "([^"]+)", .*constLabels: \{(.*?)\}, variableLabels: \{(.*?)\}\}$`)

func (r *recorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		m := descRE.FindStringSubmatch(d.String())
		if m == nil {
			panic("unparsable " + d.String())
		}
		var labels []string
		for _, kv := range strings.Split(m[2], ",") {
			if k, _, ok := strings.Cut(kv, "="); ok {
				labels = append(labels, k)
			}
		}
		for _, l := range strings.Split(m[3], ",") {
			if l != "" {
				labels = append(labels, strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")"))
			}
		}
		r.labels[m[1]] = labels
	}
	return nil
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		_ = r.Register(c)
	}
}

func (r *recorder) Unregister(prometheus.Collector) bool { return false }

// registered builds every part that exports metrics against a recorder.
func registered(t *testing.T) map[string][]string {
	t.Helper()
	r := &recorder{labels: map[string][]string{}}
	proxy.NewMetrics(r)
	xdsclient.NewMetrics(r)
	xdsserver.NewMetrics(r)
	ca := identitytest.NewCA(t, "mesh.test")
	td := spiffeid.RequireTrustDomainFromString("mesh.test")
	r.MustRegister(admin.NewIdentityMonitor(ca.Source(t, "spiffe://mesh.test/a"), admin.MonitorOptions{TrustDomain: td}))
	if err := admin.RegisterBuildInfo(r, "test"); err != nil {
		t.Fatal(err)
	}
	ep, err := admin.ListenTestEndpoint(admin.TestEndpointOptions{
		Addr: "127.0.0.1:0", TLS: identity.NewTLS(ca.Source(t, "spiffe://mesh.test/a")), TrustDomain: td,
		Registerer: r, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := ep.Serve(ctx); err != nil { // closes the listener at once
		t.Fatal(err)
	}
	return r.labels
}

// queries returns every PromQL expression of the dashboard: panel targets,
// annotations and template variable queries.
func queries(t *testing.T, v any, out *[]string) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if s, ok := x.(string); ok && (k == "expr" || k == "definition") {
				*out = append(*out, s)
				continue
			}
			queries(t, x, out)
		}
	case []any:
		for _, x := range v {
			queries(t, x, out)
		}
	}
}

var (
	metricRE = regexp.MustCompile(`\blatch_[a-zA-Z0-9_]+`)
	byRE     = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	matchRE  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"`)
	valuesRE = regexp.MustCompile(`label_values\([^,]*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\)`)
)

// Labels every scraped series has or that PromQL adds.
var scrapeLabels = []string{"instance", "job", "le"}

func TestDashboardQueriesRegisteredMetrics(t *testing.T) {
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("%s is not JSON: %v", dashboardFile, err)
	}
	reg := registered(t)
	var exprs []string
	queries(t, dash, &exprs)
	if len(exprs) < 20 {
		t.Fatalf("only %d queries found", len(exprs))
	}

	used := map[string]bool{}
	for _, e := range exprs {
		names := metricRE.FindAllString(e, -1)
		if len(names) == 0 {
			t.Errorf("query names no latch metric: %s", e)
		}
		allowed := slices.Clone(scrapeLabels)
		for _, n := range names {
			base := n
			if _, ok := reg[base]; !ok {
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if b := strings.TrimSuffix(n, suf); b != n {
						if _, ok := reg[b]; ok {
							base = b
						}
					}
				}
			}
			labels, ok := reg[base]
			if !ok {
				t.Errorf("query uses %s, which no latch code registers: %s", n, e)
				continue
			}
			used[base] = true
			allowed = append(allowed, labels...)
		}
		var labelsUsed []string
		for _, m := range byRE.FindAllStringSubmatch(e, -1) {
			for _, l := range strings.Split(m[1], ",") {
				labelsUsed = append(labelsUsed, strings.TrimSpace(l))
			}
		}
		for _, m := range matchRE.FindAllStringSubmatch(e, -1) {
			labelsUsed = append(labelsUsed, m[1])
		}
		for _, m := range valuesRE.FindAllStringSubmatch(e, -1) {
			labelsUsed = append(labelsUsed, m[1])
		}
		for _, l := range labelsUsed {
			if l != "" && !slices.Contains(allowed, l) {
				t.Errorf("query uses label %q, which none of its metrics has: %s", l, e)
			}
		}
	}

	var unused []string
	for n := range reg {
		if strings.HasPrefix(n, "latch_") && !used[n] {
			unused = append(unused, n)
		}
	}
	sort.Strings(unused)
	// Not an error: a part may add a metric before the dashboard shows it.
	if len(unused) > 0 {
		t.Logf("registered metrics the dashboard does not show: %v", unused)
	}
}

func TestDashboardShape(t *testing.T) {
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Panels []struct {
			ID         int                      `json:"id"`
			Type       string                   `json:"type"`
			Title      string                   `json:"title"`
			Datasource any                      `json:"datasource"`
			GridPos    struct{ H, W, X, Y int } `json:"gridPos"`
			Targets    []struct {
				RefID string `json:"refId"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatal(err)
	}
	if dash.UID == "" {
		t.Error("no uid: Grafana provisioning would duplicate the dashboard")
	}
	ids := map[int]bool{}
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.X+p.GridPos.W > 24 || p.GridPos.W <= 0 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || len(p.Targets) == 0 {
			t.Errorf("panel %q: no datasource or no query", p.Title)
		}
	}
}
