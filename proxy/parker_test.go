//go:build linux

package proxy

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// until polls cond until it holds, failing the test after waitFor.
func until(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Idle connections hold no goroutine in either sidecar: both directions of
// each are parked, and they come back for data, for a half-close, and for a
// kill (idle timeout, drain).
func TestIdleConnectionsPark(t *testing.T) {
	const n = 20
	m := newMesh(t, echo, meshOptions{drainTimeout: 200 * time.Millisecond})
	parked := func(want int) func() bool {
		return func() bool { return m.outbound.parker.count() == want && m.inbound.parker.count() == want }
	}
	g0 := runtime.NumGoroutine()
	conns := make([]*net.TCPConn, n)
	for i := range conns {
		c := m.dial(t)
		if err := roundTrip(c, "hello"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	until(t, "every direction parked", parked(2*n))
	// Left per connection: the echo app's goroutine. Without parking it
	// would be that plus two directions in each sidecar.
	if g := runtime.NumGoroutine() - g0; g > n+n/2 {
		t.Errorf("%d goroutines for %d idle connections", g, n)
	}

	// Data wakes both directions of every connection, in both sidecars.
	for i, c := range conns {
		if err := roundTrip(c, "again"+strconv.Itoa(i)); err != nil {
			t.Fatalf("connection %d after parking: %v", i, err)
		}
	}
	until(t, "parked again", parked(2*n))

	// A FIN reaches the app through parked directions, and the app's FIN
	// comes back.
	mark := m.logs.mark()
	conns[0].CloseWrite()
	if err := expectClosed(t, conns[0]); err != io.EOF {
		t.Fatalf("half-close through parked directions: %v, want EOF", err)
	}
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "reason": reasonEOF})
	until(t, "the closed connection unparked", parked(2*(n-1)))

	// Drain with parked connections: the deadline passes, kill resumes
	// them, every connection is reset and Shutdown returns.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := m.outbound.Shutdown(ctx); err == nil {
		t.Error("Shutdown with idle connections open returned nil, want the deadline's error")
	}
	if got := m.outbound.parker.count(); got != 0 {
		t.Errorf("%d directions still parked after Shutdown", got)
	}
	for i, c := range conns[1:] {
		if err := expectClosed(t, c); err == nil || err == io.EOF {
			t.Errorf("connection %d after a forced drain: %v, want a reset", i+1, err)
		}
	}
}

// The idle timeout closes a parked connection, and the listener's slot is
// given back.
func TestIdleTimeoutClosesParkedConnection(t *testing.T) {
	m := newMesh(t, echo, meshOptions{inbound: func(in *Inbound) { in.IdleTimeout = 300 * time.Millisecond }})
	mark := m.logs.mark()
	c := m.dial(t)
	if err := roundTrip(c, "once"); err != nil {
		t.Fatal(err)
	}
	until(t, "parked in the inbound sidecar", func() bool { return m.inbound.parker.count() == 2 })
	if err := expectClosed(t, c); err != io.EOF {
		t.Errorf("read after the idle timeout: %v, want a clean EOF", err)
	}
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "reason": reasonIdleTimeout})
	// The outbound sidecar passed the FIN on and waits, parked, for the
	// app's own; closing the client ends it there too.
	c.Close()
	until(t, "nothing parked", func() bool { return m.inbound.parker.count() == 0 && m.outbound.parker.count() == 0 })
	until(t, "no active connection", func() bool {
		for _, l := range m.inbound.Listeners() {
			if l.Active != 0 {
				return false
			}
		}
		return true
	})
}

// Waits that the grace sweeper ends race with data arriving: messages of
// every size (partial TLS records included) with pauses around the grace
// period (parkAfter is 1 ms in tests), on several connections at once. Every
// echo must come back whole and in order, directions must park and resume
// along the way, and once everything is idle the sweeper stops.
func TestGraceEndsWaitsWhileDataFlows(t *testing.T) {
	m := newMesh(t, echo, meshOptions{})
	const conns, messages = 4, 150
	var parkedSeen atomic.Bool
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Microsecond):
			}
			if m.inbound.parker.count() > 0 || m.outbound.parker.count() > 0 {
				parkedSeen.Store(true)
			}
		}
	})
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		c := m.dial(t)
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			for j := range messages {
				size := 1 + rng.IntN(100<<10)
				if j%3 == 0 {
					size = 1 + rng.IntN(64)
				}
				msg := make([]byte, size)
				for k := range msg {
					msg[k] = byte(rng.Uint32())
				}
				if err := roundTrip(c, string(msg)); err != nil {
					errs <- fmt.Errorf("connection %d, message %d (%d bytes): %w", i, j, size, err)
					return
				}
				time.Sleep(time.Duration(rng.IntN(4000)) * time.Microsecond)
			}
		})
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if !parkedSeen.Load() {
		t.Error("no direction was ever parked: the grace never ended a wait")
	}
	until(t, "every direction parked", func() bool { return m.inbound.parker.count() == 2*conns && m.outbound.parker.count() == 2*conns })
	until(t, "the grace sweepers stopped", func() bool { return !m.inbound.grace.running.Load() && !m.outbound.grace.running.Load() })
}
