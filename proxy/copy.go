package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// copyBufferSize is the size of the pooled copy buffers. 32 KiB is what
// io.Copy allocates: two TLS records (16 KiB each) per read on the encrypted
// side, and a write large enough that the plain side's syscalls are few. The
// buffers are pooled rather than allocated per connection because a sidecar
// holds two per connection for the connection's whole life and churns through
// many short connections; the pool turns that garbage into reuse.
//
// The copy loop is ours rather than io.Copy's because every pipe has a TLS
// side: neither splice(2) nor sendfile(2) can apply (io.Copy would fall back
// to the same read/write loop with a fresh buffer), and the loop has to note
// activity for the idle timeout and count bytes as they flow.
const copyBufferSize = 32 << 10

var bufferPool = sync.Pool{New: func() any {
	b := make([]byte, copyBufferSize)
	return &b
}}

// errResetAtEOF is the failure of a read that returned EOF on a connection
// that had been reset.
var errResetAtEOF = fmt.Errorf("end of stream on a reset connection: %w", syscall.ECONNRESET)

// halfResult is how one direction of a pipe ended.
type halfResult struct {
	// err is nil when the source reached EOF and the destination was
	// half-closed.
	err error
	// upstream says which side failed: the dialed one or the accepted one.
	upstream bool
}

// side is one end of a pipe: rw is the connection to read and write (a
// *tls.Conn on the encrypted side), raw the TCP connection under it.
type side struct {
	rw, raw net.Conn
	// shut is set just before the proxy half-closes raw, so that the
	// direction reading raw can tell the end of that exchange from a reset
	// (see wasReset).
	shut atomic.Bool
}

// pipe copies both ways between the downstream (accepted) and upstream
// (dialed) sides until both directions ended.
//
// A clean end of stream on one side is passed on as a half-close of the
// other (close_notify and FIN on TLS, FIN on TCP), and the other direction
// goes on. A failure on either side resets both, so that neither end mistakes
// a broken stream for a complete one.
func (c *conn) pipe(downRW, downRaw, upRW, upRaw net.Conn, idle time.Duration) {
	down, up := &c.sides[0], &c.sides[1]
	down.rw, down.raw = downRW, downRaw
	up.rw, up.raw = upRW, upRaw
	c.startIdleTimer(idle)
	// Each direction acts on its own end at once: a reset seen by one must
	// not wait for the other direction, which may stay quiet for long.
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ended(c.copyHalf(up, down, true))
	}()
	c.ended(c.copyHalf(down, up, false))
	<-done
	c.reason.CompareAndSwap(nil, ptr(reasonEOF))
}

func ptr[T any](v T) *T { return &v }

// ended handles the end of one direction: a failure resets the whole
// connection (which also unblocks the other direction).
func (c *conn) ended(r halfResult) {
	if r.err == nil {
		return
	}
	if r.upstream {
		c.kill(reasonUpstreamReset)
	} else {
		c.kill(reasonDownstreamReset)
	}
}

// copyHalf copies from src to dst until src ends. fromDownstream says which
// way the bytes flow, for the byte counts. On a clean EOF it half-closes dst;
// an EOF that was a reset in disguise (see wasReset) is a failure.
func (c *conn) copyHalf(dst, src *side, fromDownstream bool) halfResult {
	bp := bufferPool.Get().(*[]byte)
	defer bufferPool.Put(bp)
	buf := *bp

	total := &c.bytesOut
	if fromDownstream {
		total = &c.bytesIn
	}
	counter := c.l.metrics.flowCounter(fromDownstream)
	for {
		n, rerr := src.rw.Read(buf)
		if n > 0 {
			c.touch()
			if _, werr := dst.rw.Write(buf[:n]); werr != nil {
				return halfResult{err: werr, upstream: fromDownstream}
			}
			total.Add(int64(n))
			if counter != nil {
				counter.Add(float64(n))
			}
		}
		if rerr == io.EOF {
			if wasReset(src) {
				return halfResult{err: errResetAtEOF, upstream: !fromDownstream}
			}
			dst.shut.Store(true)
			if err := closeWrite(dst.rw, dst.raw); err != nil {
				return halfResult{err: err, upstream: fromDownstream}
			}
			return halfResult{}
		}
		if rerr != nil {
			return halfResult{err: rerr, upstream: !fromDownstream}
		}
	}
}

// closeWrite half-closes a connection: for TLS, close_notify then the TCP
// FIN (tls.Conn.CloseWrite does not touch the TCP connection).
func closeWrite(rw, raw net.Conn) error {
	if tc, ok := rw.(*tls.Conn); ok {
		if err := tc.CloseWrite(); err != nil {
			return err
		}
	}
	if hc, ok := raw.(interface{ CloseWrite() error }); ok {
		if err := hc.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
	}
	return nil
}

// touch notes activity for the idle timeout: one atomic store per read.
func (c *conn) touch() { c.last.Store(int64(time.Since(c.start))) }

// startIdleTimer arms a timer that closes the connection after idle without
// a byte either way. It is one timer per connection, re-armed lazily: when
// it fires it looks at the time of the last read and either closes the
// connection or sleeps for the rest of the interval, so reads never touch it.
func (c *conn) startIdleTimer(idle time.Duration) {
	c.touch()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.idleTimer = time.AfterFunc(idle, func() { c.checkIdle(idle) })
}

func (c *conn) checkIdle(idle time.Duration) {
	quiet := time.Since(c.start) - time.Duration(c.last.Load())
	if quiet >= idle {
		c.kill(reasonIdleTimeout)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.killed() {
		c.idleTimer.Reset(idle - quiet)
	}
}
