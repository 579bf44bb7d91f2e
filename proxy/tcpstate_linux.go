package proxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// tcpClose is TCP_CLOSE in Linux's include/net/tcp_states.h.
const tcpClose = 7

// wasReset reports whether the TCP connection under s, whose reader just
// saw the end of the stream, was in fact reset (or timed out).
//
// Linux reports a reset (ECONNRESET) to one system call only. When the
// other copy direction's write on the same socket takes it, this
// direction's read returns 0 bytes, exactly as after a FIN, and passing that
// on as a half-close would hand the other end a clean end of a truncated
// stream. The socket's state tells the two apart: after the peer's FIN it is
// CLOSE_WAIT, after a reset or a timeout CLOSE. CLOSE is also where a socket
// lands once both FINs were exchanged (Linux hands that end to a TIME_WAIT
// socket), but only after the proxy half-closed it, which s.shut records
// before the shutdown: the state is read first, the flag second, so a CLOSE
// reached that way is always seen with the flag set. Once the proxy
// half-closed a socket nothing writes to it any more, and a reset after that
// reaches the reader as ECONNRESET itself. One getsockopt per stream end,
// never per read.
func wasReset(s *side) bool {
	tc, ok := s.raw.(*net.TCPConn)
	if !ok {
		return false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return true // closed under us: kill is ending the connection
	}
	var state uint8
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var info *unix.TCPInfo
		if info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); serr == nil {
			state = info.State
		}
	}); err != nil || serr != nil {
		return true // closed under us: kill is ending the connection
	}
	return state == tcpClose && !s.shut.Load()
}
