package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
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

// halfResult is how one direction of a pipe ended.
type halfResult struct {
	// err is nil when the source reached EOF and the destination was
	// half-closed.
	err error
	// upstream says which side failed: the dialed one or the accepted one.
	upstream bool
}

// pipe copies both ways between the downstream (accepted) and upstream
// (dialed) connections until both directions ended. rw are the connections
// to read and write (a *tls.Conn on the encrypted side), raw the TCP
// connections under them.
//
// A clean end of stream on one side is passed on as a half-close of the
// other (close_notify and FIN on TLS, FIN on TCP), and the other direction
// goes on. A failure on either side resets both, so that neither end mistakes
// a broken stream for a complete one.
func (c *conn) pipe(downRW, downRaw, upRW, upRaw net.Conn, idle time.Duration) {
	c.startIdleTimer(idle)
	// Each direction acts on its own end at once: a reset seen by one must
	// not wait for the other direction, which may stay quiet for long.
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ended(c.copyHalf(upRW, upRaw, downRW, true))
	}()
	c.ended(c.copyHalf(downRW, downRaw, upRW, false))
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
		c.kill(reasonUpstreamReset, true)
	} else {
		c.kill(reasonDownstreamReset, true)
	}
}

// copyHalf copies from src to dst until src ends. fromDownstream says which
// way the bytes flow, for the byte counts. On EOF it half-closes dst.
func (c *conn) copyHalf(dst, dstRaw, src net.Conn, fromDownstream bool) halfResult {
	bp := bufferPool.Get().(*[]byte)
	defer bufferPool.Put(bp)
	buf := *bp

	total := &c.bytesOut
	if fromDownstream {
		total = &c.bytesIn
	}
	counter := c.l.metrics.flowCounter(fromDownstream)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			c.touch()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return halfResult{err: werr, upstream: fromDownstream}
			}
			total.Add(int64(n))
			if counter != nil {
				counter.Add(float64(n))
			}
		}
		if rerr == io.EOF {
			if err := closeWrite(dst, dstRaw); err != nil {
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
		c.kill(reasonIdleTimeout, false)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.killed() {
		c.idleTimer.Reset(idle - quiet)
	}
}
