package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// socket is the TCP connection under one side of a pipe, read without
// blocking so that a direction waiting for data holds no copy buffer, and
// after a while no goroutine either: an idle connection then costs its
// sockets and TLS state, not 64 KiB of buffers (two pooled 32 KiB buffers,
// one per direction, were held across every blocking Read before) nor two
// goroutine stacks.
//
// A read never blocks: on EAGAIN it answers errWouldBlock, and the copy loop
// gives its buffer back and waits (waitFor) on the runtime poller, through
// syscall.RawConn.Read with a 1-byte MSG_PEEK as the readiness test, for at
// most parkAfter; then the parker takes the direction over (see parker).
//
//   - A plain TCP side is read with readPooled: the callback takes a pooled
//     buffer, reads into it, and hands it back to the pool on EAGAIN. In a
//     steady stream the buffer is kept from read to read.
//   - Under a *tls.Conn the socket is the net.Conn the TLS stack reads.
//     Waiting for the raw socket to be readable is only safe while the TLS
//     stack holds no buffered input (it reads ahead: a complete record may
//     sit in its buffer while the socket is empty, and waiting then would
//     never end). So it is the TLS stack that tells: errWouldBlock is a
//     temporary net.Error — what a read deadline that has passed looks like,
//     which crypto/tls returns without breaking the connection (the net.Conn
//     contract lets a Read resume after a timeout) — and tls.Conn.Read only
//     reads the socket when it has nothing decrypted left to give, so
//     errWouldBlock coming out of it means there is nothing buffered.
//
// Writes, the handshake (before setNonblocking) and Close go straight to
// the *net.TCPConn. One reader at a time: the callbacks' state lives in the
// struct, and the callbacks are bound once, so a read allocates nothing.
type socket struct {
	*net.TCPConn
	rc          syscall.RawConn
	nonblocking bool // set once, before the copy goroutines start

	// callback state
	p     []byte
	bp    *[]byte
	bulk  bool
	n     int
	err   error
	woken bool
	peek  [1]byte

	readFn, readPooledFn, waitFn func(fd uintptr) bool

	// Writes of the TLS stack, batched by the copy loop (beginBatch,
	// endBatch) so that the records of one tls.Conn.Write leave in one
	// system call. wmu orders them with anything the TLS stack writes from
	// the other direction meanwhile (its answer to a KeyUpdate).
	wmu   sync.Mutex
	batch bool
	wpool *sync.Pool // where wbuf comes from: the pool of the batch's size
	wbuf  *[]byte
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
func newSocket(nc net.Conn) *socket {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return &socket{TCPConn: tc, rc: rc}
}

// setNonblocking switches Read to the copy loop's mode (see socket).
func (s *socket) setNonblocking() {
	s.nonblocking = true
	s.readFn = s.readNow
	s.waitFn = s.waitReadable
}

// Write is what the TLS stack writes: straight to the socket, or into the
// batch while the copy loop has one open.
func (s *socket) Write(p []byte) (int, error) {
	s.wmu.Lock()
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
// endBatch.
func (s *socket) beginBatch(n int) {
	s.wmu.Lock()
	s.batch = true
	s.wpool = &recordBatchPool
	if n > copyBufferSize {
		s.wpool = &bulkRecordBatchPool
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
	_, err := s.TCPConn.Write(*s.wbuf)
	*s.wbuf = (*s.wbuf)[:0]
	return err
}

// Read is what the TLS stack reads: blocking during the handshake, then
// never blocking (errWouldBlock).
func (s *socket) Read(p []byte) (int, error) {
	if !s.nonblocking {
		return s.TCPConn.Read(p)
	}
	if len(p) == 0 {
		return 0, nil
	}
	s.p = p
	err := s.rc.Read(s.readFn)
	s.p = nil
	if err != nil {
		return 0, err
	}
	return s.n, s.err
}

func (s *socket) readNow(fd uintptr) bool {
	s.n, s.err = readFD(fd, s.p)
	if s.err == syscall.EAGAIN {
		s.err = errWouldBlock
	}
	return true
}

// waitFor parks until the socket is readable (data, end of stream or
// error) or d has passed, without holding a buffer: ready is false when d
// passed. Only after a read answered errWouldBlock (for a TLS side: its
// tls.Conn did, so it holds no input).
func (s *socket) waitFor(d time.Duration) (ready bool, err error) {
	s.woken = false
	s.TCPConn.SetReadDeadline(time.Now().Add(d))
	err = s.rc.Read(s.waitFn)
	s.TCPConn.SetReadDeadline(time.Time{})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil
	}
	return err == nil, err
}

func (s *socket) waitReadable(fd uintptr) bool {
	if s.woken {
		// The poller woke us: readable. Whatever is there (data, EOF, an
		// error) the TLS read that follows will see; a spurious wake-up
		// costs one more errWouldBlock.
		return true
	}
	s.woken = true
	for {
		_, _, e := syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&s.peek[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		return true
	}
}

// readPooled reads a plain TCP side: it returns a pooled buffer holding n
// bytes read (bp is the buffer the caller holds, nil for none, and the
// result is the one it holds after; a new one is of the bulk size if bulk).
// While it waits, no buffer is held.
func (s *socket) readPooled(bp *[]byte, bulk bool) (_ *[]byte, n int, err error) {
	if s.readPooledFn == nil {
		s.readPooledFn = s.readIntoPooled
	}
	s.bp, s.bulk = bp, bulk
	if err := s.rc.Read(s.readPooledFn); err != nil {
		return s.bp, 0, err
	}
	return s.bp, s.n, s.err
}

func (s *socket) readIntoPooled(fd uintptr) bool {
	if s.bp == nil {
		s.bp = getBuffer(s.bulk)
	}
	s.n, s.err = readFD(fd, *s.bp)
	if s.err == syscall.EAGAIN {
		putBuffer(s.bp)
		s.bp = nil
		s.err = errWouldBlock
	}
	return true
}

// readFD is one read(2), in net.Conn's terms: 0 bytes is io.EOF.
func readFD(fd uintptr, p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(fd), p)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return 0, err
		case err != nil:
			return 0, os.NewSyscallError("read", err)
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}
