package proxy

import (
	"errors"
	"net"
	"sync"
	"time"
)

// listener is one bound socket and the connections it accepted.
type listener struct {
	s       *Server
	key     string
	name    string
	dir     Direction
	ln      net.Listener
	addr    string
	metrics listenerMetrics
	limit   *limiter

	mu     sync.Mutex
	conns  map[*conn]struct{}
	closed bool
	// idle is closed once the listener stopped accepting and its last
	// connection has ended.
	idle chan struct{}
	// done is closed when the listener stops accepting.
	done chan struct{}
}

func (s *Server) newListener(r *route, ln net.Listener) *listener {
	return &listener{
		s:       s,
		key:     r.key(),
		name:    r.name,
		dir:     r.dir,
		ln:      ln,
		addr:    ln.Addr().String(),
		metrics: s.metrics.forListener(r.name, r.dir),
		limit:   newLimiter(r.maxConns),
		conns:   make(map[*conn]struct{}),
		idle:    make(chan struct{}),
		done:    make(chan struct{}),
	}
}

// Accept backoff after a failed Accept (out of file descriptors, typically):
// retrying at once would spin; net/http uses the same bounds.
const (
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// acceptLoop takes a connection slot and a wait-group slot before each
// Accept. Taking the slot first is what makes the limit back-pressure: at the
// limit the listener stops accepting, and new connections wait in the
// kernel's backlog instead of being accepted and dropped. Reserving the
// wait-group slot first means Shutdown can never see a zero count between an
// Accept and the start of the connection's goroutine.
func (l *listener) acceptLoop() {
	defer l.s.wg.Done()
	var backoff time.Duration
	for {
		if !l.limit.acquire() {
			return
		}
		l.s.wg.Add(1)
		raw, err := l.ln.Accept()
		if err != nil {
			l.limit.release()
			l.s.wg.Done()
			if errors.Is(err, net.ErrClosed) || l.stopped() {
				return
			}
			backoff = min(max(2*backoff, minAcceptBackoff), maxAcceptBackoff)
			l.s.log.Warn("accept failed, backing off", "listener", l.name, "direction", string(l.dir), "backoff", backoff, "error", err)
			t := time.NewTimer(backoff)
			select {
			case <-l.done:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		backoff = 0
		c := newConn(l, raw)
		if !l.track(c) {
			raw.Close()
			l.limit.release()
			l.s.wg.Done()
			return
		}
		go func() {
			c.serve()
			if !c.piped {
				l.release(c)
			}
		}()
	}
}

// release gives back the slots a connection took before its Accept.
func (l *listener) release(c *conn) {
	l.untrack(c)
	l.limit.release()
	l.s.wg.Done()
}

func (l *listener) stopped() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

// stopAccepting closes the socket; live connections go on.
func (l *listener) stopAccepting() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	close(l.done)
	if len(l.conns) == 0 {
		close(l.idle)
	}
	l.mu.Unlock()
	l.ln.Close()
	l.limit.close()
}

func (l *listener) track(c *conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.conns[c] = struct{}{}
	l.metrics.connOpened()
	return true
}

func (l *listener) untrack(c *conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.conns, c)
	if l.closed && len(l.conns) == 0 {
		close(l.idle)
	}
}

func (l *listener) connections() []*conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*conn, 0, len(l.conns))
	for c := range l.conns {
		out = append(out, c)
	}
	return out
}

func (l *listener) active() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

func (l *listener) killAll(reason string) {
	for _, c := range l.connections() {
		c.kill(reason)
	}
}

// limiter is a counting semaphore whose size can change while in use (Apply
// may change a kept listener's MaxConnections).
type limiter struct {
	mu     sync.Mutex
	cond   sync.Cond
	n, max int
	closed bool
}

func newLimiter(max int) *limiter {
	l := &limiter{max: max}
	l.cond.L = &l.mu
	return l
}

// acquire waits for a free slot; false means the limiter was closed.
func (l *limiter) acquire() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed && l.n >= l.max {
		l.cond.Wait()
	}
	if l.closed {
		return false
	}
	l.n++
	return true
}

func (l *limiter) release() {
	l.mu.Lock()
	l.n--
	l.mu.Unlock()
	l.cond.Signal()
}

func (l *limiter) setMax(max int) {
	l.mu.Lock()
	l.max = max
	l.mu.Unlock()
	l.cond.Broadcast()
}

func (l *limiter) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.cond.Broadcast()
}
