package reliability

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
)

// TestAppDown: with nothing listening at the app address, every connection
// through the pair is closed promptly (not left hanging), each failed dial is
// counted, and once the app is back connections succeed again.
func TestAppDown(t *testing.T) {
	verdict(t, "faults")
	const tries = 20
	appAddr := freeAddr(t)
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{appAddr: appAddr})

	var slowest time.Duration
	for range tries {
		begin := time.Now()
		got, err := roundTrip(p.entry, []byte("hello"), waitFor)
		d := time.Since(begin)
		slowest = max(slowest, d)
		if len(got) != 0 {
			t.Fatalf("got %q from an app that is down", got)
		}
		if err != nil && !isReset(err) {
			t.Fatalf("connection not closed cleanly or reset: %v (after %v)", err, d)
		}
	}
	failures := p.in.waitMetric("latch_upstream_connect_failures_total", map[string]string{"direction": "inbound"}, tries)
	// The close is counted when the connection's goroutine finishes, which
	// may be after the client has seen the close: wait for it too.
	closed := p.in.waitMetric("latch_connections_closed_total", map[string]string{"reason": "upstream_unreachable"}, tries)

	// The app comes back on the same address.
	ln, err := net.Listen("tcp", appAddr)
	if err != nil {
		t.Skipf("app address %s taken meanwhile: %v", appAddr, err)
	}
	back := &app{t: t, ln: ln, handle: echo, conns: map[net.Conn]struct{}{}}
	back.wg.Add(1)
	go back.serve()
	t.Cleanup(back.close)
	if err := echoOK(p.entry, 4096, waitFor); err != nil {
		t.Fatalf("after the app came back: %v", err)
	}
	t.Logf("%d connections to a down app: slowest closed after %v; connect failures counted %v, closed upstream_unreachable %v", tries, slowest, failures, closed)
	figuref("faults", "app down: connections closed promptly / slowest", "%d / %d, slowest %v", tries, tries, slowest.Round(time.Millisecond))
	figuref("faults", "app down: dial failures counted (latch_upstream_connect_failures_total)", "%v of %d", failures, tries)
	figure("faults", "app restarted: traffic resumes", "yes")
	if failures != tries || closed != tries {
		t.Errorf("counted %v connect failures and %v upstream_unreachable closes, want %d", failures, closed, tries)
	}
}

// TestUpstreamResetMidStream: the app resets its connection after reading
// part of the stream. The client must see a reset (ECONNRESET), never a
// clean EOF that would pass a truncated stream off as complete.
func TestUpstreamResetMidStream(t *testing.T) {
	verdict(t, "faults")
	const tries = 10
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{appConfig: func(a *app) {
		a.handle = func(a *app, c *net.TCPConn) {
			// Echo 64 KiB, then abort with RST.
			io.CopyN(c, countingReader{c, &a.bytes}, 64<<10)
			c.SetLinger(0)
			c.Close()
		}
	}})
	resets, truncated := 0, 0
	for range tries {
		c, err := net.DialTimeout("tcp", p.entry, waitFor)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(waitFor))
		go func() {
			c.Write(randomBytes(1 << 20)) // more than the app will read
		}()
		n, err := io.Copy(io.Discard, c)
		reset := sawReset(c, err)
		c.Close()
		switch {
		case reset:
			resets++
		case err == nil:
			truncated++
			t.Errorf("clean EOF after %d bytes: a reset upstream was passed on as a complete stream", n)
		default:
			t.Errorf("after %d bytes: %v, want ECONNRESET", n, err)
		}
	}
	figuref("faults", "upstream reset mid-stream seen by the client as ECONNRESET", "%d / %d", resets, tries)
	silentCuts.Add(int64(truncated))
	p.in.waitMetric("latch_connections_closed_total", map[string]string{"reason": "upstream_reset"}, tries)
	if resets != tries {
		reasons := func(s *sidecar) map[string]float64 {
			out := map[string]float64{}
			for _, r := range []string{"eof", "upstream_reset", "downstream_reset"} {
				out[r] = s.metric("latch_connections_closed_total", map[string]string{"reason": r})
			}
			return out
		}
		t.Logf("close reasons: inbound %v, outbound %v", reasons(p.in), reasons(p.out))
	}
}

// TestWorkloadAPIOutage: the Workload API goes away (devca closed). The
// sidecars keep serving with the SVIDs they hold until those expire; after
// that every handshake is refused (fail closed), and no byte reaches the app.
func TestWorkloadAPIOutage(t *testing.T) {
	verdict(t, "faults")
	m := newMesh(t, devca.Options{SVIDTTL: 3 * time.Second, RotateEvery: 2 * time.Second})
	front, back := m.source(t, "frontend"), m.source(t, "backend")
	p := newPair(t, m, pairOptions{frontSrc: front, backSrc: back})
	if err := echoOK(p.entry, 1024, waitFor); err != nil {
		t.Fatal(err)
	}
	m.ca.Close()
	// Both SVIDs in hand now; the earlier expiry ends the pair's service.
	var expiry time.Time
	for _, src := range []*identity.WorkloadSource{front, back} {
		svid, err := src.GetX509SVID()
		if err != nil {
			t.Fatalf("source lost its SVID when the Workload API went away: %v", err)
		}
		if na := svid.Certificates[0].NotAfter; expiry.IsZero() || na.Before(expiry) {
			expiry = na
		}
	}
	served := 0
	for time.Until(expiry) > 300*time.Millisecond {
		if err := echoOK(p.entry, 1024, waitFor); err != nil {
			t.Fatalf("with %v of SVID left, during the outage: %v", time.Until(expiry), err)
		}
		served++
		time.Sleep(50 * time.Millisecond)
	}
	// Past expiry (certificates carry whole seconds): refused.
	time.Sleep(time.Until(expiry.Add(1100 * time.Millisecond)))
	appBefore := p.app.accepted.Load()
	refused := 0
	for range 5 {
		got, err := roundTrip(p.entry, []byte("after expiry"), waitFor)
		if len(got) != 0 {
			t.Fatalf("served %q with an expired SVID", got)
		}
		_ = err
		refused++
	}
	if n := p.app.accepted.Load() - appBefore; n != 0 {
		t.Errorf("app accepted %d connections after the SVIDs expired", n)
	}
	expired := p.in.metric("latch_handshake_failures_total", map[string]string{"class": "expired"}) +
		p.out.metric("latch_handshake_failures_total", map[string]string{"class": "expired"})
	t.Logf("outage: %d connections served on held SVIDs; after expiry %d refused (expired class counted %v)", served, refused, expired)
	figuref("faults", "Workload API outage: served on held SVIDs until expiry", "%d connections, 0 failed", served)
	figuref("faults", "Workload API outage: refused after expiry (fail closed)", "%d / 5, app reached 0 times", refused)
	if expired == 0 {
		t.Errorf("no handshake failure classed expired after the SVIDs expired")
	}
}

// TestDrainUnderLoad: Shutdown (what SIGTERM does) while transfers are in
// flight. New connections are refused at once, every transfer in flight
// finishes with all its bytes, and Shutdown returns without forcing.
func TestDrainUnderLoad(t *testing.T) {
	verdict(t, "faults")
	const conns, size = 50, 1 << 20
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{})

	var (
		wg         sync.WaitGroup
		ok, failed atomic.Int64
		started    sync.WaitGroup
		proceed    = make(chan struct{})
		firstErr   atomic.Pointer[error]
	)
	started.Add(conns)
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", p.entry, waitFor)
			if err != nil {
				started.Done()
				failed.Add(1)
				firstErr.CompareAndSwap(nil, &err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * waitFor))
			payload := randomBytes(size)
			// First 64 KiB and its echo: the connection is live end to end.
			c.Write(payload[:64<<10])
			head := make([]byte, 64<<10)
			_, err = io.ReadFull(c, head)
			started.Done()
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, &err)
				return
			}
			<-proceed
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(payload[64<<10:])
				if err == nil {
					err = c.(*net.TCPConn).CloseWrite()
				}
				errc <- err
			}()
			rest, err := io.ReadAll(c)
			if werr := <-errc; err == nil {
				err = werr
			}
			got := append(head, rest...)
			if err != nil || sha256.Sum256(got) != sha256.Sum256(payload) {
				failed.Add(1)
				if err != nil {
					firstErr.CompareAndSwap(nil, &err)
				}
				return
			}
			ok.Add(1)
		}()
	}
	started.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	shut := make(chan error, 2)
	go func() { shut <- p.out.srv.Shutdown(ctx) }()
	go func() { shut <- p.in.srv.Shutdown(ctx) }()
	// Listeners close first: a new connection is refused while the old ones
	// go on.
	deadline := time.Now().Add(waitFor)
	refusedNew := false
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", p.entry, time.Second)
		if err != nil {
			refusedNew = true
			break
		}
		c.Close()
		time.Sleep(5 * time.Millisecond)
	}
	close(proceed)
	wg.Wait()
	var shutErrs []error
	for range 2 {
		if err := <-shut; err != nil {
			shutErrs = append(shutErrs, err)
		}
	}
	t.Logf("drain: %d/%d in-flight transfers of %d KiB completed, new connections refused %v, shutdown errors %v", ok.Load(), conns, size>>10, refusedNew, shutErrs)
	figuref("faults", "drain under load (Shutdown): in-flight transfers completed intact", "%d / %d (1 MiB each)", ok.Load(), conns)
	lose((conns - ok.Load()) * size)
	if f := firstErr.Load(); f != nil || ok.Load() != conns {
		var first error
		if f != nil {
			first = *f
		}
		t.Errorf("%d transfers failed during the drain; first: %v", failed.Load(), first)
	}
	if !refusedNew {
		t.Error("new connections still accepted during the drain")
	}
	if len(shutErrs) > 0 {
		t.Errorf("Shutdown forced: %v", shutErrs)
	}
}

// TestRevocationMidStream: a policy change revokes a peer in the middle of a
// stream. Its connection must be cut, and the client should learn that the
// stream was cut (a reset), not see a clean end of a truncated stream.
func TestRevocationMidStream(t *testing.T) {
	verdict(t, "faults")
	const tries = 5
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{})
	cleanEOF, resets := 0, 0
	for i := range tries {
		c, err := net.DialTimeout("tcp", p.entry, waitFor)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(waitFor))
		go func() {
			chunk := randomBytes(16 << 10)
			for {
				if _, err := c.Write(chunk); err != nil {
					return
				}
			}
		}()
		if _, err := io.ReadFull(c, make([]byte, 64<<10)); err != nil {
			t.Fatalf("before the revocation: %v", err)
		}
		// Revoke: the frontend is no longer allowed.
		cfg := *p.in.srv.Current()
		in := p.inConfig
		in.Allow = identity.NewAllowList(identity.AllowID(id("someone-else")))
		cfg.Inbound = []proxy.Inbound{in}
		cfg.Version = fmt.Sprintf("revoke-%d", i)
		p.in.apply(&cfg)
		_, err = io.Copy(io.Discard, c)
		reset := sawReset(c, err)
		c.Close()
		switch {
		case reset:
			resets++
		case err == nil:
			cleanEOF++
		default:
			t.Errorf("after the revocation: %v", err)
		}
		// Allow again for the next round.
		cfg.Inbound = []proxy.Inbound{p.inConfig}
		cfg.Version = fmt.Sprintf("allow-%d", i)
		p.in.apply(&cfg)
	}
	revoked := p.in.waitMetric("latch_connections_closed_total", map[string]string{"reason": "policy_revoked"}, tries)
	t.Logf("revoked mid-stream: %d connections cut (policy_revoked %v): %d reset, %d clean EOF", tries, revoked, resets, cleanEOF)
	figuref("faults", "peer revoked mid-stream: cut / seen as reset / seen as clean EOF", "%d / %d / %d", tries, resets, cleanEOF)
	silentCuts.Add(int64(cleanEOF))
	if cleanEOF > 0 {
		t.Errorf("%d revoked streams ended with a clean EOF: the client cannot tell them from complete ones", cleanEOF)
	}
}
