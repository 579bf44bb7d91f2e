package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"latch.dev/latch/identity/devca"
)

// TestProbesBeforeTheFirstSVID starts each daemon against a Workload API
// socket that does not exist yet: /healthz answers 200 at once, /readyz 503
// saying what it waits for and what it found, /status names the problem, and
// the log says what to check. Then a Workload API appears at that path (a
// devca server, linked there) and the daemon becomes ready by itself.
func TestProbesBeforeTheFirstSVID(t *testing.T) {
	for _, daemon := range []string{"proxy", "control-plane"} {
		t.Run(daemon, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "agent.sock")
			addr := "unix://" + sock
			var args []string
			switch daemon {
			case "proxy":
				cfg := filepath.Join(dir, "latch.yaml")
				body := "inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: 127.0.0.1:9\n    allow:\n      - trustDomain: mesh.test\n"
				if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
					t.Fatal(err)
				}
				args = []string{"proxy", "--config", cfg}
			case "control-plane":
				decls := filepath.Join(dir, "declarations")
				if err := os.Mkdir(decls, 0o700); err != nil {
					t.Fatal(err)
				}
				args = []string{"control-plane", "--declarations", decls, "--listen", "127.0.0.1:0"}
			}
			args = append(args, "--workload-api", addr, "--admin-address", "127.0.0.1:0")

			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			logs := newJSONLines()
			exited := make(chan error, 1)
			go func() {
				run := map[string]func(context.Context, []string, io.Writer, io.Writer) error{"proxy": runProxy, "control-plane": runControlPlane}[daemon]
				exited <- run(ctx, args[1:], io.Discard, logs.w)
			}()
			admin := logs.wait(t, "admin server listening", nil)["addr"].(string)
			get := func(path string) (int, string) {
				t.Helper()
				resp, err := http.Get("http://" + admin + path)
				if err != nil {
					t.Fatalf("GET %s: %v", path, err)
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(b)
			}

			if code, body := get("/healthz"); code != http.StatusOK {
				t.Errorf("/healthz while waiting for the Workload API = %d %q, want 200", code, body)
			}
			code, body := get("/readyz")
			if code != http.StatusServiceUnavailable || !strings.Contains(body, "svid: waiting for the Workload API at "+addr) {
				t.Errorf("/readyz while waiting = %d %q, want 503 naming the Workload API", code, body)
			}
			warn := logs.wait(t, "waiting for the Workload API at "+addr, func(l map[string]any) bool { return l["level"] == "WARN" })
			if found, _ := warn["found"].(string); !strings.Contains(found, "no socket at "+sock) {
				t.Errorf("the warning does not say the socket is missing: %v", warn)
			}
			if check, _ := warn["check"].(string); !strings.Contains(check, "registration entry") {
				t.Errorf("the warning does not say what to check: %v", warn)
			}
			if _, body := get("/readyz"); !strings.Contains(body, "no socket at "+sock) {
				t.Errorf("/readyz does not say what it found: %q", body)
			}
			code, body = get("/status")
			var st struct {
				Identity struct {
					SVIDError string `json:"svid_error"`
				} `json:"identity"`
			}
			if err := json.Unmarshal([]byte(body), &st); code != http.StatusOK || err != nil || !strings.Contains(st.Identity.SVIDError, "waiting for the Workload API") {
				t.Errorf("/status while waiting = %d %s", code, body)
			}
			requireSnakeCaseKeys(t, "/status while waiting", []byte(body))

			// The agent comes up: its socket appears at the configured path.
			ca, err := devca.New("mesh.test", devca.Options{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer ca.Close()
			real, err := ca.AddWorkload("spiffe://mesh.test/ns/default/sa/" + daemon)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(strings.TrimPrefix(real, "unix://"), sock); err != nil {
				t.Fatal(err)
			}
			logs.wait(t, "got the first X.509-SVID from the Workload API", nil)
			deadline := time.Now().Add(15 * time.Second)
			for {
				code, body := get("/readyz")
				if code == http.StatusOK {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("/readyz never turned ready once the Workload API answered: %d %q", code, body)
				}
				time.Sleep(20 * time.Millisecond)
			}
			if _, body := get("/status"); !strings.Contains(body, `"spiffe_id": "spiffe://mesh.test/ns/default/sa/`+daemon+`"`) {
				t.Errorf("/status after the SVID: %s", body)
			}

			cancel()
			select {
			case err := <-exited:
				if err != nil {
					t.Errorf("latch %s exited with %v", daemon, err)
				}
			case <-time.After(15 * time.Second):
				t.Fatalf("latch %s did not exit", daemon)
			}
			logs.w.Close()
			<-logs.done
			logs.requireNoRepeatedKeys(t)
		})
	}
}

// TestDiagnoseWorkloadAPI: what the wait reports for each state of the
// socket path it can tell apart without the agent's help.
func TestDiagnoseWorkloadAPI(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	live := filepath.Join(dir, "live.sock")
	ll, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()

	for _, tc := range []struct{ addr, want string }{
		{"tcp://127.0.0.1:8081", "not a unix socket address"},
		{"unix://" + filepath.Join(dir, "missing.sock"), "no socket at "},
		{"unix:" + filepath.Join(dir, "missing.sock"), "no socket at "},
		{"unix://" + file, "exists but is not a socket"},
		{"unix://" + stale, "nothing listens on"},
		{"unix://" + live, "has issued no SVID to this workload"},
	} {
		if got := diagnoseWorkloadAPI(tc.addr); !strings.Contains(got, tc.want) {
			t.Errorf("diagnose(%s) = %q, want %q", tc.addr, got, tc.want)
		}
	}
}
