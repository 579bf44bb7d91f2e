package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"
)

// Every workload of the trust domain may connect to the control plane, so
// everything one peer can make it hold or do is bounded; docs/security.md
// ("A hostile sidecar") adds the figures up.
const (
	// DefaultStreamsPerPeer is the default of Options.StreamsPerPeer. A
	// sidecar holds one stream on one connection, two while it reconnects
	// (the old connection lingers until keepalive notices it is gone); four
	// leaves room for a quick restart on top.
	DefaultStreamsPerPeer = 4

	// maxRequestBytes is gRPC's receive limit. The largest request a latch
	// sidecar sends is its endpoints request: about 15 bytes per outbound
	// EDS cluster on top of the node ID and a NACK, so 17 KB for 1,000
	// outbound listeners with a 2 KiB SPIFFE ID and a 1 KiB NACK. 128 KiB is
	// room for about 8,500 (TestLargestSidecarRequestFits).
	maxRequestBytes = 128 << 10

	// maxNACKBytes is how much of a NACK's error detail is kept and logged.
	// A latch sidecar sends one error naming the resource, the field path
	// and the reason; the longest of the validation matrix is 264 bytes.
	maxNACKBytes = 1 << 10

	// maxLoggedBytes bounds any other peer-supplied text in a log line or
	// an error: a node ID, a type URL, a version.
	maxLoggedBytes = 256

	// maxSubscriptionBytes bounds the resource names one delta stream is
	// subscribed to, summed over its requests: no more than one
	// state-of-the-world request could name.
	maxSubscriptionBytes = maxRequestBytes

	// maxHeaderBytes bounds a stream's HTTP/2 header list (its gRPC
	// metadata), which gRPC keeps for the life of the stream. A sidecar
	// sends about 200 bytes; gRPC's default is 16 MiB.
	maxHeaderBytes = 16 << 10

	// windowBytes is the HTTP/2 flow-control window of each stream and
	// connection, so what a peer can make the server buffer unread. Setting
	// it turns off gRPC's bandwidth-delay estimation, which would grow the
	// windows towards 16 MiB; xDS requests are small and rare.
	windowBytes = 64 << 10

	// handshakeTimeout ends a connection that has not finished TLS by then
	// (gRPC's default is 120 s).
	handshakeTimeout = 10 * time.Second

	// maxHandshakes is how many TLS handshakes run at once. A handshake is
	// CPU work (key exchange, two signatures, a chain to verify: about a
	// millisecond), and when every sidecar reconnects at once — a control
	// plane restarted, a replica failed over — thousands arrive together.
	// Run all at once, they share the CPU until each takes longer than
	// handshakeTimeout: nearly all fail, are retried, and the storm feeds
	// itself. Admitted this many at a time, oldest first, each finishes in
	// milliseconds while the rest wait their turn (within handshakeTimeout)
	// without costing anything. Handshakes wait on the client too (round
	// trips, its own signatures), so there are more slots than cores.
	maxHandshakes = 64

	// handshakeSlotHold is how long one handshake keeps its slot. A peer
	// that stalls mid-handshake keeps its connection until handshakeTimeout
	// but gives the slot back after this: stalled handshakes can delay
	// others by this much, never stop them.
	handshakeSlotHold = time.Second

	// idleTimeout closes a connection that has carried no stream for that
	// long: a sidecar always holds one, and waits at most 30 s between
	// attempts.
	idleTimeout = 2 * time.Minute

	// maxListedNACKs caps the distinct NACKs LastNACK reports for one node
	// (replicas of a workload share its node ID).
	maxListedNACKs = 8
)

// Lines a peer can cause at will (NACKs, refusals, streams opening and
// closing) pass through one limiter: a burst of logBurst, then logRate a
// second. The metrics still count every event.
const (
	logBurst = 100
	logRate  = 10
)

// peerKey names one workload instance: the SPIFFE ID it proved and the IP
// address it connects from. Replicas share a SPIFFE ID (a Kubernetes service
// account's) but not a pod IP, so each gets its own allowance.
type peerKey struct {
	id   string
	addr string
}

func (k peerKey) String() string { return k.id + " from " + k.addr }

// peerUse is what one workload instance holds now.
type peerUse struct {
	// key is the map's key for the peer, whose strings its streams share
	// instead of each keeping copies of its own.
	key            peerKey
	conns, streams int
}

// hostOf is the IP of a peer address, without the port.
func hostOf(a net.Addr) string {
	if a == nil {
		return ""
	}
	if t, ok := a.(*net.TCPAddr); ok {
		return t.IP.String()
	}
	if h, _, err := net.SplitHostPort(a.String()); err == nil {
		return h
	}
	return a.String()
}

// idFromAuth returns the SPIFFE ID of the verified client certificate.
func idFromAuth(auth credentials.AuthInfo) (spiffeid.ID, error) {
	info, ok := auth.(credentials.TLSInfo)
	if !ok {
		return spiffeid.ID{}, errors.New("stream is not over TLS")
	}
	if !info.State.HandshakeComplete || len(info.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	return x509svid.IDFromCert(info.State.PeerCertificates[0])
}

// acquire counts one more connection (streams false) or stream of k, unless
// k already holds the limit. Called with s.mu held.
func (s *Server) acquire(k peerKey, stream bool) bool {
	u := s.peers[k]
	if u == nil {
		u = &peerUse{key: k}
		s.peers[k] = u
	}
	n := &u.conns
	if stream {
		n = &u.streams
	}
	if *n >= s.streamsPerPeer {
		if u.conns == 0 && u.streams == 0 {
			delete(s.peers, k)
		}
		return false
	}
	*n++
	return true
}

// release undoes acquire. Called with s.mu held.
func (s *Server) release(k peerKey, stream bool) {
	u := s.peers[k]
	if u == nil {
		return
	}
	if stream {
		u.streams--
	} else {
		u.conns--
	}
	if u.conns <= 0 && u.streams <= 0 {
		delete(s.peers, k)
	}
}

// peerCreds are the server's TLS credentials with a limit on the
// connections of each workload instance: a connection without a stream still
// costs the server buffers and goroutines, and a peer could otherwise open
// them by the thousand. The limit is Options.StreamsPerPeer, since a sidecar
// holds one stream per connection.
type peerCreds struct {
	credentials.TransportCredentials
	s *Server
}

func (c peerCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	// gRPC's deadline on raw (handshakeTimeout) runs from before this: the
	// wait and the handshake share it.
	release, ok := c.s.handshakes.enter(hostOf(raw.RemoteAddr()))
	if !ok {
		raw.Close()
		c.s.metrics.refused("handshake_wait")
		c.s.logPeer(slog.LevelWarn, "xds connection refused", "remote_addr", hostOf(raw.RemoteAddr()),
			"reason", "no TLS handshake slot within the handshake timeout: too many connections at once", "limit", c.s.handshakes.size)
		return nil, nil, fmt.Errorf("latch control plane: no handshake slot within %v (%d handshakes at a time)", c.s.handshakes.wait, c.s.handshakes.size)
	}
	conn, auth, err := c.TransportCredentials.ServerHandshake(raw)
	release()
	if err != nil {
		return nil, nil, err
	}
	id, err := idFromAuth(auth)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("latch control plane: %w", err)
	}
	k := peerKey{id: id.String(), addr: hostOf(raw.RemoteAddr())}
	c.s.mu.Lock()
	ok = c.s.acquire(k, false)
	c.s.mu.Unlock()
	if !ok {
		conn.Close()
		c.s.metrics.refused("connection_limit")
		c.s.logPeer(slog.LevelWarn, "xds connection refused", "peer_id", k.id, "remote_addr", k.addr,
			"reason", "connection limit", "limit", c.s.streamsPerPeer)
		return nil, nil, fmt.Errorf("latch control plane: %s already holds %d connections (the limit per workload instance)", k, c.s.streamsPerPeer)
	}
	pc := &peerConn{Conn: conn}
	pc.release = sync.OnceFunc(func() {
		c.s.mu.Lock()
		c.s.release(k, false)
		c.s.mu.Unlock()
	})
	return pc, auth, nil
}

func (c peerCreds) Clone() credentials.TransportCredentials {
	return peerCreds{c.TransportCredentials.Clone(), c.s}
}

// handshakeGate admits TLS handshakes a few at a time. Waiting
// connections are admitted in turn between source addresses, and in arrival
// order from each: a host that opens connections by the hundred and stalls
// them (no certificate needed, this is before TLS) gets one slot in turn
// like any other, instead of queueing every other host's handshakes behind
// all of its own. In a reconnect storm each sidecar comes from an address of
// its own, so the order is the arrival order.
type handshakeGate struct {
	size       int
	hold, wait time.Duration

	mu   sync.Mutex
	free int // slots neither held nor handed to a waiter
	// queues are the waiting connections by source address, each a channel
	// closed when it is handed a slot; order is the addresses with waiting
	// connections, the next to be served first.
	queues map[string][]chan struct{}
	order  []string
	n      int // waiting connections
}

func newHandshakeGate(n int, hold, wait time.Duration) *handshakeGate {
	return &handshakeGate{size: n, hold: hold, wait: wait, free: n, queues: map[string][]chan struct{}{}}
}

// enter waits for a slot for a connection from addr, up to the gate's wait,
// and returns the function that gives it back; the slot is given back after
// the gate's hold time in any case.
func (g *handshakeGate) enter(addr string) (release func(), ok bool) {
	g.mu.Lock()
	if g.free > 0 {
		// Nobody waits while a slot is free: give hands slots over.
		g.free--
		g.mu.Unlock()
		return g.held(), true
	}
	turn := make(chan struct{})
	if len(g.queues[addr]) == 0 {
		g.order = append(g.order, addr)
	}
	g.queues[addr] = append(g.queues[addr], turn)
	g.n++
	g.mu.Unlock()

	t := time.NewTimer(g.wait)
	defer t.Stop()
	select {
	case <-turn:
		return g.held(), true
	case <-t.C:
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-turn: // handed a slot as the wait ran out: take it
		return g.held(), true
	default:
	}
	q := g.queues[addr]
	if i := slices.Index(q, turn); i >= 0 {
		q = slices.Delete(q, i, i+1)
		g.n--
	}
	if len(q) > 0 {
		g.queues[addr] = q
	} else {
		delete(g.queues, addr)
		g.order = slices.DeleteFunc(g.order, func(a string) bool { return a == addr })
	}
	return nil, false
}

// held returns the release function of a slot just taken.
func (g *handshakeGate) held() func() {
	give := sync.OnceFunc(g.give)
	hold := time.AfterFunc(g.hold, give)
	return func() { hold.Stop(); give() }
}

// give hands a slot to the first waiting connection of the next address in
// turn (which then goes to the back of the turn), or frees it.
func (g *handshakeGate) give() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.order) == 0 {
		g.free++
		return
	}
	addr := g.order[0]
	g.order = g.order[1:]
	q := g.queues[addr]
	close(q[0])
	g.n--
	if q = q[1:]; len(q) > 0 {
		g.queues[addr] = q
		g.order = append(g.order, addr)
	} else {
		delete(g.queues, addr)
	}
}

// waiting is the number of connections waiting for a slot.
func (g *handshakeGate) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}

// peerConn gives its peer's connection slot back when gRPC closes it.
type peerConn struct {
	net.Conn
	release func()
}

func (c *peerConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// clip returns s as valid UTF-8 of at most n bytes; text cut short ends with
// how long it was. Peer-supplied text goes through it before it is kept,
// logged or put in an error.
func clip(s string, n int) string {
	if len(s) <= n {
		return strings.ToValidUTF8(s, "?")
	}
	mark := fmt.Sprintf("…[%d bytes]", len(s))
	cut := max(n-len(mark), 0)
	// Back up to the start of a rune (at most 3 bytes), so the cut does not
	// leave half a character; invalid bytes are replaced below anyway.
	for i := 0; i < 3 && cut > 0 && !utf8.RuneStart(s[cut]); i++ {
		cut--
	}
	return strings.ToValidUTF8(s[:cut], "?") + mark
}

// logLimiter is a token bucket for log lines: a burst, then a steady rate.
// It counts the lines it held back, and the next line it lets through says
// how many.
type logLimiter struct {
	mu         sync.Mutex
	tokens     float64
	last       time.Time
	suppressed int
}

func (l *logLimiter) allow(now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last.IsZero() {
		l.tokens = logBurst
	} else {
		l.tokens = min(logBurst, l.tokens+now.Sub(l.last).Seconds()*logRate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}
