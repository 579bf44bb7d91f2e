package reliability

import (
	"crypto/sha256"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
)

// TestLoadConcurrent holds N proxied connections open at the same time
// through a sidecar pair (client → outbound → mTLS → inbound → echo app),
// checks every byte by hash, and reports RSS, goroutines and descriptors at
// the peak. N is 1,000 by default, 10,000 with -reliability.full.
func TestLoadConcurrent(t *testing.T) {
	verdict(t, "load")
	n := 1000
	if full() {
		n = 10000
	}
	// Six descriptors per connection live in this one process (client, two
	// per sidecar, app). When the hard limit cannot be raised far enough,
	// run as many as fit and say so in the figures rather than failing on
	// the test rig's limit.
	want := n
	if fit := int(fdLimit-1000) / 6; fdLimit > 1000 && fit < n {
		n = fit
		t.Logf("RLIMIT_NOFILE %d holds only %d connections in one process (6 descriptors each); asked for %d", fdLimit, n, want)
		figuref("load", "connections asked for (capped by RLIMIT_NOFILE)", "%d, ran %d", want, n)
	}
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{
		inbound:  proxy.Inbound{MaxConnections: n + 64},
		outbound: proxy.Outbound{MaxConnections: n + 64},
	})
	// One warm connection so that the baseline holds the sessions, pools
	// and code pages every connection shares.
	if err := echoOK(p.entry, 1024, waitFor); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	baseRSS, baseG, baseFD := rssKiB(), runtime.NumGoroutine(), openFDs()

	const payload = 1024
	var (
		established, failed, corrupted atomic.Int64
		ready                          sync.WaitGroup
		done                           sync.WaitGroup
		release                        = make(chan struct{})
		dialing                        = make(chan struct{}, 256) // bounds connects in flight, not connections held
		firstErr                       atomic.Pointer[error]
	)
	fail := func(err error) {
		failed.Add(1)
		firstErr.CompareAndSwap(nil, &err)
	}
	begin := time.Now()
	ready.Add(n)
	done.Add(n)
	for range n {
		go func() {
			defer done.Done()
			dialing <- struct{}{}
			c, err := net.DialTimeout("tcp", p.entry, waitFor)
			if err != nil {
				<-dialing
				ready.Done()
				fail(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * waitFor))
			out := randomBytes(payload)
			back := make([]byte, payload)
			_, err = c.Write(out)
			if err == nil {
				_, err = io.ReadFull(c, back)
			}
			<-dialing
			ready.Done()
			if err != nil {
				fail(err)
				return
			}
			if sha256.Sum256(back) != sha256.Sum256(out) {
				corrupted.Add(1)
			}
			established.Add(1)
			<-release
			c.(*net.TCPConn).CloseWrite()
			rest, err := io.ReadAll(c)
			if err != nil {
				fail(err)
			} else if len(rest) != 0 {
				corrupted.Add(1)
			}
		}()
	}
	ready.Wait()
	setup := time.Since(begin)
	peakRSS, peakG, peakFD := rssKiB(), runtime.NumGoroutine(), openFDs()
	var inActive, outActive int
	for _, l := range p.in.srv.Listeners() {
		inActive += l.Active
	}
	for _, l := range p.out.srv.Listeners() {
		outActive += l.Active
	}
	close(release)
	done.Wait()

	held := established.Load()
	t.Logf("%d connections held open in %v; peak RSS %s (+%s), goroutines %d (+%d), fds %d (+%d); active in/out %d/%d",
		held, setup.Round(time.Millisecond), mib(peakRSS), mib(peakRSS-baseRSS), peakG, peakG-baseG, peakFD, peakFD-baseFD, inActive, outActive)
	figuref("load", "concurrent proxied connections held (pair)", "%d / %d", held, n)
	figuref("load", "time to establish them", "%v", setup.Round(time.Millisecond))
	figuref("load", "RSS at peak (whole test process: clients, app, both sidecars)", "%s (+%s over idle, %.1f KiB/connection)", mib(peakRSS), mib(peakRSS-baseRSS), float64(peakRSS-baseRSS)/float64(max(held, 1)))
	figuref("load", "goroutines at peak", "%d (+%d)", peakG, peakG-baseG)
	figuref("load", "open descriptors at peak", "%d (+%d, limit %d)", peakFD, peakFD-baseFD, fdLimit)
	figuref("load", "connections failed / bytes corrupted (load)", "%d / %d", failed.Load(), corrupted.Load())
	lose((failed.Load() + corrupted.Load()) * payload)
	if f := firstErr.Load(); f != nil {
		t.Errorf("%d connections failed; first: %v", failed.Load(), *f)
	}
	if corrupted.Load() != 0 {
		t.Errorf("%d connections got corrupted bytes", corrupted.Load())
	}
	if held != int64(n) || inActive != n || outActive != n {
		t.Errorf("held %d, inbound active %d, outbound active %d; want %d each", held, inActive, outActive, n)
	}
}

// TestFloodPastLimit fills the entry listener's connection limit, then
// floods it with many more connections. The limit is taken before Accept, so
// the flood waits in the kernel's backlog: the sidecar never holds more than
// its limit (no descriptor exhaustion, no goroutine per flood connection),
// nothing crashes, and once the held connections end the queued ones are
// served, every byte intact.
func TestFloodPastLimit(t *testing.T) {
	verdict(t, "load")
	const limit, flood = 20, 500
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{outbound: proxy.Outbound{MaxConnections: limit}})

	// Hold the limit.
	var held []net.Conn
	for range limit {
		c, err := net.DialTimeout("tcp", p.entry, waitFor)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(waitFor))
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	runtime.GC()
	baseFD, baseG := openFDs(), runtime.NumGoroutine()

	// Flood: every client connects, sends its payload and waits for the echo.
	var (
		dialed, served, failed, corrupted atomic.Int64
		wg                                sync.WaitGroup
		firstErr                          atomic.Pointer[error]
	)
	begin := time.Now()
	for range flood {
		wg.Add(1)
		go func() {
			defer wg.Done()
			payload := randomBytes(512)
			c, err := net.DialTimeout("tcp", p.entry, waitFor)
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, &err)
				return
			}
			dialed.Add(1)
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * waitFor))
			c.Write(payload)
			c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			switch {
			case err != nil:
				failed.Add(1)
				firstErr.CompareAndSwap(nil, &err)
			case sha256.Sum256(got) != sha256.Sum256(payload):
				corrupted.Add(1)
			default:
				served.Add(1)
			}
		}()
	}
	// Wait until every flood connection is at least connected (in the
	// backlog), then look at what the sidecar holds.
	deadline := time.Now().Add(waitFor)
	for dialed.Load()+failed.Load() < flood && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	connectTime := time.Since(begin)
	active := p.out.srv.Listeners()[0].Active
	floodFD, floodG := openFDs(), runtime.NumGoroutine()
	servedWhileHeld := served.Load()
	// Each flood connection costs this process one descriptor and one
	// goroutine on the client side; anything beyond is the sidecars'.
	sidecarFDs := floodFD - baseFD - int(dialed.Load())
	sidecarG := floodG - baseG - flood

	for _, c := range held {
		c.Close()
	}
	wg.Wait()
	drained := time.Since(begin)

	t.Logf("flood of %d past a limit of %d: connected %d in %v, active %d, served while held %d, extra sidecar fds %d goroutines %d; all served %d in %v, failed %d",
		flood, limit, dialed.Load(), connectTime.Round(time.Millisecond), active, servedWhileHeld, sidecarFDs, sidecarG, served.Load(), drained.Round(time.Millisecond), failed.Load())
	figuref("load", "flood past maxConnections", "%d connections onto a listener limited to %d", flood, limit)
	figuref("load", "flood: sidecar active while saturated / served before slots freed", "%d / %d (rest held in the kernel backlog, not accepted)", active, servedWhileHeld)
	figuref("load", "flood: extra descriptors / goroutines in the sidecar while saturated", "%d / %d", sidecarFDs, sidecarG)
	figuref("load", "flood: served after the held connections closed", "%d / %d in %v, failed %d, corrupted %d", served.Load(), flood, drained.Round(time.Millisecond), failed.Load(), corrupted.Load())

	lose((flood - served.Load()) * 512)
	if active > limit {
		t.Errorf("listener holds %d connections, limit %d", active, limit)
	}
	if servedWhileHeld != 0 {
		t.Errorf("%d flood connections served while the limit was held", servedWhileHeld)
	}
	if sidecarFDs > 16 {
		t.Errorf("sidecars opened %d descriptors for a flood they should not accept", sidecarFDs)
	}
	if f := firstErr.Load(); f != nil || corrupted.Load() != 0 || served.Load() != flood {
		var first error
		if f != nil {
			first = *f
		}
		t.Errorf("flood: served %d/%d, failed %d (first %v), corrupted %d", served.Load(), flood, failed.Load(), first, corrupted.Load())
	}
}

// TestSlowReader pushes a large stream at an app that does not read. The
// copy loop blocks on the full socket instead of buffering: the bytes in
// flight and the process's RSS stay bounded by socket buffers, not by the
// stream's size. Then the app reads, and every byte arrives intact.
func TestSlowReader(t *testing.T) {
	verdict(t, "load")
	size := 128 << 20
	gate := make(chan struct{})
	type result struct {
		n   int64
		sum [32]byte
	}
	results := make(chan result, 1)
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{appConfig: func(a *app) {
		a.handle = func(a *app, c *net.TCPConn) {
			select {
			case <-gate:
			case <-time.After(2 * waitFor):
				return
			}
			h := sha256.New()
			n, _ := io.Copy(h, countingReader{c, &a.bytes})
			var r result
			r.n = n
			copy(r.sum[:], h.Sum(nil))
			results <- r
		}
	}})
	runtime.GC()
	baseRSS := rssKiB()

	c, err := net.DialTimeout("tcp", p.entry, waitFor)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var written atomic.Int64
	h := sha256.New()
	werr := make(chan error, 1)
	go func() {
		chunk := randomBytes(1 << 20)
		for written.Load() < int64(size) {
			h.Write(chunk)
			c.SetWriteDeadline(time.Now().Add(2 * waitFor))
			n, err := c.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				werr <- err
				return
			}
		}
		werr <- c.(*net.TCPConn).CloseWrite()
	}()

	// Wait for the writer to stall: no progress for 500ms.
	var stalled int64
	last, since := int64(-1), time.Now()
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		w := written.Load()
		if w != last {
			last, since = w, time.Now()
			continue
		}
		if time.Since(since) > 500*time.Millisecond {
			stalled = w
			break
		}
	}
	stallRSS := rssKiB()
	close(gate)
	if err := <-werr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	var r result
	select {
	case r = <-results:
	case <-time.After(2 * waitFor):
		t.Fatal("app never finished reading")
	}
	var want [32]byte
	copy(want[:], h.Sum(nil))

	t.Logf("stream of %d MiB to a stalled app: %.1f MiB in flight when the writer stalled, RSS %s (+%s); app then read %d bytes", size>>20, float64(stalled)/(1<<20), mib(stallRSS), mib(stallRSS-baseRSS), r.n)
	figuref("load", "slow reader: bytes in flight when the writer blocked", "%.1f MiB of a %d MiB stream", float64(stalled)/(1<<20), size>>20)
	figuref("load", "slow reader: RSS growth while blocked", "%s", mib(stallRSS-baseRSS))
	if r.sum != want {
		lose(int64(size))
	} else {
		lose(int64(size) - r.n)
	}
	figuref("load", "slow reader: bytes lost", "%d", int64(size)-r.n)
	if stalled == 0 || stalled > 64<<20 {
		t.Errorf("writer stalled after %d bytes: want back-pressure within 64 MiB", stalled)
	}
	if stallRSS-baseRSS > 64<<10 {
		t.Errorf("RSS grew by %s while the app did not read", mib(stallRSS-baseRSS))
	}
	if r.n != int64(size) || r.sum != want {
		t.Errorf("app got %d bytes (hash match %v), want %d", r.n, r.sum == want, size)
	}
}

// TestSilentClientsHoldSlots: anyone who can reach an inbound port can open
// connections and send nothing. Each holds a connection slot until the
// handshake timeout; with all slots held, a legitimate peer waits in the
// backlog until the first timeout frees one. The test measures that wait,
// the bound the handshake timeout puts on this denial of service.
func TestSilentClientsHoldSlots(t *testing.T) {
	verdict(t, "load")
	const limit, handshakeTimeout = 20, time.Second
	m := newMesh(t, devca.Options{})
	p := newPair(t, m, pairOptions{inbound: proxy.Inbound{MaxConnections: limit, HandshakeTimeout: handshakeTimeout}})
	if err := echoOK(p.entry, 1024, waitFor); err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	for range limit {
		c, err := net.DialTimeout("tcp", p.inbound, waitFor)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	// Wait until the sidecar holds them all.
	for p.in.srv.Listeners()[0].Active < limit && time.Since(begin) < waitFor {
		time.Sleep(5 * time.Millisecond)
	}
	legit := time.Now()
	if err := echoOK(p.entry, 1024, waitFor); err != nil {
		t.Fatalf("legitimate peer after the silent clients: %v", err)
	}
	waited := time.Since(legit)
	timeouts := p.in.waitMetric("latch_handshake_failures_total", map[string]string{"class": "timeout"}, 1)
	t.Logf("%d silent connections held every slot; a legitimate peer got through after %v (handshake timeout %v); timeouts counted %v", limit, waited.Round(time.Millisecond), handshakeTimeout, timeouts)
	figuref("load", "silent clients holding every inbound slot: legitimate peer's wait", "%v (handshake timeout %v, %d slots)", waited.Round(time.Millisecond), handshakeTimeout, limit)
	if waited > handshakeTimeout+5*time.Second {
		t.Errorf("legitimate peer waited %v, far beyond the handshake timeout %v", waited, handshakeTimeout)
	}
}
