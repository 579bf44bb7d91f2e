package main

import (
	"crypto/tls"
	"debug/elf"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
)

// TestProxyBuiltAsPIE builds latch as a position-independent executable, the
// way distributions and many packagers build Go programs, and runs `latch
// proxy` from it as a child process: it must serve a connection, stay up
// through seconds of quiet and serve another (a process that touches its
// own mappings once start-up is over can work in the default build and
// crash in this one), then exit 0 on SIGTERM.
// The rest of the suite runs the sidecar in-process, in the default build.
func TestProxyBuiltAsPIE(t *testing.T) {
	if testing.Short() {
		t.Skip("builds latch")
	}
	if runtime.GOOS != "linux" {
		t.Skip("the build mode distributions use on Linux")
	}
	const (
		frontend = "spiffe://mesh.test/ns/default/sa/frontend"
		backend  = "spiffe://mesh.test/ns/default/sa/backend"
		// quiet spans the memory releaser's first two ticks (one a
		// second): the first quiet one ends start-up.
		quiet = 2500 * time.Millisecond
	)
	dir := t.TempDir()
	bin := filepath.Join(dir, "latch")
	build := exec.Command("go", "build", "-buildmode=pie", "-trimpath", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build -buildmode=pie: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	if f.Close(); f.Type != elf.ET_DYN {
		t.Fatalf("%s is not position-independent: ELF type %v", bin, f.Type)
	}

	ca, err := devca.New("mesh.test", devca.Options{SocketDir: filepath.Join(dir, "wl"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	beSocket, err := ca.AddWorkload(backend)
	if err != nil {
		t.Fatal(err)
	}
	feSocket, err := ca.AddWorkload(frontend)
	if err != nil {
		t.Fatal(err)
	}
	feSrc := workloadSource(t, feSocket)
	app := echoApp(t)

	cfg := filepath.Join(dir, "latch.yaml")
	body := "inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: " + app + "\n    allow:\n      - id: " + frontend + "\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	logs := newJSONLines()
	proxy := exec.Command(bin, "proxy", "--config", cfg, "--workload-api", beSocket, "--admin-address", "off", "--drain-timeout", "2s")
	proxy.Stderr = logs.w
	started := time.Now()
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- proxy.Wait(); logs.w.Close() }()
	t.Cleanup(func() {
		proxy.Process.Kill()
		<-logs.done
	})
	addr := logs.wait(t, "listening", nil)["addr"].(string)

	clientTLS := identity.NewTLS(feSrc).ClientConfig(identity.Modern(), spiffeid.RequireFromString(backend))
	echo := func() error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientTLS)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "hello"); err != nil {
			return err
		}
		_, err = io.ReadFull(c, make([]byte, 5))
		return err
	}
	if err := echo(); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	// Then nothing, as for most of a sidecar's life: this quiet is when
	// the sidecar releases memory, and once did more.
	select {
	case err := <-exited:
		t.Fatalf("the PIE latch proxy exited %v after start: %v", time.Since(started).Round(time.Millisecond), err)
	case <-time.After(quiet):
	}
	if err := echo(); err != nil {
		t.Fatalf("connection after %v of quiet: %v", quiet, err)
	}

	proxy.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("the PIE latch proxy exited with %v on SIGTERM", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the PIE latch proxy did not exit on SIGTERM")
	}
}
