//go:build !linux

package proxy

import (
	"net"
	"sync/atomic"
)

// socket is only implemented on Linux (see socket_linux.go). Elsewhere
// newSocket returns nil and the copy loop blocks in Read holding its
// buffer, as io.Copy would.
type socket struct {
	net.Conn
	waitOK, drained, rawRead bool
	grace                    struct{ sw *graceSweeper }
	closing                  atomic.Bool
}

func newSocket(net.Conn) *socket { return nil }

func (s *socket) setNonblocking() {}

func (s *socket) readPooled(bp *[]byte, _, _ bool) (*[]byte, int, error) { return bp, 0, nil }

func (s *socket) beginBatch(int) {}

func (s *socket) endBatch() error { return nil }

func (s *socket) writeAll([]byte, bool) error { return nil }
