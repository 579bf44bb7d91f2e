package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"unsafe"
)

// parker holds the directions of idle connections with no goroutine at all.
//
// A direction that found its source empty first waits on the runtime's
// poller for parkAfter (a connection in use hardly ever waits that long;
// see grace for how the wait is ended). After that its socket is registered
// here, one-shot and level-triggered,
// and its goroutine returns: an idle connection then costs its sockets and
// TLS state, not two goroutine stacks (≈8 KB per connection and sidecar).
// When the socket turns readable (data, FIN, RST) the loop starts the
// direction again on a fresh goroutine; when the connection is killed
// (idle timeout, revocation, drain, the other direction's failure) kill
// does the same, and the direction's next read fails on the closed socket.
//
// The registration is made inside syscall.RawConn.Control, which holds the
// descriptor open, under mu, and only if the connection is not killed yet:
// kill marks the connection first, closes the sockets (Close waits for a
// Control in progress), then takes the parked directions out under mu. So
// a direction is either parked and resumed by exactly one of the loop and
// kill, or not parked at all. A closed descriptor leaves the epoll set by
// itself; tokens are never reused, so a late event for one finds nothing.
type parker struct {
	log *slog.Logger

	mu      sync.Mutex
	started bool
	closed  bool
	epfd    int
	wakefd  int // eventfd: close's way to end the loop
	next    uint64
	parked  map[uint64]*side // by token: the source side of a parked direction
	done    chan struct{}
}

const (
	wakeToken   = 0 // the eventfd's; direction tokens start at 1
	parkEvents  = syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT
	waitBatch   = 128
	epollFlags  = syscall.EPOLL_CLOEXEC
	eventfdFlag = 0x80000 | 0x800 // EFD_CLOEXEC | EFD_NONBLOCK
)

// park registers src's socket and reports true: the caller's goroutine
// must then return without touching the connection. false means not parked
// (the connection is being killed, the socket is closed, the parker is closed
// or could not start); the caller goes on with its loop, whose next read
// reports what happened.
func (p *parker) park(src *side) bool {
	s := src.sock
	if s == nil || !p.start() {
		return false
	}
	parked := false
	err := s.rc.Control(func(fd uintptr) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.closed || src.c.killed() {
			return
		}
		p.next++
		tok := p.next
		ev := syscall.EpollEvent{Events: parkEvents}
		setToken(&ev, tok)
		op := syscall.EPOLL_CTL_MOD
		if !src.registered {
			op = syscall.EPOLL_CTL_ADD
		}
		if err := syscall.EpollCtl(p.epfd, op, int(fd), &ev); err != nil {
			p.log.Warn("parking an idle connection failed; it keeps its goroutine", "error", err)
			return
		}
		src.registered = true
		src.token = tok
		p.parked[tok] = src
		parked = true
	})
	return err == nil && parked
}

// wake resumes c's parked directions; kill calls it after closing c's
// sockets.
func (p *parker) wake(c *conn) {
	var resume []*side
	p.mu.Lock()
	for i := range c.sides {
		s := &c.sides[i]
		if s.token == 0 {
			continue
		}
		if p.takeLocked(s.token) == s {
			resume = append(resume, s)
		}
		s.token = 0
	}
	p.mu.Unlock()
	for _, s := range resume {
		go s.run()
	}
}

// takeLocked takes the direction parked under tok out of the parker (nil if
// none is) and returns its side; under mu.
func (p *parker) takeLocked(tok uint64) *side {
	s := p.parked[tok]
	delete(p.parked, tok)
	if s != nil {
		s.token = 0
	}
	return s
}

// count reports how many directions are parked.
func (p *parker) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.parked)
}

// start opens the epoll set and starts the loop on first use.
func (p *parker) start() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.closed {
		return p.started && !p.closed
	}
	if err := p.open(); err != nil {
		// Not fatal: directions then wait on their goroutines, as before.
		p.log.Warn("idle connections keep their goroutines", "error", err)
		p.closed = true
		return false
	}
	p.started = true
	p.parked = make(map[uint64]*side)
	p.done = make(chan struct{})
	go p.loop()
	return true
}

func (p *parker) open() error {
	epfd, err := syscall.EpollCreate1(epollFlags)
	if err != nil {
		return fmt.Errorf("creating the epoll set for idle connections: %w", err)
	}
	wakefd, _, errno := syscall.Syscall(syscall.SYS_EVENTFD2, 0, eventfdFlag, 0)
	if errno != 0 {
		syscall.Close(epfd)
		return fmt.Errorf("creating the parker's eventfd: %w", errno)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN}
	setToken(&ev, wakeToken)
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, int(wakefd), &ev); err != nil {
		syscall.Close(epfd)
		syscall.Close(int(wakefd))
		return fmt.Errorf("registering the parker's eventfd: %w", err)
	}
	p.epfd, p.wakefd = epfd, int(wakefd)
	return nil
}

// loop waits for parked sockets to turn readable and starts their
// directions again. It blocks an OS thread in epoll_wait, one per Server.
func (p *parker) loop() {
	defer close(p.done)
	events := make([]syscall.EpollEvent, waitBatch)
	for {
		n, err := syscall.EpollWait(p.epfd, events, -1)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			// Cannot happen with a valid epfd; fail safe: everything
			// parked resumes and finds out for itself.
			p.log.Error("waiting for idle connections failed; resuming all", "error", err)
			p.resumeAll()
			return
		}
		for i := range events[:n] {
			tok := token(&events[i])
			if tok == wakeToken {
				return
			}
			p.mu.Lock()
			s := p.takeLocked(tok)
			p.mu.Unlock()
			if s != nil {
				go s.run()
			}
		}
	}
}

// resumeAll takes every parked direction out and starts it; used when the
// loop cannot go on, and by close.
func (p *parker) resumeAll() {
	p.mu.Lock()
	p.closed = true
	all := p.parked
	p.parked = map[uint64]*side{}
	for _, s := range all {
		s.token = 0
	}
	p.mu.Unlock()
	for _, s := range all {
		go s.run()
	}
}

// close ends the loop and releases the epoll set. The Server calls it once
// every connection has ended, so nothing is parked by then; anything that
// still is resumes.
func (p *parker) close() {
	p.mu.Lock()
	started := p.started && !p.closed
	p.closed = true
	p.mu.Unlock()
	if !started {
		return
	}
	one := uint64(1)
	syscall.Write(p.wakefd, (*[8]byte)(unsafe.Pointer(&one))[:])
	<-p.done
	p.resumeAll()
	syscall.Close(p.epfd)
	syscall.Close(p.wakefd)
}

// The 64-bit epoll_data is Fd and Pad in syscall.EpollEvent on every Linux
// architecture (their offset differs, their order does not).
func setToken(ev *syscall.EpollEvent, tok uint64) {
	ev.Fd = int32(uint32(tok))
	ev.Pad = int32(uint32(tok >> 32))
}

func token(ev *syscall.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}
