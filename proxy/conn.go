package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// Close reasons: the "reason" of the access log and the label of
// latch_connections_closed_total.
const (
	reasonEOF                 = "eof"                  // both sides closed cleanly
	reasonIdleTimeout         = "idle_timeout"         // no byte either way for the idle timeout
	reasonPolicyRevoked       = "policy_revoked"       // the new allow-list, or federation list, no longer allows the peer
	reasonTrustRevoked        = "trust_revoked"        // the federated bundle of the peer's trust domain was removed or is refused
	reasonServerIDChanged     = "server_id_changed"    // the outbound listener now expects another server
	reasonUpstreamReset       = "upstream_reset"       // the dialed side (app or upstream) failed mid-stream
	reasonDownstreamReset     = "downstream_reset"     // the accepting side (peer or app) failed mid-stream
	reasonTruncated           = "truncated"            // the TLS side's stream ended without close_notify
	reasonDrain               = "drain"                // closed by Shutdown or after a listener's removal
	reasonHandshakeFailed     = "handshake_failed"     // refused or failed TLS handshake
	reasonUpstreamUnreachable = "upstream_unreachable" // could not connect to the app or any upstream
)

// conn is one accepted connection, from Accept to the access-log line.
//
// Naming: the downstream is the accepted connection (the peer sidecar for
// inbound, the local app for outbound); the upstream is the one the proxy
// dials (the app for inbound, the upstream sidecar for outbound).
type conn struct {
	l     *listener
	start time.Time
	// down and up are the raw TCP connections, kept to close (or reset)
	// them from other goroutines without going through TLS.
	down net.Conn
	ctx  context.Context // cancelled by kill: aborts dials
	stop context.CancelFunc

	// peer is the verified SPIFFE ID of the other sidecar, set after the
	// handshake. serverID is what an outbound connection expects of its
	// upstream, set before the handshake. Apply's revocation reads them.
	peer     atomic.Pointer[spiffeid.ID]
	serverID atomic.Pointer[spiffeid.ID]
	// reason is the first close reason decided; later ones are ignored.
	reason atomic.Pointer[string]
	// last is the time of the last byte read either way, as nanoseconds
	// since start (monotonic).
	last atomic.Int64

	// sides are the two ends of the pipe once it runs (downstream,
	// upstream). piped says the pipe took the connection over; pending
	// counts its directions still running.
	sides   [2]side
	piped   bool
	pending atomic.Int32

	mu        sync.Mutex
	up        net.Conn
	tls       *tls.Conn // the TLS side, once its handshake completed
	tlsSock   *socket   // the socket under tls (nil: none)
	idleTimer *time.Timer

	// tr is what the TLS side's tls.Conn reads: the peer's connection
	// (inbound) or the upstream's (outbound), nil before it is made.
	tr *transport

	remoteAddr string // the peer sidecar's address
	appAddr    string // the local app's address
	// What the handshake negotiated (zero before it completed); the TLS
	// version, cipher suite and key exchange group of the access log, so
	// that operators see which connections still use a classical group.
	resumed  bool
	version  uint16
	cipher   uint16
	group    tls.CurveID
	bytesIn  atomic.Int64
	bytesOut atomic.Int64
	// class is the handshake failure class of a connection whose pipe
	// ended because the upstream refused this sidecar's certificate after
	// the handshake (TLS 1.3, see clientRefused); under mu.
	class identity.Class
}

func newConn(l *listener, raw net.Conn) *conn {
	ctx, stop := context.WithCancel(context.Background())
	return &conn{l: l, start: time.Now(), down: raw, ctx: ctx, stop: stop}
}

func (c *conn) log() *slog.Logger { return c.l.s.log }

// resets says whether a connection ended for reason is reset (RST on both
// TCP connections, no close_notify on the TLS side) rather than closed (FIN).
//
// Every end that cuts a stream the two sides did not finish resets: a
// failure on either side, a policy change that revokes the peer or the
// server, and a drain that ran out of time. A FIN there would hand the
// other end a clean end of stream — with Go's TLS even without
// close_notify, as long as the cut falls on a record boundary — and it would
// take a truncated stream for a complete one.
//
// A TLS stream that ends without close_notify (truncated) is such a failure
// too: the end of the TCP stream proves nothing about the end of the TLS
// stream, anybody on the path can inject a FIN.
//
// The idle timeout closes: no byte moved either way for the whole timeout,
// so nothing is in flight and no stream is cut in the middle; it is the
// normal end of a connection nobody uses, and a FIN lets a pooled client
// connection notice it quietly. A refused handshake or an unreachable app
// or upstream closes too: no byte of the stream was forwarded yet. Such an
// end sends close_notify first on a TLS side whose handshake completed, so
// a latch peer takes it for the normal end it is, not for a truncation.
func resets(reason string) bool {
	switch reason {
	case reasonUpstreamReset, reasonDownstreamReset, reasonTruncated, reasonPolicyRevoked, reasonTrustRevoked, reasonServerIDChanged, reasonDrain:
		return true
	}
	return false
}

// kill ends the connection for reason from any goroutine, with an RST on
// both sides when resets(reason) (SO_LINGER 0 before Close), else
// close_notify on the TLS side and a FIN.
func (c *conn) kill(reason string) {
	if !c.reason.CompareAndSwap(nil, &reason) {
		return
	}
	c.stop()
	c.mu.Lock()
	up, tc, ts := c.up, c.tls, c.tlsSock
	c.mu.Unlock()
	reset := resets(reason)
	if !reset && tc != nil {
		// Close sends close_notify (under a write deadline of its own, and
		// not at all while a Write is in flight) and closes the socket.
		// The copy loop's writes towards TLS leave after tls.Conn.Write
		// has returned (see socket.endBatch), so Close cannot tell one is
		// in flight: closing tells the socket not to wait behind it.
		if ts != nil {
			ts.closing.Store(true)
		}
		tc.Close()
	}
	for _, nc := range []net.Conn{c.down, up} {
		if nc == nil {
			continue
		}
		if reset {
			setLinger0(nc)
		}
		nc.Close()
	}
	// After the sockets are closed: a direction parked before the kill is
	// started again and ends on its next read; one about to park sees
	// killed() and does not (see parker).
	c.l.s.parker.wake(c)
}

func (c *conn) killed() bool { return c.reason.Load() != nil }

// setUp records the dialed connection, unless the connection was killed in
// the meantime (then it closes it and returns false).
func (c *conn) setUp(up net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.killed() {
		up.Close()
		return false
	}
	c.up = up
	return true
}

// setTLS records the TLS side once its handshake completed and its peer is
// authorized, unless the connection was killed in the meantime.
func (c *conn) setTLS(tc *tls.Conn, sock *socket) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.killed() {
		return false
	}
	c.tls, c.tlsSock = tc, sock
	return true
}

func setLinger0(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
}

// serve runs the connection up to its pipe. When it returns, either the
// connection has ended (c.piped is false) or its pipe runs on goroutines of
// its own, the last of which ends it (c.end).
func (c *conn) serve() {
	// The context only bounds the dials and the handshake: cancelling it as
	// soon as the pipe runs frees what they hung on it.
	defer c.stop()
	r := c.l.s.route(c.l.name, c.l.dir)
	if r == nil {
		// The listener was removed between Accept and now.
		c.kill(reasonDrain)
		c.finish()
		return
	}
	if c.l.dir == DirectionInbound {
		c.serveInbound(r)
	} else {
		c.serveOutbound(r)
	}
}

// serveInbound: handshake (the tls.Config verifies and authorizes the peer),
// re-check the peer against the current snapshot, and only then dial the app.
// Nothing the peer sends is read into the app before that.
func (c *conn) serveInbound(r *route) {
	c.remoteAddr = c.down.RemoteAddr().String()
	c.appAddr = r.in.App
	downSock := newSocket(c.down)
	c.tr = &transport{Conn: orConn(downSock, c.down)}
	tc := tls.Server(c.tr, r.tls)
	if err := c.handshake(tc, c.down, r); err != nil {
		c.handshakeFailed(err)
		return
	}
	peer, err := identity.PeerID(tc.ConnectionState())
	if err != nil {
		c.refused(err)
		return
	}
	c.peer.Store(&peer)
	if err := c.authorized(); err != nil {
		c.refused(err)
		return
	}
	if !c.setTLS(tc, downSock) {
		c.finish()
		return
	}
	// The app, and whether it takes a PROXY protocol header, are the
	// current snapshot's: an Apply during the handshake must not send a
	// header to an app that no longer asks for one, nor miss one.
	if cur := c.l.s.route(c.l.name, c.l.dir); cur != nil {
		r = cur
		c.appAddr = r.in.App
	}
	d := net.Dialer{Timeout: r.connectTimeout}
	app, err := d.DialContext(c.ctx, "tcp", r.in.App)
	if err != nil {
		c.l.metrics.connectFailed()
		c.log().Warn("connecting to app failed", "listener", c.l.name, "peer_id", peer.String(), "app_addr", r.in.App, "error", err)
		c.kill(reasonUpstreamUnreachable)
		c.finish()
		return
	}
	if !c.setUp(app) {
		c.finish()
		return
	}
	if r.in.ProxyProtocol && !c.sendProxyHeader(tc, app, r, peer) {
		return
	}
	c.pipe(tc, c.down, downSock, app, app, newSocket(app), r.idleTimeout, c.end)
}

// sendProxyHeader writes the PROXY protocol v2 header to the app, before
// any byte of the peer's: the app reads who called before what they said.
// It is written under the connect timeout, so an app that accepted and does
// not read cannot hold the connection past it. A failure ends the connection
// like an unreachable app (nothing of the stream was forwarded yet).
func (c *conn) sendProxyHeader(tc *tls.Conn, app net.Conn, r *route, peer spiffeid.ID) bool {
	hdr, err := proxyHeader(c.down.RemoteAddr(), c.down.LocalAddr(), tc.ConnectionState(), peer)
	if err == nil {
		app.SetWriteDeadline(time.Now().Add(r.connectTimeout))
		_, err = app.Write(hdr)
		app.SetWriteDeadline(time.Time{})
	}
	if err != nil {
		c.l.metrics.connectFailed()
		c.log().Warn("sending the PROXY protocol header to the app failed", "listener", c.l.name, "peer_id", peer.String(), "app_addr", r.in.App, "error", err)
		c.kill(reasonUpstreamUnreachable)
		c.finish()
		return false
	}
	return true
}

// serveOutbound: dial the upstreams in order, handshake (the tls.Config
// requires the server to prove the expected ID), then copy. The app's bytes
// are not read before the upstream proved its identity.
func (c *conn) serveOutbound(r *route) {
	c.appAddr = c.down.RemoteAddr().String()
	want := r.out.ServerID
	c.serverID.Store(&want)
	cfg := r.tls
	var tc *tls.Conn
	var upSock *socket
	for attempt := 1; ; attempt++ {
		raw := c.dialUpstream(r)
		if raw == nil {
			c.kill(reasonUpstreamUnreachable)
			c.finish()
			return
		}
		if !c.setUp(raw) {
			c.finish()
			return
		}
		upSock = newSocket(raw)
		c.tr = &transport{Conn: orConn(upSock, raw)}
		tc = tls.Client(c.tr, cfg)
		err := c.handshake(tc, raw, r)
		if err == nil {
			break
		}
		// A resumed session is held to the current bundle and clock, so a
		// ticket whose server certificate expired (or whose CA left the
		// bundle) a moment ago is refused. That is no reason to fail the
		// app's connection: none of its bytes were read yet, so try once
		// more with a full handshake, which sees the server's current SVID.
		if ve, ok := errors.AsType[*identity.VerifyError](err); ok && ve.Resumed && attempt == 1 && !c.killed() {
			c.log().Info("resumed session refused, retrying with a full handshake", "listener", c.l.name, "remote_addr", c.remoteAddr, "class", string(ve.Class), "reason", err.Error())
			raw.Close()
			cfg = cfg.Clone()
			cfg.ClientSessionCache = nil
			continue
		}
		c.handshakeFailed(err)
		return
	}
	c.peer.Store(&want)
	if err := c.authorized(); err != nil {
		c.refused(err)
		return
	}
	if !c.setTLS(tc, upSock) {
		c.finish()
		return
	}
	c.mu.Lock()
	raw := c.up
	c.mu.Unlock()
	c.pipe(c.down, c.down, newSocket(c.down), tc, raw, upSock, r.idleTimeout, c.end)
}

// dialUpstream connects to the first upstream that answers, nil if none does.
func (c *conn) dialUpstream(r *route) net.Conn {
	d := net.Dialer{Timeout: r.connectTimeout}
	for _, addr := range r.out.Upstreams {
		raw, err := d.DialContext(c.ctx, "tcp", addr)
		if err == nil {
			c.remoteAddr = addr
			return raw
		}
		c.l.metrics.connectFailed()
		c.log().Warn("connecting to upstream failed", "listener", c.l.name, "remote_addr", addr, "error", err)
		if c.killed() {
			return nil
		}
	}
	return nil
}

// handshake runs the TLS handshake under the listener's deadline.
func (c *conn) handshake(tc *tls.Conn, raw net.Conn, r *route) error {
	begin := time.Now()
	raw.SetDeadline(begin.Add(r.handshakeTimeout))
	if err := tc.HandshakeContext(c.ctx); err != nil {
		return err
	}
	raw.SetDeadline(time.Time{})
	cs := tc.ConnectionState()
	c.resumed, c.version, c.cipher, c.group = cs.DidResume, cs.Version, cs.CipherSuite, cs.CurveID
	c.l.metrics.handshakeOK(time.Since(begin).Seconds(), cs.CurveID)
	return nil
}

// handshakeFailed ends a connection whose handshake failed: a refusal is
// logged as such, unless Shutdown or a listener removal cut the handshake,
// which is not the peer's doing.
func (c *conn) handshakeFailed(err error) {
	if c.killed() {
		c.finish()
		return
	}
	c.refused(err)
}

// authorized re-checks a connection whose handshake just completed against
// the snapshot current now, and the peer's trust domain against the bundles
// held now. Apply swaps the snapshot before it sweeps the live connections,
// RecheckTrust runs after the bundles changed, and the peer (or expected
// server ID) is stored before this check, so a connection handshaking
// during an Apply or a bundle's removal is caught by one or the other.
func (c *conn) authorized() error {
	snap := c.l.s.snap.Load()
	r := c.l.s.route(c.l.name, c.l.dir)
	peer := *c.peer.Load()
	switch {
	case r == nil:
		return &identity.VerifyError{Class: identity.ClassNotAllowed, Peer: peer,
			Err: fmt.Errorf("listener %q removed during the handshake: %w", c.l.name, identity.ErrNotAllowed)}
	case r.in != nil:
		if !snap.accepts(r.in, peer.TrustDomain()) {
			return &identity.VerifyError{Class: identity.ClassWrongTrustDomain, Peer: peer,
				Err: fmt.Errorf("peer %s: listener %q no longer federates with trust domain %q", peer, c.l.name, peer.TrustDomain().Name())}
		}
		if err := r.in.Allow.Authorize(peer); err != nil {
			return &identity.VerifyError{Class: identity.ClassNotAllowed, Peer: peer, Err: err}
		}
	case r.out != nil:
		if r.out.ServerID != *c.serverID.Load() {
			return &identity.VerifyError{Class: identity.ClassWrongServerID, Peer: peer,
				Err: fmt.Errorf("server %s: listener %q now expects %s", peer, c.l.name, r.out.ServerID)}
		}
	}
	// A foreign trust domain's bundle removed (or now refused) after the
	// handshake verified against it, and before the peer was stored where
	// RecheckTrust looks: caught here, as the allow-list is above.
	if td := peer.TrustDomain(); td != snap.local {
		if err := c.l.s.tlsc.TrustDomainUsable(td); err != nil {
			return &identity.VerifyError{Class: identity.ClassUnknownCA, Peer: peer, Err: fmt.Errorf("peer %s: %w", peer, err)}
		}
	}
	return nil
}

// refused logs a failed or refused handshake (one line, with the class and
// the reason) and closes the connection.
//
// A peer that closed an inbound connection before sending a byte is no TLS
// client but a TCP health check (kubelet, load balancer) or a port scan: it
// is counted under its own class and logged at debug level only, so that
// probes every few seconds neither drown the refusals that matter nor read
// as attacks.
func (c *conn) refused(err error) {
	class := identity.ClassOf(err)
	level := slog.LevelWarn
	msg := "handshake refused"
	switch {
	case c.l.dir == DirectionInbound && c.tr != nil && c.tr.closedSilently(err):
		class, level, msg = identity.ClassNoHandshake, slog.LevelDebug, "closed before the handshake"
	case c.l.dir == DirectionOutbound && identity.RefusedCertificate(err):
		// The alert says the upstream refused our certificate: what the
		// refused side knows, not which check of the upstream's failed.
		class = identity.ClassClientRefused
	}
	var peer spiffeid.ID
	if ve, ok := errors.AsType[*identity.VerifyError](err); ok {
		peer = ve.Peer
	}
	c.logRefusal(level, msg, class, peer, err)
	c.kill(reasonHandshakeFailed)
	c.closeRaw()
	c.l.metrics.connClosed(reasonHandshakeFailed)
}

// clientRefused handles an outbound connection whose upstream refused this
// sidecar's certificate after the handshake: in TLS 1.3 the client's
// handshake completes before the server has judged the client's
// certificate, and the refusal (an alert) arrives on the first read. It is
// logged and counted as the refused handshake it is, and the access-log
// line of the connection carries its class. The connection itself ends as
// the reset it is for the app.
func (c *conn) clientRefused(err error) {
	c.mu.Lock()
	c.class = identity.ClassClientRefused
	c.mu.Unlock()
	c.logRefusal(slog.LevelWarn, "handshake refused", identity.ClassClientRefused, *c.peer.Load(), err)
}

// logRefusal writes the one line of a refused handshake and counts it.
func (c *conn) logRefusal(level slog.Level, msg string, class identity.Class, peer spiffeid.ID, err error) {
	c.l.metrics.handshakeFailed(class)
	attrs := []any{
		"listener", c.l.name,
		"direction", string(c.l.dir),
		"remote_addr", c.remoteAddr,
	}
	if !peer.IsZero() {
		attrs = append(attrs, "peer_id", peer.String())
	}
	if c.l.dir == DirectionOutbound {
		attrs = append(attrs, "app_addr", c.appAddr)
	}
	attrs = append(attrs, "class", string(class), "reason", err.Error())
	c.log().Log(context.Background(), level, msg, attrs...)
}

func (c *conn) closeRaw() {
	c.down.Close()
	c.mu.Lock()
	up := c.up
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	c.mu.Unlock()
	if up != nil {
		up.Close()
	}
}

// end is what the last copy direction of a pipe does: the access-log line,
// then the listener's slots are given back.
func (c *conn) end() {
	c.finish()
	c.l.release(c)
}

// finish closes both sides and writes the access-log line.
func (c *conn) finish() {
	c.closeRaw()
	reason := reasonEOF
	if p := c.reason.Load(); p != nil {
		reason = *p
	}
	c.l.metrics.connClosed(reason)
	peer := ""
	if p := c.peer.Load(); p != nil {
		peer = p.String()
	}
	attrs := []any{
		"listener", c.l.name,
		"direction", string(c.l.dir),
		"peer_id", peer,
		"remote_addr", c.remoteAddr,
		"app_addr", c.appAddr,
		"bytes_in", c.bytesIn.Load(),
		"bytes_out", c.bytesOut.Load(),
		"duration", time.Since(c.start),
		"reason", reason,
	}
	c.mu.Lock()
	class := c.class
	c.mu.Unlock()
	if class != "" {
		attrs = append(attrs, "class", string(class))
	}
	if c.version != 0 {
		attrs = append(attrs,
			"tls_version", identity.VersionName(c.version),
			"tls_cipher_suite", tls.CipherSuiteName(c.cipher),
			"tls_key_exchange_group", groupLabel(c.group))
	}
	attrs = append(attrs, "tls_resumed", c.resumed)
	c.log().Info("connection closed", attrs...)
}

// orConn is the connection a tls.Conn reads: the socket when there is one,
// else the TCP connection itself.
func orConn(s *socket, raw net.Conn) net.Conn {
	if s == nil {
		return raw
	}
	return s
}
