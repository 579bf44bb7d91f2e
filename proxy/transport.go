package proxy

import (
	"crypto/tls"
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
//   - eof: the TCP stream itself ended (a read returned io.EOF, the peer's
//     FIN). tls.Conn.Read returns io.EOF in two cases it does not tell
//     apart: after the peer's close_notify alert, and when the TCP stream
//     ends on a record boundary without one (crypto/tls accepts that, see
//     readRecordOrCCS). After close_notify it never reads the connection
//     again, so an io.EOF from the tls.Conn with eof set is a stream that
//     ended without close_notify: cut short, by the peer or by whoever can
//     inject a FIN on the path (see copyHalf). In TLS 1.3 the alert is
//     encrypted, so the raw bytes cannot tell; this can.
//
// Reads happen on one goroutine at a time (the handshake's, then the one of
// the direction that reads this side), which also reads the flags after a
// read returned.
type transport struct {
	net.Conn
	received bool
	eof      bool
}

func (t *transport) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	if n > 0 {
		t.received = true
	}
	if err == io.EOF {
		t.eof = true
	}
	return n, err
}

// transportOf returns the transport under a tls.Conn of the data plane, nil
// for a plain side.
func transportOf(rw net.Conn) *transport {
	if tc, ok := rw.(*tls.Conn); ok {
		tr, _ := tc.NetConn().(*transport)
		return tr
	}
	return nil
}

// closedSilently says whether err, from a handshake over t, is the peer
// closing (FIN or RST) before it sent a single byte.
func (t *transport) closedSilently(err error) bool {
	return !t.received && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET))
}
