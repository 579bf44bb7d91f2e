package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/inject"
)

// requireIPv6Loopback skips a test on a machine without ::1 (an IPv6-less
// container, ipv6.disable=1), saying so.
func requireIPv6Loopback(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here (%v): the IPv6 half of this test needs ::1 on lo (`ip -6 addr show lo`)", err)
	}
	ln.Close()
}

// dualStackWorld is a devca trust domain with an echo app on IPv4 loopback.
type dualStackWorld struct {
	ca      *devca.CA
	app     string            // host:port of the echo app
	sockets map[string]string // SPIFFE ID → its Workload API socket
}

func newDualStackWorld(t *testing.T) *dualStackWorld {
	t.Helper()
	ca := newDevCA(t, "mesh.test")
	app := echoApp(t)
	return &dualStackWorld{ca: ca, app: app, sockets: map[string]string{}}
}

func (w *dualStackWorld) socket(t *testing.T, id string) string {
	t.Helper()
	if s, ok := w.sockets[id]; ok {
		return s
	}
	s, err := w.ca.AddWorkload(id)
	if err != nil {
		t.Fatal(err)
	}
	w.sockets[id] = s
	return s
}

// startCommand runs a latch subcommand until the test ends, and returns its
// log lines.
func startCommand(t *testing.T, run func(context.Context, []string, io.Writer, io.Writer) error, args []string) *jsonLines {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logs := newJSONLines()
	exited := make(chan error, 1)
	go func() { exited <- run(ctx, args, io.Discard, logs.w) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("latch %s exited with %v", args[0], err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("latch %s did not exit", args[0])
		}
		logs.w.Close()
		<-logs.done
	})
	return logs
}

// injectedSidecar runs `latch proxy` exactly as the injector sets it up for
// annotations ann: its rendered config file and its arguments, with the
// Workload API socket of id.
func injectedSidecar(t *testing.T, w *dualStackWorld, id string, ann map[string]string, adminPort int) *jsonLines {
	t.Helper()
	spec, err := inject.ParseSpec(ann, false, adminPort)
	if err != nil {
		t.Fatal(err)
	}
	file, err := inject.StaticConfig(spec)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "latch.yaml")
	if err := os.WriteFile(path, file, 0o600); err != nil {
		t.Fatal(err)
	}
	c := inject.Config{Image: "latch", AdminPort: adminPort}.Container(spec)
	args := []string{"--workload-api", w.socket(t, id)}
	for _, a := range c.Args[1:] { // after "proxy"
		if strings.HasPrefix(a, "--config=") {
			a = "--config=" + path
		}
		args = append(args, a)
	}
	return startCommand(t, runProxy, args)
}

// waitListening waits for the log line of the listener on port.
func waitListening(t *testing.T, logs *jsonLines, port int) {
	t.Helper()
	logs.wait(t, "listening", func(l map[string]any) bool {
		a, _ := l["addr"].(string)
		return strings.HasSuffix(a, ":"+strconv.Itoa(port))
	})
}

// echoOver sends a line through c and reads it back.
func echoOver(c net.Conn, msg string) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echoed %q, want %q", buf, msg)
	}
	return nil
}

var loopbacks = []string{"127.0.0.1", "::1"}

// TestInjectedSidecarServesIPv4AndIPv6: the inbound listener and the admin
// endpoint the injector renders are reached over IPv4 and IPv6 loopback alike,
// and an outbound listener reaches upstreams given by an IPv6 or an IPv4
// address, all with real sockets and real mTLS.
func TestInjectedSidecarServesIPv4AndIPv6(t *testing.T) {
	requireIPv6Loopback(t)
	const (
		backend  = "spiffe://mesh.test/ns/shop/sa/backend"
		frontend = "spiffe://mesh.test/ns/shop/sa/frontend"
	)
	w := newDualStackWorld(t)
	_, appPort, _ := net.SplitHostPort(w.app)
	inPort, beAdmin := mustPort(t), mustPort(t)
	beLogs := injectedSidecar(t, w, backend, map[string]string{
		inject.AnnotationInbound: fmt.Sprintf("%d:%s", inPort, appPort),
		inject.AnnotationAllow:   frontend,
	}, beAdmin)
	waitListening(t, beLogs, inPort)
	beLogs.wait(t, "admin endpoint listening", nil)

	feSrc := workloadSource(t, w.socket(t, frontend))
	clientTLS := identity.NewTLS(feSrc).ClientConfig(identity.Modern(), spiffeid.RequireFromString(backend))
	for _, host := range loopbacks {
		addr := net.JoinHostPort(host, strconv.Itoa(inPort))
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientTLS)
		if err != nil {
			t.Errorf("inbound listener over %s: %v", addr, err)
		} else if err := echoOver(c, "hello over "+host); err != nil {
			t.Errorf("inbound listener over %s: %v", addr, err)
		}

		url := "http://" + net.JoinHostPort(host, strconv.Itoa(beAdmin)) + "/healthz"
		resp, err := http.Get(url)
		if err != nil {
			t.Errorf("admin endpoint: %v", err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s = %s", url, resp.Status)
		}
	}

	// The frontend's sidecar, with one outbound listener per upstream family.
	out6, out4 := mustPort(t), mustPort(t)
	feLogs := injectedSidecar(t, w, frontend, map[string]string{
		inject.AnnotationOutbound: fmt.Sprintf("%d=[::1]:%d@%s,%d=127.0.0.1:%d@%s", out6, inPort, backend, out4, inPort, backend),
	}, mustPort(t))
	for upstream, port := range map[string]int{"::1": out6, "127.0.0.1": out4} {
		waitListening(t, feLogs, port)
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 5*time.Second)
		if err != nil {
			t.Fatalf("outbound listener %d: %v", port, err)
		}
		if err := echoOver(c, "hello to "+upstream); err != nil {
			t.Errorf("outbound listener with upstream [%s]:%d: %v", upstream, inPort, err)
		}
	}
	// The backend saw the frontend over both families.
	for _, host := range []string{"127.0.0.1", "::1"} {
		beLogs.wait(t, "connection closed", func(l map[string]any) bool {
			ra, _ := l["remote_addr"].(string)
			h, _, _ := net.SplitHostPort(ra)
			return l["peer_id"] == frontend && h == host
		})
	}
}

// TestControlPlaneDefaultInboundServesIPv4AndIPv6: with `latch control-plane`'s
// default --inbound-host, a sidecar's inbound listener is reached over IPv4
// and IPv6 loopback.
func TestControlPlaneDefaultInboundServesIPv4AndIPv6(t *testing.T) {
	requireIPv6Loopback(t)
	const (
		backend  = "spiffe://mesh.test/ns/shop/sa/backend"
		frontend = "spiffe://mesh.test/ns/shop/sa/frontend"
		cpID     = "spiffe://mesh.test/ns/latch/sa/control-plane"
	)
	w := newDualStackWorld(t)
	inPort, xdsPort := mustPort(t), mustPort(t)
	dir := t.TempDir()
	decl := fmt.Sprintf(`apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: backend}
spec:
  spiffeID: %s
  inbound:
    - port: %d
      appAddress: %s
      allow: [{id: %s}]
`, backend, inPort, w.app, frontend)
	if err := os.WriteFile(filepath.Join(dir, "backend.yaml"), []byte(decl), 0o600); err != nil {
		t.Fatal(err)
	}
	xdsAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(xdsPort))
	cpLogs := startCommand(t, runControlPlane, []string{
		"--declarations", dir, "--listen", xdsAddr, "--admin-address", "127.0.0.1:0", "--workload-api", w.socket(t, cpID),
	})
	cpLogs.wait(t, "control plane serving", nil)
	beLogs := startCommand(t, runProxy, []string{
		"--xds-address", xdsAddr, "--xds-server-id", cpID, "--workload-api", w.socket(t, backend),
		"--admin-address", "127.0.0.1:0", "--state-dir", t.TempDir(),
	})
	waitListening(t, beLogs, inPort)

	feSrc := workloadSource(t, w.socket(t, frontend))
	clientTLS := identity.NewTLS(feSrc).ClientConfig(identity.Modern(), spiffeid.RequireFromString(backend))
	for _, host := range loopbacks {
		addr := net.JoinHostPort(host, strconv.Itoa(inPort))
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, clientTLS)
		if err != nil {
			t.Errorf("inbound listener over %s: %v", addr, err)
			continue
		}
		if err := echoOver(c, "hello over "+host); err != nil {
			t.Errorf("inbound listener over %s: %v", addr, err)
		}
	}
}
