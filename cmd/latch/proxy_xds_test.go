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

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"latch.dev/latch/identity/devca"
)

// TestProxyCommandFromControlPlane runs `latch proxy --xds-address` before the
// control plane exists: the sidecar serves nothing and /readyz says why (fail
// closed); once `latch control-plane` starts, the sidecar applies its policy,
// /readyz turns 200, /status names the xDS version, and real traffic flows
// through the listener the control plane declared, counted in /metrics.
func TestProxyCommandFromControlPlane(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	const td = "demo.latch.test"
	ca, err := devca.New(td, devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cpSocket, _ := ca.AddWorkload("spiffe://" + td + "/latch/control-plane")
	beSocket, err := ca.AddWorkload("spiffe://" + td + "/backend")
	if err != nil {
		t.Fatal(err)
	}

	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	ports := make([]string, 2) // the CP's xDS port and the backend's inbound port
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().String()
		l.Close()
	}
	_, inPort, _ := net.SplitHostPort(ports[1])
	dir := t.TempDir()
	decl := fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: backend}
spec:
  spiffeID: spiffe://%[1]s/backend
  inbound:
    - port: %[2]s
      appAddress: %[3]s
      allow: [{trustDomain: %[1]s}]
`, td, inPort, app.Addr())
	if err := os.WriteFile(filepath.Join(dir, "backend.yaml"), []byte(decl), 0o600); err != nil {
		t.Fatal(err)
	}

	logs := newJSONLines()
	exited := make(chan error, 1)
	go func() {
		exited <- runProxy(ctx, []string{
			"--xds-address", ports[0], "--xds-server-id", "spiffe://" + td + "/latch/control-plane",
			"--workload-api", beSocket, "--admin-address", "127.0.0.1:0", "--state-dir", t.TempDir(),
		}, io.Discard, logs.w)
	}()
	adminAddr := logs.wait(t, "admin endpoint listening", nil)["addr"].(string)
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + adminAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "policy") {
		t.Fatalf("/readyz before any policy = %d %q, want 503 naming the policy", code, body)
	}
	if c, err := net.DialTimeout("tcp", ports[1], time.Second); err == nil {
		c.Close()
		t.Fatal("a never-configured sidecar accepted a connection")
	}

	cpCtx, cpCancel := context.WithCancel(ctx)
	cpDone := make(chan error, 1)
	cpLogs := newJSONLines()
	go func() {
		cpDone <- runControlPlane(cpCtx, []string{
			"--declarations", dir, "--listen", ports[0], "--admin-address", "127.0.0.1:0",
			"--workload-api", cpSocket, "--inbound-host", "127.0.0.1",
			"--log-level", "debug", // go-control-plane's own lines too
		}, io.Discard, cpLogs.w)
	}()
	defer func() { cpCancel(); <-cpDone; cpLogs.w.Close(); <-cpLogs.done; cpLogs.requireNoRepeatedKeys(t) }()
	cpAdmin := cpLogs.wait(t, "control plane serving", nil)["admin_address"].(string)

	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := get("/readyz")
		if code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz never turned ready: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, body := get("/status")
	var st struct {
		Policy struct {
			Version string `json:"version"`
			Source  string `json:"source"`
		} `json:"policy"`
		ControlPlane struct {
			Connected      bool   `json:"connected"`
			AppliedVersion string `json:"applied_version"`
		} `json:"control_plane"`
		Listeners []struct {
			Name string `json:"name"`
			Addr string `json:"addr"`
		} `json:"listeners"`
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/status: %v: %s", err, body)
	}
	if st.Policy.Source != "xds" || st.Policy.Version == "" || !st.ControlPlane.Connected || st.ControlPlane.AppliedVersion != st.Policy.Version ||
		len(st.Listeners) != 1 || st.Listeners[0].Addr != ports[1] {
		t.Fatalf("/status = %s", body)
	}
	// One key style in every daemon's /status.
	requireSnakeCaseKeys(t, "latch proxy /status", []byte(body))
	cpStatus, err := http.Get("http://" + cpAdmin + "/status")
	if err != nil {
		t.Fatal(err)
	}
	cpBody, _ := io.ReadAll(cpStatus.Body)
	cpStatus.Body.Close()
	requireSnakeCaseKeys(t, "latch control-plane /status", cpBody)

	// Traffic through the declared listener, as a peer in the trust domain.
	feSocket, _ := ca.AddWorkload("spiffe://" + td + "/frontend")
	code := run([]string{"check", "--workload-api", feSocket, "--server-id", "spiffe://" + td + "/backend", "--json", ports[1]}, io.Discard, io.Discard)
	if code != 0 {
		t.Fatalf("latch check through the xDS-configured listener exited %d", code)
	}
	_, metrics := get("/metrics")
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(metrics))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	accepted := fams["latch_connections_accepted_total"]
	if accepted == nil || len(accepted.Metric) == 0 || accepted.Metric[0].GetCounter().GetValue() < 1 {
		t.Errorf("latch_connections_accepted_total after a connection = %v", accepted)
	}
	for _, name := range []string{"latch_build_info", "latch_svid_expiry_seconds"} {
		if fams[name] == nil {
			t.Errorf("/metrics lacks %s", name)
		}
	}

	cancel()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("latch proxy exited with %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("latch proxy did not exit")
	}
	logs.w.Close()
	<-logs.done
	logs.requireNoRepeatedKeys(t)
}
