package client_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/client"
)

// echoServer is the backend application: it echoes every connection.
func echoServer(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { lis.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return lis.Addr().String()
}

func freePort(t *testing.T) int {
	t.Helper()
	port, err := freeport.Port()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// peer is a workload calling the backend's sidecar directly with its SVID.
type peer struct {
	tls *tls.Config
}

func newPeer(t *testing.T, ca *identitytest.CA, id spiffeid.ID) peer {
	return peer{tls: identity.NewTLS(ca.Source(t, id.String())).ClientConfig(identity.Modern(), backend)}
}

// call opens a connection and does one echo round trip; the connection is
// returned open on success.
func (p peer) call(addr string) (net.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, p.tls)
	if err != nil {
		return nil, err
	}
	if err := roundTrip(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func roundTrip(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != "ping" {
		return errors.New("echo mismatch")
	}
	return nil
}

// TestPolicyChangeThroughTheDataPlane: the whole path — declaration file,
// control plane, ADS, validation, proxy — with real connections. Editing the
// declaration refuses a previously allowed peer (closing its live
// connection) and lets a newly allowed one through; killing the control
// plane during traffic fails no allowed connection.
func TestPolicyChangeThroughTheDataPlane(t *testing.T) {
	ca := identitytest.NewCA(t, "mesh.test")
	app := echoServer(t)
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	decl := func(allow ...string) string {
		return strings.Replace(declaration(backend, port, allow...), "127.0.0.1:7001", app, 1)
	}
	dir := t.TempDir()
	writeFile(t, dir, "backend.yaml", decl(frontend.String()))
	cp := startControlPlane(t, ca, dir, "127.0.0.1:0")

	dp := proxy.NewServer(identity.NewTLS(ca.Source(t, backend.String())), proxy.Options{Logger: logger(t), DrainTimeout: time.Second})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = dp.Shutdown(ctx)
	})
	applied := make(chan string, 16)
	opts := sidecarOpts(t, ca, cp.addr, backend)
	opts.Logger = logger(t)
	opts.MinBackoff, opts.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
	c, err := client.New(opts, func(cfg *proxy.Config) error {
		if err := dp.Apply(cfg); err != nil {
			return err
		}
		applied <- cfg.Version
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-applied:
	case <-time.After(10 * time.Second):
		t.Fatal("no policy applied")
	}

	fe := newPeer(t, ca, frontend)
	intruder := spiffeid.RequireFromString("spiffe://mesh.test/intruder")
	in := newPeer(t, ca, intruder)
	live, err := fe.call(addr)
	if err != nil {
		t.Fatalf("allowed frontend refused: %v", err)
	}
	defer live.Close()
	if c, err := in.call(addr); err == nil {
		c.Close()
		t.Fatal("intruder got through before being allowed")
	}

	// Swap: the intruder is allowed, the frontend no longer.
	start := time.Now()
	writeFile(t, dir, "backend.yaml", decl(intruder.String()))
	var ic net.Conn
	waitFor(t, "the intruder to be let in", func() bool {
		ic, err = in.call(addr)
		return err == nil
	})
	ic.Close()
	propagation := time.Since(start)
	// The frontend's live connection is closed, not left open.
	_ = live.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ne net.Error
	if _, err := live.Read(make([]byte, 1)); err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("frontend's live connection not closed after revocation: %v", err)
	}
	closed := time.Since(start)
	if c, err := fe.call(addr); err == nil {
		c.Close()
		t.Fatal("revoked frontend still gets through")
	}
	t.Logf("declaration edit → new peer allowed after %v, revoked peer's live connection closed after %v", propagation.Round(time.Millisecond), closed.Round(time.Millisecond))

	// Control plane down during traffic: every allowed connection succeeds.
	stopCP := make(chan struct{})
	var wg sync.WaitGroup
	var attempts, failures int
	var mu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stopCP:
				return
			default:
			}
			c, err := in.call(addr)
			mu.Lock()
			attempts++
			if err != nil {
				failures++
				t.Errorf("allowed connection failed while the control plane restarted: %v", err)
			} else {
				c.Close()
			}
			mu.Unlock()
		}
	}()
	count := func() int { mu.Lock(); defer mu.Unlock(); return attempts }
	waitFor(t, "traffic before the kill", func() bool { return count() >= 5 })
	cp.stop()
	waitFor(t, "the client to notice", func() bool { return !c.Status().Connected })
	cp2 := startControlPlane(t, ca, dir, cp.addr)
	waitFor(t, "the reconnect", func() bool { return c.Status().Connected })
	after := count()
	waitFor(t, "traffic after the reconnect", func() bool { return count() >= after+5 })
	close(stopCP)
	wg.Wait()
	t.Logf("control plane killed and restarted under traffic: %d allowed connections, %d failed", attempts, failures)
	if v := cp2.srv.Version(backend.String()); v != c.Status().AppliedVersion {
		t.Errorf("after the restart the sidecar runs %s, the control plane serves %s", c.Status().AppliedVersion, v)
	}
}

// TestStateDirServesThroughTheDataPlane: a sidecar restarted while the
// control plane is down serves its last good policy from the state
// directory — real listeners, real peers.
func TestStateDirServesThroughTheDataPlane(t *testing.T) {
	ca := identitytest.NewCA(t, "mesh.test")
	app := echoServer(t)
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	dir, state := t.TempDir(), t.TempDir()
	writeFile(t, dir, "backend.yaml", strings.Replace(declaration(backend, port, frontend.String()), "127.0.0.1:7001", app, 1))
	cp := startControlPlane(t, ca, dir, "127.0.0.1:0")

	// run starts a data plane and its ADS client; stop ends both.
	run := func() (applied chan *proxy.Config, stop func()) {
		dp := proxy.NewServer(identity.NewTLS(ca.Source(t, backend.String())), proxy.Options{Logger: logger(t), DrainTimeout: time.Second})
		applied = make(chan *proxy.Config, 4)
		opts := sidecarOpts(t, ca, cp.addr, backend)
		opts.StateDir = state
		opts.Logger = logger(t)
		opts.MinBackoff, opts.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
		c, err := client.New(opts, func(cfg *proxy.Config) error {
			if err := dp.Apply(cfg); err != nil {
				return err
			}
			applied <- cfg
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = c.Run(ctx) }()
		var once sync.Once
		stop = func() {
			once.Do(func() {
				cancel()
				<-done
				sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer scancel()
				_ = dp.Shutdown(sctx)
			})
		}
		t.Cleanup(stop)
		return applied, stop
	}
	wait := func(ch chan *proxy.Config) *proxy.Config {
		select {
		case cfg := <-ch:
			return cfg
		case <-time.After(10 * time.Second):
			t.Fatal("no policy applied")
		}
		return nil
	}

	applied, stop := run()
	wait(applied)
	fe := newPeer(t, ca, frontend)
	if c, err := fe.call(addr); err != nil {
		t.Fatalf("frontend refused: %v", err)
	} else {
		c.Close()
	}
	stop()
	cp.stop()
	if c, err := fe.call(addr); err == nil {
		c.Close()
		t.Fatal("still served after the sidecar stopped")
	}

	start := time.Now()
	applied, _ = run()
	if cfg := wait(applied); cfg.Source != "xds-state" {
		t.Fatalf("restored config source %q", cfg.Source)
	}
	c, err := fe.call(addr)
	if err != nil {
		t.Fatalf("restarted sidecar with the control plane down refused the allowed peer: %v", err)
	}
	c.Close()
	t.Logf("sidecar restart with the control plane down → serving the saved policy in %v", time.Since(start).Round(time.Millisecond))
	intruder := newPeer(t, ca, spiffeid.RequireFromString("spiffe://mesh.test/intruder"))
	if c, err := intruder.call(addr); err == nil {
		c.Close()
		t.Fatal("saved policy let the intruder in")
	}
}

// TestRemovalThroughTheDataPlane: resources removed by the control plane —
// over delta xDS, removed_resources — take effect in the data plane: a
// removed listener stops accepting and its live connections drain (they
// keep working, then are closed at the drain timeout) while the other
// listener is untouched; a removed declaration removes everything, so the
// sidecar fails closed.
func TestRemovalThroughTheDataPlane(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		app := echoServer(t)
		p1, p2 := freePort(t), freePort(t)
		a1, a2 := "127.0.0.1:"+strconv.Itoa(p1), "127.0.0.1:"+strconv.Itoa(p2)
		decl := func(ports ...int) string {
			s := fmt.Sprintf("apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: backend}\nspec:\n  spiffeID: %s\n  inbound:\n", backend)
			for _, port := range ports {
				s += fmt.Sprintf("    - {port: %d, appAddress: %q, allow: [{id: %s}]}\n", port, app, frontend)
			}
			return s
		}
		dir := t.TempDir()
		writeFile(t, dir, "backend.yaml", decl(p1, p2))
		cp := startControlPlane(t, ca, dir, "127.0.0.1:0")

		const drain = 1500 * time.Millisecond
		dp := proxy.NewServer(identity.NewTLS(ca.Source(t, backend.String())), proxy.Options{Logger: logger(t), DrainTimeout: drain})
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = dp.Shutdown(ctx)
		})
		applied := make(chan *proxy.Config, 16)
		opts := sidecarOptsFor(t, p, ca, cp.addr, backend)
		opts.MinBackoff, opts.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
		c, err := client.New(opts, func(cfg *proxy.Config) error {
			if err := dp.Apply(cfg); err != nil {
				return err
			}
			applied <- cfg
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = c.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		next := func() *proxy.Config {
			t.Helper()
			select {
			case cfg := <-applied:
				return cfg
			case <-time.After(10 * time.Second):
				t.Fatal("no policy applied")
			}
			return nil
		}
		if cfg := next(); len(cfg.Inbound) != 2 {
			t.Fatalf("first config: %+v", cfg.Inbound)
		}
		if st := c.Status(); st.Protocol != p.String() {
			t.Fatalf("protocol %q, want %q", st.Protocol, p)
		}
		fe := newPeer(t, ca, frontend)
		live1, err := fe.call(a1)
		if err != nil {
			t.Fatal(err)
		}
		defer live1.Close()
		live2, err := fe.call(a2)
		if err != nil {
			t.Fatal(err)
		}
		defer live2.Close()

		// The second port goes: its listener drains, the first is untouched.
		writeFile(t, dir, "backend.yaml", decl(p1))
		if cfg := next(); len(cfg.Inbound) != 1 || cfg.Inbound[0].Listen != a1 {
			t.Fatalf("after removing a port: %+v", cfg.Inbound)
		}
		removed := time.Now()
		if err := roundTrip(live2); err != nil {
			t.Errorf("live connection of the removed listener cut before the drain timeout: %v", err)
		}
		if c, err := fe.call(a2); err == nil {
			c.Close()
			t.Error("the removed listener still accepts")
		}
		if err := roundTrip(live1); err != nil {
			t.Errorf("the other listener's connection was disturbed: %v", err)
		}
		closedWithin(t, live2, removed, drain)

		// The declaration goes: nothing is served, the sidecar fails closed.
		if err := os.Remove(filepath.Join(dir, "backend.yaml")); err != nil {
			t.Fatal(err)
		}
		if cfg := next(); len(cfg.Inbound)+len(cfg.Outbound) != 0 {
			t.Fatalf("after removing the declaration: %+v", cfg)
		}
		removed = time.Now()
		if c, err := fe.call(a1); err == nil {
			c.Close()
			t.Error("a sidecar whose declaration was removed still accepts")
		}
		closedWithin(t, live1, removed, drain)
	})
}

// closedWithin checks that c is closed by the peer about drain after since.
func closedWithin(t *testing.T, c net.Conn, since time.Time, drain time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(since.Add(drain + 5*time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("a draining connection was not closed after the drain timeout: %v", err)
	}
	if d := time.Since(since); d < drain/2 {
		t.Errorf("a draining connection was closed after %v, before the drain timeout (%v)", d, drain)
	}
}
