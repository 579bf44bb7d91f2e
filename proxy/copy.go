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

	"latch.dev/latch/identity"
)

// copyBufferSize and bulkBufferSize are the sizes of the pooled copy
// buffers. A direction starts with a 32 KiB one, what io.Copy allocates: a
// write of two full TLS records (16 KiB each) towards the encrypted side per
// read of the plain side, and writes large enough that the plain side's
// syscalls are few. A direction whose read fills its buffer is streaming, and
// takes 128 KiB buffers from then on, until it is parked: four times fewer
// reads, writes and wake-ups per byte, which cut the pair's CPU per GB by
// about a tenth in the harness (docs/performance.md). 256 KiB gained nothing
// more. Request/response traffic never fills 32 KiB, so it never holds the
// larger size.
//
// The buffers are pooled, and a direction only holds one while data flows:
// waiting for data it holds none (see socket), so an idle connection costs
// no buffer and a busy one reuses them.
//
// The copy loop is ours rather than io.Copy's because every pipe has a TLS
// side: neither splice(2) nor sendfile(2) can apply (io.Copy would fall back
// to the same read/write loop with a fresh buffer), and the loop has to note
// activity for the idle timeout, count bytes as they flow, and give its
// buffer back while it waits.
const (
	copyBufferSize = 32 << 10
	bulkBufferSize = 128 << 10
)

var (
	bufferPool = sync.Pool{New: func() any {
		b := make([]byte, copyBufferSize)
		return &b
	}}
	bulkBufferPool = sync.Pool{New: func() any {
		b := make([]byte, bulkBufferSize)
		return &b
	}}
)

// getBuffer takes a copy buffer from the pool of its size.
func getBuffer(bulk bool) *[]byte {
	if bulk {
		return bulkBufferPool.Get().(*[]byte)
	}
	return bufferPool.Get().(*[]byte)
}

// putBuffer gives a buffer from getBuffer back to the pool it came from.
func putBuffer(bp *[]byte) {
	if len(*bp) == bulkBufferSize {
		bulkBufferPool.Put(bp)
		return
	}
	bufferPool.Put(bp)
}

// errWouldBlock is what a socket in the copy loop's mode answers instead of
// waiting, and errIdle what a wait answers once it has lasted parkAfter (see
// socket). Both are temporary net.Errors, like a passed read deadline, so a
// tls.Conn reading the socket passes them on and stays usable.
var (
	errWouldBlock error = tempError("proxy: read would block")
	errIdle       error = tempError("proxy: no data for the grace period")
)

type tempError string

func (e tempError) Error() string { return string(e) }
func (tempError) Timeout() bool   { return true }
func (tempError) Temporary() bool { return true }

// errWriteBlocked is what the TLS stack's write gets from a socket that a
// write of the copy loop holds while kill closes the connection (see
// socket.Write).
var errWriteBlocked = errors.New("proxy: the socket is held by a write the peer does not read")

// errResetAtEOF is the failure of a read that returned EOF on a connection
// that had been reset.
var errResetAtEOF = fmt.Errorf("end of stream on a reset connection: %w", syscall.ECONNRESET)

// errTruncated is the failure of a TLS stream whose TCP connection ended
// without a close_notify alert (see transport).
var errTruncated = errors.New("TLS stream ended without close_notify")

// halfResult is how one direction of a pipe ended.
type halfResult struct {
	// err is nil when the source reached EOF and the destination was
	// half-closed.
	err error
	// upstream says which side failed: the dialed one or the accepted one.
	upstream bool
	// parked: the direction did not end, the parker holds it.
	parked bool
	// truncated: err is errTruncated.
	truncated bool
}

// side is one end of a pipe: rw is the connection to read and write (a
// *tls.Conn on the encrypted side), raw the TCP connection under it, sock
// raw's non-blocking reader (nil where there is none, see newSocket); on the
// encrypted side the tls.Conn reads through sock.
type side struct {
	rw, raw net.Conn
	sock    *socket
	plain   bool       // rw is raw
	tr      *transport // under rw when rw is a tls.Conn
	// shut is set just before the proxy half-closes raw, so that the
	// direction reading raw can tell the end of that exchange from a reset
	// (see wasReset).
	shut atomic.Bool

	// The direction that reads this side (see run): its connection, where
	// the bytes go and which way that is, and what the direction that ends
	// last calls. Set by pipe, so the parker can start it again.
	c              *conn
	dst            *side
	fromDownstream bool
	then           func()
	// registered and token are the parker's, under its mutex: the socket
	// is in its epoll set; the token it is parked under (0: not parked).
	registered bool
	token      uint64
	// one is where a TLS side's next record is waited for (see copyHalf).
	one [1]byte
}

func (s *side) init(rw, raw net.Conn, sock *socket) {
	s.rw, s.raw, s.sock = rw, raw, sock
	s.plain = rw == raw
	s.tr = transportOf(rw)
	if sock != nil {
		sock.setNonblocking()
	}
}

// parkAfter is how long a direction waits for data on its goroutine, at
// least, before the parker takes it over and the goroutine ends (at most
// twice that, see grace). Long enough that a connection in use (a request
// and its response, a stream with pauses) keeps the runtime poller's fast
// wake-up; short enough that connections kept open and idle (pools,
// long-lived streams between bursts) hold no goroutine. Tests shorten it,
// before any connection exists; zero parks a direction as soon as its
// source is empty.
var parkAfter = 500 * time.Millisecond

// pipe copies both ways between the downstream (accepted) and upstream
// (dialed) sides, each direction on a goroutine of its own, and returns at
// once; the direction that ends last calls then.
//
// A clean end of stream on one side is passed on as a half-close of the
// other (close_notify and FIN on TLS, FIN on TCP), and the other direction
// goes on. A failure on either side resets both, so that neither end mistakes
// a broken stream for a complete one.
//
// downSock and upSock are the sockets of downRaw and upRaw (nil: none); on a
// TLS side, the one the tls.Conn was built on.
//
// Why two fresh goroutines rather than the connection's own plus one: the
// goroutine that ran the handshake has a stack grown by it (crypto is deep)
// that the runtime only shrinks while it is mostly unused, and a connection
// that waits for data keeps its goroutines for as long as it is open. Fresh
// ones start small and stay so while they wait (≈6 KB less per connection).
func (c *conn) pipe(downRW, downRaw net.Conn, downSock *socket, upRW, upRaw net.Conn, upSock *socket, idle time.Duration, then func()) {
	down, up := &c.sides[0], &c.sides[1]
	down.init(downRW, downRaw, downSock)
	up.init(upRW, upRaw, upSock)
	c.startIdleTimer(idle)
	c.piped = true
	// Each direction acts on its own end at once: a reset seen by one must
	// not wait for the other direction, which may stay quiet for long.
	c.pending.Store(2)
	down.c, down.dst, down.fromDownstream, down.then = c, up, true, then
	up.c, up.dst, up.fromDownstream, up.then = c, down, false, then
	for _, s := range []*side{down, up} {
		if s.sock != nil {
			s.sock.grace.sw = &c.l.s.grace
		}
	}
	c.l.s.grace.track(c)
	go down.run()
	go up.run()
}

// run runs the direction that reads s to its end, or until it is parked
// (then the parker or kill runs it again, see parker).
func (s *side) run() {
	c := s.c
	r := c.copyHalf(s.dst, s, s.fromDownstream)
	if r.parked {
		return
	}
	c.ended(r)
	if c.pending.Add(-1) == 0 {
		c.l.s.grace.untrack(c)
		c.reason.CompareAndSwap(nil, &eofReason)
		s.then()
	}
}

var eofReason = reasonEOF

// ended handles the end of one direction: a failure resets the whole
// connection (which also unblocks the other direction).
func (c *conn) ended(r halfResult) {
	if r.err == nil {
		return
	}
	if r.truncated {
		c.kill(reasonTruncated)
		return
	}
	if r.upstream && c.l.dir == DirectionOutbound && c.bytesOut.Load() == 0 && identity.RefusedCertificate(r.err) {
		c.clientRefused(r.err)
	}
	if r.upstream {
		c.kill(reasonUpstreamReset)
	} else {
		c.kill(reasonDownstreamReset)
	}
}

// copyHalf copies from src to dst until src ends. fromDownstream says which
// way the bytes flow, for the byte counts. On a clean EOF it half-closes dst;
// an EOF that was a reset in disguise (see wasReset) is a failure, and so is
// the end of a TLS stream without close_notify (see transport): passed on as
// a half-close it would hand the app a truncated stream as a complete one.
func (c *conn) copyHalf(dst, src *side, fromDownstream bool) halfResult {
	var bp *[]byte // the pooled buffer, held only while data flows
	defer func() {
		if bp != nil {
			putBuffer(bp)
		}
	}()
	bulk := false // a read filled the buffer: larger ones from now on

	total := &c.bytesOut
	if fromDownstream {
		total = &c.bytesIn
	}
	counter := c.l.metrics.flowCounter(fromDownstream)
	wait := parkAfter > 0
	for {
		var n int
		var rerr error
		// idle: the source had nothing for the grace period (or, with
		// parkAfter zero, nothing at all) and no buffer is held: park.
		idle := false
		switch {
		case src.plain && src.sock != nil:
			// Waits inside, holding no buffer, when there is nothing to
			// read.
			bp, n, rerr = src.sock.readPooled(bp, bulk, wait)
			idle = rerr == errWouldBlock || rerr == errIdle
		case src.sock != nil:
			if bp == nil {
				// A TLS side: wait for the next record with a one-byte
				// read, the only read of the TLS stack that may wait, so
				// that no copy buffer is held while it does. The rest of
				// the record is in the tls.Conn's buffer by then.
				// It asks the socket, even if the last read(2) drained it.
				src.sock.waitOK, src.sock.drained, src.sock.rawRead = wait, false, !bulk
				n, rerr = src.rw.Read(src.one[:])
				src.sock.waitOK = false
				if n == 0 {
					idle = rerr == errWouldBlock || rerr == errIdle
					break
				}
				bp = getBuffer(bulk)
				(*bp)[0] = src.one[0]
			}
			// A TLS read gives one record at most: go on while more is at
			// hand, so the plain side gets one write per buffer, not per
			// record. These reads never wait (errWouldBlock).
			src.sock.rawRead = !bulk
			for rerr == nil && n < len(*bp) {
				var m int
				m, rerr = src.rw.Read((*bp)[n:])
				n += m
			}
		default:
			if bp == nil {
				bp = getBuffer(bulk)
			}
			n, rerr = src.rw.Read(*bp)
		}
		if n > 0 {
			c.touch()
			if err := write(dst, (*bp)[:n], bulk); err != nil {
				return halfResult{err: err, upstream: fromDownstream}
			}
			total.Add(int64(n))
			if counter != nil {
				counter.Add(float64(n))
			}
			if n == len(*bp) && !bulk {
				bulk = true
				putBuffer(bp)
				bp = nil
			}
		}
		if rerr == errWouldBlock || rerr == errIdle {
			// The source is empty: give the buffer back before waiting.
			if bp != nil {
				putBuffer(bp)
				bp = nil
			}
			if idle {
				if c.l.s.parker.park(src) {
					return halfResult{parked: true}
				}
				// Not parked (the connection is being killed, or there is
				// no parker): wait on this goroutine from now on, rather
				// than ask an empty socket again at once.
				wait = true
			}
			continue
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			if wasReset(src) {
				return halfResult{err: errResetAtEOF, upstream: !fromDownstream}
			}
			// crypto/tls gives io.EOF for a bare FIN on a record boundary
			// and io.ErrUnexpectedEOF for one inside a record: either way
			// no close_notify came.
			if src.tr != nil && src.tr.eof {
				return halfResult{err: errTruncated, truncated: true, upstream: !fromDownstream}
			}
		}
		if rerr == io.EOF {
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

// write writes p to dst. Towards a TLS side over a socket, the records of
// the write are sent together: one system call per buffer, not per record.
// bulk says the direction streams (see sysRead).
func write(dst *side, p []byte, bulk bool) error {
	if dst.sock == nil {
		_, err := dst.rw.Write(p)
		return err
	}
	if dst.plain {
		return dst.sock.writeAll(p, !bulk)
	}
	dst.sock.beginBatch(len(p))
	_, err := dst.rw.Write(p)
	if ferr := dst.sock.endBatch(); err == nil {
		err = ferr
	}
	return err
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
