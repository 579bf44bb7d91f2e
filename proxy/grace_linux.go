package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// A direction that finds its source empty waits for data in the socket's
// read, on the runtime poller (see socket). If no data comes for parkAfter,
// the parker takes it over and its goroutine ends. What measures that time
// is not a timer per wait: arming and disarming a read deadline around every
// wait of a busy connection adds a runtime timer each time, and a timer that
// becomes the earliest wakes the network poller or another thread — about one
// extra context switch per request/response round trip through a pair
// (docs/performance.md). Instead one sweeper per Server looks at every piped
// connection's sockets once per parkAfter, and ends a wait it finds still
// going on since its previous look, by setting a read deadline in the past
// on that one socket. A wait therefore ends after between parkAfter and
// twice that, and a busy connection never touches a timer. The sweeper runs
// only while some direction waits: it stops after two looks that found none,
// and the next wait starts it again.

// graceState is a socket's side of the sweeper's protocol. The socket's
// reader calls begin when a read starts waiting and end when it returns;
// the sweeper calls sweep. A deadline the sweeper set is cleared by end
// before the reader touches the socket again, under mu so that it cannot
// come after the clearing.
type graceState struct {
	sw    *graceSweeper
	state atomic.Int32  // graceRunning, graceWaiting or graceEnded
	seq   atomic.Uint32 // waits begun
	seen  uint32        // the sweeper's: seq at its previous look
	mu    sync.Mutex
}

const (
	graceRunning int32 = iota // not waiting
	graceWaiting              // waiting in a read
	graceEnded                // the sweeper set a deadline to end the wait
)

// aLongTimeAgo is a deadline in the past: the read it is set on returns at
// once with os.ErrDeadlineExceeded.
var aLongTimeAgo = time.Unix(1, 0)

func (g *graceState) begin() {
	g.seq.Add(1)
	g.state.Store(graceWaiting)
	if g.sw != nil {
		g.sw.ensure()
	}
}

// end reports whether the sweeper ended the wait; the deadline it set is
// cleared by then.
func (g *graceState) end(c *net.TCPConn) bool {
	if g.state.CompareAndSwap(graceWaiting, graceRunning) {
		return false
	}
	g.mu.Lock()
	c.SetReadDeadline(time.Time{})
	g.state.Store(graceRunning)
	g.mu.Unlock()
	return true
}

// sweep ends the wait if it is the one seen at the previous look, and
// reports whether the socket is waiting. Only the sweeper calls it.
func (g *graceState) sweep(c *net.TCPConn) bool {
	if g.state.Load() != graceWaiting {
		return false
	}
	if seq := g.seq.Load(); seq != g.seen {
		g.seen = seq
		return true
	}
	g.mu.Lock()
	if g.state.CompareAndSwap(graceWaiting, graceEnded) {
		c.SetReadDeadline(aLongTimeAgo)
	}
	g.mu.Unlock()
	return true
}

// graceSweeper ends the waits of a Server's connections that lasted
// parkAfter (see above).
type graceSweeper struct {
	running atomic.Bool

	mu     sync.Mutex
	conns  map[*conn]struct{} // piped connections
	closed bool
	stop   chan struct{}
	done   chan struct{}
}

// track adds a connection whose pipe starts; untrack removes it when its
// pipe has ended.
func (g *graceSweeper) track(c *conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.conns == nil {
		g.conns = make(map[*conn]struct{})
	}
	g.conns[c] = struct{}{}
}

func (g *graceSweeper) untrack(c *conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.conns, c)
}

// ensure starts the sweeper unless it runs; a wait calls it after it is
// marked as waiting, so either the running sweeper's next look sees it or
// this starts one.
func (g *graceSweeper) ensure() {
	if g.running.Load() {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.running.Load() || g.closed {
		return
	}
	g.running.Store(true)
	g.stop, g.done = make(chan struct{}), make(chan struct{})
	// A direction waits with parkAfter zero only when it could not be
	// parked; it is looked at every millisecond then.
	go g.loop(max(parkAfter, time.Millisecond), g.stop, g.done)
}

func (g *graceSweeper) loop(tick time.Duration, stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(tick)
	defer t.Stop()
	quiet := 0
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		g.mu.Lock()
		quiet++
		if g.sweepLocked() {
			quiet = 0
		}
		if quiet >= 2 {
			// Stop, then look once more: a wait that began before the
			// store is seen now (and the sweeper goes on); one that
			// begins after it sees running false and starts a new one,
			// once this one has let go of mu.
			g.running.Store(false)
			if !g.sweepLocked() {
				g.mu.Unlock()
				return
			}
			g.running.Store(true)
			quiet = 0
		}
		g.mu.Unlock()
	}
}

// sweepLocked looks at every tracked socket and reports whether any was
// waiting; under mu.
func (g *graceSweeper) sweepLocked() bool {
	waiting := false
	for c := range g.conns {
		for i := range c.sides {
			if s := c.sides[i].sock; s != nil && s.grace.sweep(s.TCPConn) {
				waiting = true
			}
		}
	}
	return waiting
}

// close stops the sweeper for good and returns once its goroutine has
// exited; the Server calls it once every connection has ended. A loop that
// stopped by itself may still be on its way out (it lets go of mu before it
// returns), so close waits for the last one started whether it runs or not.
func (g *graceSweeper) close() {
	g.mu.Lock()
	g.closed = true
	stop, done := g.stop, g.done
	running := g.running.Load()
	g.running.Store(false)
	g.mu.Unlock()
	if running {
		close(stop)
	}
	if done != nil {
		<-done
	}
}
