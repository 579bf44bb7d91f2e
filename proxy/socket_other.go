//go:build !linux

package proxy

import (
	"net"
	"time"
)

// socket is only implemented on Linux (see socket_linux.go). Elsewhere
// newSocket returns nil and the copy loop blocks in Read holding its
// buffer, as io.Copy would.
type socket struct{ net.Conn }

func newSocket(net.Conn) *socket { return nil }

func (s *socket) setNonblocking() {}

func (s *socket) waitFor(time.Duration) (bool, error) { return true, nil }

func (s *socket) readPooled(bp *[]byte, _ bool) (*[]byte, int, error) { return bp, 0, nil }

func (s *socket) beginBatch(int) {}

func (s *socket) endBatch() error { return nil }
