package proxy

import (
	"errors"
	"io"
	"net"
	"syscall"
)

// transport is the connection a tls.Conn of the data plane reads and writes
// (the socket, or the TCP connection where there is none). It notes what the
// raw stream did that crypto/tls does not tell its caller:
//
//   - received: the peer sent at least one byte. A handshake that fails
//     because the peer closed before its first byte never met a TLS client:
//     it was a TCP connect and close, as kubelet TCP probes, load-balancer
//     health checks and port scanners do (see conn.refused).
//
// Reads happen on one goroutine at a time (the handshake's, then the one of
// the direction that reads this side), which also reads the flags after a
// read returned.
type transport struct {
	net.Conn
	received bool
}

func (t *transport) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	if n > 0 {
		t.received = true
	}
	return n, err
}

// closedSilently says whether err, from a handshake over t, is the peer
// closing (FIN or RST) before it sent a single byte.
func (t *transport) closedSilently(err error) bool {
	return !t.received && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET))
}
