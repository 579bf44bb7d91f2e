package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// socket is the TCP connection under one side of a pipe, read so that a
// direction waiting for data holds no copy buffer, and after a while no
// goroutine either: an idle connection then costs its sockets and TLS state,
// not 64 KiB of buffers (two pooled 32 KiB buffers, one per direction, were
// held across every blocking Read before) nor two goroutine stacks.
//
// A read that finds the socket empty waits for data inside
// syscall.RawConn.Read, on the runtime poller, exactly as a blocking
// net.Conn.Read does: the read(2) made after the poller was armed is the
// readiness test, so waking costs what it costs any Go program (one read
// that finds data, one that finds none). What it does not do is hold a
// buffer while it waits:
//
//   - A plain TCP side is read with readPooled: the callback takes a pooled
//     buffer, reads into it, and on EAGAIN hands it back to the pool before
//     the poller waits. In a steady stream the buffer is kept from read to
//     read.
//   - Under a *tls.Conn the socket is the net.Conn the TLS stack reads into
//     its own record buffer. The copy loop waits for the next record with a
//     one-byte tls.Conn.Read (see copyHalf), the only read that may wait
//     (waitOK); the reads that then fill a copy buffer with what is at hand
//     never wait: on EAGAIN they answer errWouldBlock, a temporary net.Error
//     — what a read deadline that has passed looks like, which crypto/tls
//     returns without breaking the connection (the net.Conn contract lets a
//     Read resume after a timeout) — and after a read(2) that left the
//     socket empty (drained) they answer it without a system call.
//
// A wait ends with data, end of stream or an error, or with errIdle once the
// Server's grace sweeper finds it has lasted parkAfter (see grace): then the
// parker takes the direction over. No timer is armed per wait.
//
// Writes, the handshake (before setNonblocking) and Close go straight to
// the *net.TCPConn. One reader at a time: the callbacks' state lives in the
// struct, and the callbacks are bound once, so a read allocates nothing.
type socket struct {
	*net.TCPConn
	rc          syscall.RawConn
	nonblocking bool // set once, before the copy goroutines start

	// callback state
	p       []byte
	bp      *[]byte
	bulk    bool
	n       int
	err     error
	waitOK  bool // a read that finds nothing may wait (see socket)
	drained bool // the last read(2) left the socket empty
	waiting bool // the current read is waiting: the grace sweeper may end it
	rawRead bool // read with a raw system call (see sysRead)

	readFn, readPooledFn func(fd uintptr) bool

	// writeAll's callback state; one writer at a time (see writeAll).
	writeFn func(fd uintptr) bool
	wp      []byte
	wn      int
	werr    error
	wraw    bool

	// The grace sweeper's view of this socket's waits (see grace).
	grace graceState

	// Writes of the TLS stack, batched by the copy loop (beginBatch,
	// endBatch) so that the records of one tls.Conn.Write leave in one
	// system call. wmu orders them with anything the TLS stack writes from
	// the other direction meanwhile (its answer to a KeyUpdate).
	wmu      sync.Mutex
	batch    bool
	batchRaw bool       // the batch is of a direction that is not streaming (see sysRead)
	wpool    *sync.Pool // where wbuf comes from: the pool of the batch's size
	wbuf     *[]byte
	// closing: kill is closing the TLS connection over this socket (see
	// Write).
	closing atomic.Bool
}

// recordBatchSize holds the records made of n bytes of plaintext: each
// 16 KiB becomes a record of 16 KiB plus at most 256 bytes of header,
// padding and tag.
func recordBatchSize(n int) int { return n + (n/(16<<10)+1)*256 }

// The batch buffers, one pool per copy buffer size.
var (
	recordBatchPool = sync.Pool{New: func() any {
		b := make([]byte, 0, recordBatchSize(copyBufferSize))
		return &b
	}}
	bulkRecordBatchPool = sync.Pool{New: func() any {
		b := make([]byte, 0, recordBatchSize(bulkBufferSize))
		return &b
	}}
)

// newSocket returns the socket of a TCP connection, nil for anything else
// (the copy loop then blocks in Read holding a buffer, as io.Copy would).
//
// Also nil for a descriptor in blocking mode: the copy loop's raw system
// calls (see sysRead) are only safe on a non-blocking one. Every socket the
// net package makes is non-blocking, but the flag belongs to the open file,
// so os.File.Fd on a dup of the connection's descriptor turns it off for
// both; one fcntl per connection makes sure.
func newSocket(nc net.Conn) *socket {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	nonblocking := false
	if err := rc.Control(func(fd uintptr) {
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		nonblocking = err == nil && fl&unix.O_NONBLOCK != 0
	}); err != nil || !nonblocking {
		return nil
	}
	s := &socket{TCPConn: tc, rc: rc}
	s.writeFn = s.writeNow
	return s
}

// setNonblocking switches Read to the copy loop's mode (see socket).
func (s *socket) setNonblocking() {
	s.nonblocking = true
	s.readFn = s.readNow
	s.readPooledFn = s.readIntoPooled
}

// writeAll writes p whole, waiting on the poller while the socket is full;
// raw says how (see sysRead). One writer at a time: the direction that copies
// into this socket, and on a TLS side only under wmu.
func (s *socket) writeAll(p []byte, raw bool) error {
	s.wraw = raw
	for len(p) > 0 {
		s.wp = p
		err := s.rc.Write(s.writeFn)
		s.wp = nil
		if err != nil {
			return err
		}
		if s.werr != nil {
			return s.werr
		}
		p = p[s.wn:]
	}
	return nil
}

func (s *socket) writeNow(fd uintptr) bool {
	for {
		n, e := sysWrite(fd, s.wp, s.wraw)
		switch e {
		case 0:
			s.wn, s.werr = n, nil
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		s.wn, s.werr = 0, os.NewSyscallError("write", e)
		return true
	}
}

// Write is what the TLS stack writes: straight to the socket, or into the
// batch while the copy loop has one open.
//
// While kill closes the connection, a write that finds the socket taken
// gives up at once: what holds it is a write of the copy loop waiting for a
// peer that does not read (a connection idle for the whole idle timeout
// moved no byte, so nothing else can be writing), and the TLS stack's
// close_notify could only follow a record cut in the middle. Waiting would
// hold the kill for tls.Conn.Close's write deadline (5 s) before the
// sockets are closed.
func (s *socket) Write(p []byte) (int, error) {
	if !s.wmu.TryLock() {
		if s.closing.Load() {
			return 0, errWriteBlocked
		}
		s.wmu.Lock()
	}
	defer s.wmu.Unlock()
	if !s.batch {
		return s.TCPConn.Write(p)
	}
	if s.wbuf == nil {
		s.wbuf = s.wpool.Get().(*[]byte)
	}
	if len(*s.wbuf)+len(p) > cap(*s.wbuf) {
		if err := s.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > cap(*s.wbuf) {
			return s.TCPConn.Write(p)
		}
	}
	*s.wbuf = append(*s.wbuf, p...)
	return len(p), nil
}

// beginBatch collects the TLS stack's writes of n bytes of plaintext until
// endBatch. A batch larger than a copy buffer is a streaming direction's,
// written with an ordinary system call (see sysRead).
func (s *socket) beginBatch(n int) {
	s.wmu.Lock()
	s.batch = true
	s.wpool, s.batchRaw = &recordBatchPool, true
	if n > copyBufferSize {
		s.wpool, s.batchRaw = &bulkRecordBatchPool, false
	}
	s.wmu.Unlock()
}

// endBatch sends what was collected since beginBatch, in one write, and
// gives the batch buffer back.
func (s *socket) endBatch() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.batch = false
	err := s.flushLocked()
	if s.wbuf != nil {
		s.wpool.Put(s.wbuf)
		s.wbuf = nil
	}
	return err
}

func (s *socket) flushLocked() error {
	if s.wbuf == nil || len(*s.wbuf) == 0 {
		return nil
	}
	err := s.writeAll(*s.wbuf, s.batchRaw)
	*s.wbuf = (*s.wbuf)[:0]
	return err
}

// Read is what the TLS stack reads: blocking during the handshake, then in
// the copy loop's mode (see socket).
func (s *socket) Read(p []byte) (int, error) {
	if !s.nonblocking {
		return s.TCPConn.Read(p)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if s.drained && !s.waitOK {
		// The last read(2) left the socket empty: the TLS stack has read
		// every record at hand and wants more. The copy loop's next wait
		// asks the socket again.
		return 0, errWouldBlock
	}
	s.p = p
	err := s.rc.Read(s.readFn)
	s.p = nil
	if err = s.endWait(err); err != nil {
		return 0, err
	}
	return s.n, s.err
}

func (s *socket) readNow(fd uintptr) bool {
	s.n, s.err = readFD(fd, s.p, s.rawRead)
	s.drained = s.n < len(s.p)
	if s.err == syscall.EAGAIN {
		if s.waitOK {
			s.beginWait()
			return false
		}
		s.err = errWouldBlock
	}
	return true
}

// readPooled reads a plain TCP side: it returns a pooled buffer holding n
// bytes read (bp is the buffer the caller holds, nil for none, and the
// result is the one it holds after; a new one is of the bulk size if bulk).
// With wait, a socket with nothing to read is waited on without a buffer
// (errIdle when the grace is over); without, it answers errWouldBlock.
func (s *socket) readPooled(bp *[]byte, bulk, wait bool) (_ *[]byte, n int, err error) {
	s.bp, s.bulk, s.waitOK = bp, bulk, wait
	err = s.rc.Read(s.readPooledFn)
	s.waitOK = false
	if err = s.endWait(err); err != nil {
		return s.bp, 0, err
	}
	return s.bp, s.n, s.err
}

func (s *socket) readIntoPooled(fd uintptr) bool {
	if s.bp == nil {
		s.bp = getBuffer(s.bulk)
	}
	s.n, s.err = readFD(fd, *s.bp, !s.bulk)
	if s.err == syscall.EAGAIN {
		putBuffer(s.bp)
		s.bp = nil
		if s.waitOK {
			s.beginWait()
			return false
		}
		s.err = errWouldBlock
	}
	return true
}

// beginWait marks the read as waiting, so the grace sweeper may end it.
// It runs in the read's callback, before the poller parks the goroutine.
func (s *socket) beginWait() {
	if !s.waiting {
		s.waiting = true
		s.grace.begin()
	}
}

// endWait closes what beginWait opened, after the read returned err: a
// wait the sweeper ended (its deadline) is errIdle; the deadline is gone
// either way before anything reads the socket again.
func (s *socket) endWait(err error) error {
	if !s.waiting {
		return err
	}
	s.waiting = false
	ended := s.grace.end(s.TCPConn)
	if ended && errors.Is(err, os.ErrDeadlineExceeded) {
		return errIdle
	}
	return err
}

// readFD is one read(2), in net.Conn's terms: 0 bytes is io.EOF. raw says
// how (see sysRead).
func readFD(fd uintptr, p []byte, raw bool) (int, error) {
	for {
		n, e := sysRead(fd, p, raw)
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EAGAIN:
			return 0, e
		case e != 0:
			return 0, os.NewSyscallError("read", e)
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// sysRead and sysWrite are the copy loop's read(2) and write(2): raw system
// calls (syscall.RawSyscall, which does not tell the Go scheduler about
// them) while a direction carries request and response traffic, ordinary
// ones (syscall.Syscall) once it streams.
//
// Why: an ordinary system call enters the scheduler's syscall state, and
// the first one after the whole process was idle wakes the runtime's
// monitor thread (sysmon) from its deep sleep (a futex), which then polls
// every 20 µs or more until the process is idle again and sleeps once
// more. A sidecar carrying request/response traffic goes idle between
// every message, so each message paid a futex wake, the monitor's
// nanosleeps and two or three context switches more than the read and
// write themselves: measured through a pair, 2.3 futex and 2.0 nanosleep
// calls and ≈8.5 context switches per round trip, against 0.0, 0.0 and
// ≈4.8 with raw calls, and ≈150 against ≈90 µs of CPU per round trip
// (docs/performance.md). The calls are safe to make raw: the sockets are
// non-blocking, so a read or write returns at once (EAGAIN included), and
// the goroutine keeps its P for as long as a function call takes.
//
// What the monitor does besides is preempt goroutines that run for more
// than 10 ms and poll the network when every P is busy. A direction that
// streams might keep a P that long between waits, so streaming directions
// (those on bulk buffers) use ordinary calls, which keep the monitor awake
// as any busy Go program does; request/response traffic waits after every
// message, and the monitor wakes anyway at the next timer, GC or ordinary
// system call anywhere in the process (a handshake, the access log).
func sysRead(fd uintptr, p []byte, raw bool) (int, syscall.Errno) {
	return sysIO(syscall.SYS_READ, fd, p, raw)
}

func sysWrite(fd uintptr, p []byte, raw bool) (int, syscall.Errno) {
	return sysIO(syscall.SYS_WRITE, fd, p, raw)
}

// sysIO makes the read(2) or write(2) trap on p, raw or not (see sysRead).
func sysIO(trap, fd uintptr, p []byte, raw bool) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	call := syscall.Syscall
	if raw {
		call = syscall.RawSyscall
	}
	n, _, e := call(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(n), e
}
