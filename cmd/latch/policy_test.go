package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity/devca"
	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/proxy"
)

// TestNoPolicyForThisIdentity runs a control plane that declares the
// backend only, and a sidecar whose identity has no declaration: the
// sidecar is not ready and says why in /readyz, /status, its metrics and a
// WARN, and the control plane warns, counts and lists it. Once a
// declaration for it appears, it turns ready by itself; when the
// declaration goes, both sides say so again.
func TestNoPolicyForThisIdentity(t *testing.T) {
	const td = "demo.latch.test"
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	ca, err := devca.New(td, devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cpSocket, err := ca.AddWorkload("spiffe://" + td + "/latch/control-plane")
	if err != nil {
		t.Fatal(err)
	}
	orphan := "spiffe://" + td + "/ns/demo/sa/orphan"
	sock, err := ca.AddWorkload(orphan)
	if err != nil {
		t.Fatal(err)
	}
	xdsAddr, err := freeport.Addr()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	declare := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	declare("backend.yaml", fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: backend}
spec:
  spiffeID: spiffe://%[1]s/ns/demo/sa/backend
  inbound:
    - port: 15001
      appAddress: 127.0.0.1:7001
      allow: [{trustDomain: %[1]s}]
`, td))

	cpLogs := newJSONLines()
	cpDone := make(chan error, 1)
	go func() {
		cpDone <- runControlPlane(ctx, []string{"--declarations", dir, "--listen", xdsAddr, "--admin-address", "127.0.0.1:0",
			"--workload-api", cpSocket, "--inbound-host", "127.0.0.1", "--debounce", "10ms"}, io.Discard, cpLogs.w)
	}()
	cpAdmin := cpLogs.wait(t, "control plane serving", nil)["admin_address"].(string)

	logs := newJSONLines()
	exited := make(chan error, 1)
	go func() {
		exited <- runProxy(ctx, []string{"--xds-address", xdsAddr, "--xds-server-id", "spiffe://" + td + "/latch/control-plane",
			"--workload-api", sock, "--admin-address", "127.0.0.1:0"}, io.Discard, logs.w)
	}()
	admin := logs.wait(t, "admin endpoint listening", nil)["addr"].(string)
	getFrom := func(admin, path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + admin + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	get := func(path string) (int, string) { t.Helper(); return getFrom(admin, path) }

	warn := logs.wait(t, "no policy for this identity", func(l map[string]any) bool { return l["level"] == "WARN" })
	if r, _ := warn["reason"].(string); !strings.Contains(r, "declare a ServicePolicy whose spiffeID is "+orphan) {
		t.Errorf("the warning does not say what to declare: %v", warn)
	}
	code, body := get("/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "policy: no policy for "+orphan+": the control plane declares no listener") {
		t.Errorf("/readyz with an empty policy = %d %q", code, body)
	}
	_, body = get("/status")
	var st struct {
		Policy struct {
			Source   string   `json:"source"`
			Inbound  int      `json:"inbound"`
			Outbound int      `json:"outbound"`
			Warnings []string `json:"warnings"`
		} `json:"policy"`
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.Policy.Source != "xds" || len(st.Policy.Warnings) != 1 ||
		!strings.HasPrefix(st.Policy.Warnings[0], "no policy for "+orphan) {
		t.Errorf("/status with an empty policy: %v %s", err, body)
	}
	_, metrics := get("/metrics")
	for _, want := range []string{MetricPolicyListeners + `{direction="inbound"} 0`, MetricPolicyListeners + `{direction="outbound"} 0`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	// The control plane says it too.
	cpWarn := cpLogs.wait(t, "no declaration for node: serving it nothing", func(l map[string]any) bool { return l["level"] == "WARN" && l["node"] == orphan })
	if r, _ := cpWarn["reason"].(string); !strings.Contains(r, "no ServicePolicy declares this SPIFFE ID") {
		t.Errorf("control plane warning: %v", cpWarn)
	}
	if _, m := getFrom(cpAdmin, "/metrics"); !strings.Contains(m, "latch_xds_undeclared_nodes 1") {
		t.Errorf("control plane /metrics lacks latch_xds_undeclared_nodes 1")
	}
	_, cpStatus := getFrom(cpAdmin, "/status")
	var cst struct {
		Undeclared []string `json:"undeclared_nodes"`
	}
	if err := json.Unmarshal([]byte(cpStatus), &cst); err != nil || len(cst.Undeclared) != 1 || cst.Undeclared[0] != orphan {
		t.Errorf("control plane /status undeclared_nodes: %v %s", err, cpStatus)
	}

	// The declaration arrives: the sidecar turns ready, without a restart.
	declare("orphan.yaml", fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: orphan}
spec:
  spiffeID: %s
  outbound:
    - port: %d
      target: 127.0.0.1:15001
      serverID: spiffe://%s/ns/demo/sa/backend
`, orphan, mustPort(t), td))
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, body := get("/readyz")
		if code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz never turned ready after the declaration: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, metrics := get("/metrics"); !strings.Contains(metrics, MetricPolicyListeners+`{direction="outbound"} 1`) {
		t.Errorf("/metrics after the declaration lacks one outbound listener")
	}
	if _, m := getFrom(cpAdmin, "/metrics"); !strings.Contains(m, "latch_xds_undeclared_nodes 0") {
		t.Errorf("control plane /metrics: the node is still counted as undeclared")
	}

	// And when the declaration goes again, both sides say so.
	if err := os.Remove(filepath.Join(dir, "orphan.yaml")); err != nil {
		t.Fatal(err)
	}
	cpLogs.wait(t, "declaration removed: serving the node nothing", func(l map[string]any) bool { return l["level"] == "WARN" && l["node"] == orphan })
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		code, body := get("/readyz")
		if code == http.StatusServiceUnavailable && strings.Contains(body, "no policy for "+orphan) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz after the declaration was removed = %d %q", code, body)
		}
	}
	// Once per empty policy applied: the first one and this one.
	for deadline := time.Now().Add(15 * time.Second); logs.count("no policy for this identity") < 2; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the sidecar did not warn again when its declaration was removed")
		}
	}

	cancel()
	for _, done := range []chan error{exited, cpDone} {
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("exit: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("did not exit")
		}
	}
	for _, l := range []*jsonLines{logs, cpLogs} {
		l.w.Close()
		<-l.done
		l.requireNoRepeatedKeys(t)
	}
}

func mustPort(t *testing.T) int {
	t.Helper()
	p, err := freeport.Port()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestStaticAllowListThatAdmitsNobody: a listener whose allow rules all name
// other trust domains (whose peers latch never verifies) or none is named at
// start; one local rule is enough to be quiet.
func TestStaticAllowListThatAdmitsNobody(t *testing.T) {
	local := spiffeid.RequireTrustDomainFromString("mesh.test")
	for _, tc := range []struct {
		name, allow string
		want        string // "" = no warning
	}{
		{"other trust domain by name", "      - trustDomain: other.test\n", `inbound listener "web" admits nobody: every allow rule names another trust domain (other.test) than this sidecar's, mesh.test`},
		{"other trust domains by ID and prefix", "      - id: spiffe://b.test/x\n      - pathPrefix: spiffe://a.test/ns\n      - id: spiffe://b.test/y\n", "(a.test, b.test)"},
		{"one local rule among others", "      - id: spiffe://other.test/x\n      - id: spiffe://mesh.test/x\n", ""},
		{"local trust domain", "      - trustDomain: mesh.test\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := proxy.Parse("latch.yaml", []byte("inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: 127.0.0.1:9\n    allow:\n"+tc.allow))
			if err != nil {
				t.Fatal(err)
			}
			got := strings.Join(admitsNobody(cfg, local), "\n")
			if tc.want == "" && got != "" || !strings.Contains(got, tc.want) {
				t.Errorf("warnings %q, want %q", got, tc.want)
			}
		})
	}
	empty := &proxy.Config{Inbound: []proxy.Inbound{{Name: "web"}}}
	if got := admitsNobody(empty, local); len(got) != 1 || !strings.Contains(got[0], "allow-list is empty (deny all)") {
		t.Errorf("empty allow-list: %q", got)
	}

	// At start, the sidecar says so at WARN.
	ca, err := devca.New("mesh.test", devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	sock, err := ca.AddWorkload("spiffe://mesh.test/ns/default/sa/web")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "latch.yaml")
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	if err := os.WriteFile(path, []byte("inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: "+app.Addr().String()+"\n    allow:\n      - trustDomain: other.test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newJSONLines()
	exited := make(chan error, 1)
	go func() {
		exited <- runProxy(ctx, []string{"--config", path, "--workload-api", sock, "--admin-address", "off"}, io.Discard, logs.w)
	}()
	logs.wait(t, "policy admits nobody", func(l map[string]any) bool {
		r, _ := l["reason"].(string)
		return l["level"] == "WARN" && strings.Contains(r, `inbound listener "web" admits nobody`)
	})
	cancel()
	if err := <-exited; err != nil {
		t.Fatal(err)
	}
	logs.w.Close()
	<-logs.done
}
