package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
	xdsclient "latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
)

// TestControlPlaneCommand runs `latch control-plane` against the development
// CA's Workload API and the example declarations, and a sidecar's ADS client
// against it: the frontend gets its outbound listener, and the admin server
// reports it.
func TestControlPlaneCommand(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	ca, err := devca.New("demo.latch.test", devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cpSocket, err := ca.AddWorkload("spiffe://demo.latch.test/latch/control-plane")
	if err != nil {
		t.Fatal(err)
	}
	feSocket, err := ca.AddWorkload("spiffe://demo.latch.test/ns/demo/sa/frontend")
	if err != nil {
		t.Fatal(err)
	}

	// A copy of the examples, so the test can edit it.
	dir := t.TempDir()
	for _, name := range []string{"backend.yaml", "frontend.yaml", "intruder.yaml"} {
		b, err := os.ReadFile(filepath.Join("..", "..", "examples", "declarations", name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	logR, logW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- runControlPlane(ctx, []string{
			"--declarations", dir, "--listen", "127.0.0.1:0", "--admin-address", "127.0.0.1:0",
			"--workload-api", cpSocket, // the default debounce: the propagation below is what users get
		}, io.Discard, logW)
		logW.Close()
	}()
	var (
		addrs   = make(chan [2]string, 1)
		logMu   sync.Mutex
		logText strings.Builder
		logDone = make(chan struct{})
	)
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(logR)
		for sc.Scan() {
			logMu.Lock()
			logText.WriteString(sc.Text() + "\n")
			logMu.Unlock()
			var line struct{ Msg, XDSAddress, AdminAddress string }
			var raw map[string]any
			if json.Unmarshal(sc.Bytes(), &raw) == nil && raw["msg"] == "control plane serving" {
				line.XDSAddress, _ = raw["xds_address"].(string)
				line.AdminAddress, _ = raw["admin_address"].(string)
				addrs <- [2]string{line.XDSAddress, line.AdminAddress}
			}
		}
	}()
	var xdsAddr, adminAddr string
	select {
	case a := <-addrs:
		xdsAddr, adminAddr = a[0], a[1]
	case err := <-done:
		t.Fatalf("control plane exited: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("control plane did not start")
	}

	src, err := identity.NewWorkloadSource(ctx, feSocket, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	cpID := spiffeid.RequireFromString("spiffe://demo.latch.test/latch/control-plane")
	applied := make(chan *proxy.Config, 8)
	cctx, ccancel := context.WithCancel(ctx)
	cdone := make(chan error, 1)
	go func() {
		cdone <- xdsclient.Run(cctx, xdsclient.Options{
			Address:        xdsAddr,
			ControlPlaneID: cpID,
			NodeID:         spiffeid.RequireFromString("spiffe://demo.latch.test/ns/demo/sa/frontend"),
			TLS:            identity.NewTLS(src).ClientConfig(identity.Modern(), cpID),
		}, func(c *proxy.Config) error { applied <- c; return nil })
	}()
	var cfg *proxy.Config
	select {
	case cfg = <-applied:
	case <-time.After(20 * time.Second):
		t.Fatal("sidecar got no config")
	}
	if len(cfg.Outbound) != 1 || cfg.Outbound[0].Listen != "127.0.0.1:15101" || cfg.Outbound[0].ServerID.String() != "spiffe://demo.latch.test/ns/demo/sa/backend" {
		t.Fatalf("frontend config: %+v", cfg)
	}

	get := func(path string) string {
		resp, err := http.Get("http://" + adminAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s: %s", path, resp.Status, b)
		}
		return string(b)
	}
	get("/healthz")
	get("/readyz")
	if m := get("/metrics"); !strings.Contains(m, "latch_xds_connected_streams 1") || !strings.Contains(m, "latch_xds_declared_nodes 3") {
		t.Errorf("metrics lack the stream or the declarations:\n%s", m)
	}
	if s := get("/status"); !strings.Contains(s, `"spiffe_id": "spiffe://demo.latch.test/ns/demo/sa/frontend"`) {
		t.Errorf("status: %s", s)
	}

	// The control plane watches its own identity like a sidecar does:
	// expiry and bundle metrics, the SVID and bundle in /status, rotations
	// logged and counted.
	var st struct {
		Identity struct {
			SPIFFEID string `json:"spiffe_id"`
			SVID     *struct {
				NotAfter time.Time `json:"not_after"`
			} `json:"svid"`
			Bundles []struct {
				TrustDomain string     `json:"trust_domain"`
				CAs         []struct{} `json:"cas"`
			} `json:"bundles"`
		} `json:"identity"`
	}
	if err := json.Unmarshal([]byte(get("/status")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Identity.SPIFFEID != "spiffe://demo.latch.test/latch/control-plane" || st.Identity.SVID == nil || st.Identity.SVID.NotAfter.Before(time.Now()) ||
		len(st.Identity.Bundles) != 1 || st.Identity.Bundles[0].TrustDomain != "demo.latch.test" || len(st.Identity.Bundles[0].CAs) == 0 {
		t.Errorf("/status identity = %+v", st.Identity)
	}
	if m := get("/metrics"); !strings.Contains(m, "latch_svid_expiry_seconds ") || !strings.Contains(m, `latch_bundle_cas{trust_domain="demo.latch.test"} 1`) {
		t.Errorf("metrics lack the control plane's SVID and bundle:\n%s", m)
	}
	if err := ca.RotateNow(); err != nil {
		t.Fatal(err)
	}
	rotated := time.Now().Add(10 * time.Second)
	for !strings.Contains(get("/metrics"), "latch_svid_rotations_total 1") {
		if time.Now().After(rotated) {
			t.Fatal("the control plane's SVID rotation was not counted")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Edit → applied in the sidecar, with the default debounce. The figure
	// xds/README.md quotes comes from here (go test -v).
	frontendDecl, err := os.ReadFile(filepath.Join(dir, "frontend.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var took []time.Duration
	for i, port := range []string{"15102", "15103", "15104", "15101"} {
		edited := strings.Replace(string(frontendDecl), "port: 15101", "port: "+port, 1)
		start := time.Now()
		if err := os.WriteFile(filepath.Join(dir, "frontend.yaml"), []byte(edited), 0o644); err != nil {
			t.Fatal(err)
		}
		select {
		case cfg = <-applied:
		case <-time.After(20 * time.Second):
			t.Fatalf("edit %d not applied", i)
		}
		took = append(took, time.Since(start).Round(time.Millisecond))
		if got := cfg.Outbound[0].Listen; got != "127.0.0.1:"+port {
			t.Fatalf("edit %d: outbound listens on %s, want port %s", i, got, port)
		}
	}
	t.Logf("declaration edit → config applied in a sidecar (debounce %s): %v", policy.DefaultDebounce, took)

	// A broken edit is reported in the metrics, and the policy stays.
	if err := os.WriteFile(filepath.Join(dir, "backend.yaml"), []byte("kind: ["), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(get("/metrics"), "latch_declaration_errors 2") {
		if time.Now().After(deadline) {
			t.Fatal("declaration error not counted")
		}
		time.Sleep(10 * time.Millisecond)
	}

	ccancel()
	<-cdone
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("control plane: %v", err)
	}
	<-logDone
	logMu.Lock()
	defer logMu.Unlock()
	if !strings.Contains(logText.String(), `"msg":"declaration refused"`) || !strings.Contains(logText.String(), "backend.yaml") {
		t.Errorf("refusal not logged:\n%s", logText.String())
	}
	if !strings.Contains(logText.String(), `"msg":"X.509-SVID rotated","spiffe_id":"spiffe://demo.latch.test/latch/control-plane"`) {
		t.Errorf("rotation not logged:\n%s", logText.String())
	}
}

// TestControlPlaneDeprecatedSocketFlag: the Workload API flag's former name
// still works, and says it is deprecated.
func TestControlPlaneDeprecatedSocketFlag(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newJSONLines()
	done := make(chan error, 1)
	go func() {
		done <- runControlPlane(ctx, []string{"--declarations", t.TempDir(), "--workload-api-socket", "unix:///nonexistent/latch-test.sock",
			"--listen", "127.0.0.1:0", "--admin-address", "127.0.0.1:0"}, io.Discard, logs.w)
	}()
	logs.wait(t, "--workload-api-socket is deprecated and will be removed: use --workload-api, as every latch command does",
		func(l map[string]any) bool { return l["level"] == "WARN" })
	logs.wait(t, "waiting for the Workload API at unix:///nonexistent/latch-test.sock", nil)
	cancel()
	if err := <-done; err != nil {
		t.Errorf("control plane stopped while waiting: %v", err)
	}
	logs.w.Close()
	<-logs.done
}

// TestControlPlaneStreamLimitFlag: --max-streams-per-peer defaults to the
// server's default and refuses a limit that would admit no sidecar.
func TestControlPlaneStreamLimitFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int // 0: a usage error
	}{
		{nil, server.DefaultStreamsPerPeer},
		{[]string{"--max-streams-per-peer", "8"}, 8},
		{[]string{"--max-streams-per-peer", "0"}, 0},
		{[]string{"--max-streams-per-peer", "-1"}, 0},
	} {
		f, err := parseControlPlaneFlags(append([]string{"--declarations", "d"}, tc.args...), io.Discard)
		var usage usageError
		switch {
		case tc.want == 0 && !errors.As(err, &usage):
			t.Errorf("%v: got %v, want a usage error", tc.args, err)
		case tc.want != 0 && (err != nil || f.peerStreams != tc.want):
			t.Errorf("%v: got %d, %v; want %d", tc.args, f.peerStreams, err, tc.want)
		}
	}
}
