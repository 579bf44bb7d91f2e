// Package proxy is latch's data plane: inbound listeners that terminate mTLS and
// forward plain TCP to the local app, and outbound listeners on loopback that
// originate mTLS to an upstream. It runs whatever immutable Config snapshot it
// was last given (from a static file via LoadFile, or from xDS) and owns
// listener lifecycle, the copy loop, limits, timeouts and graceful drain.
//
// # Connections
//
// Inbound: accept → TLS handshake under HandshakeTimeout, in which the
// tls.Config from TLSConfigs verifies the peer's X.509-SVID and authorizes its
// SPIFFE ID against the allow-list of the snapshot current at that moment →
// re-check against the current snapshot → dial the app (ConnectTimeout) →
// copy both ways. The app is dialed only after the handshake and the
// authorization succeeded, so no byte of a refused peer ever reaches it.
//
// Outbound: accept on loopback → dial the upstreams in order → TLS handshake
// in which the upstream must prove the listener's ServerID → copy. The app's
// bytes are not read before that. There is no plaintext fallback anywhere.
//
// A clean end of stream on one side is passed on as a half-close of the other
// (close_notify and FIN towards a TLS side), while the other direction goes
// on; a reset or error on either side resets both, so neither end mistakes a
// broken stream for a complete one. On a TLS side only close_notify is a
// clean end: a TCP stream that ends without it (a bare FIN, which anybody on
// the path can inject) is a truncated stream, and resets both sides too
// ("truncated"). A connection that latch itself cuts in
// the middle — a policy change revoked its peer or server, or a drain ran
// out of time — is reset on both sides too (RST, no close_notify). A
// connection with no byte either way for IdleTimeout is closed with a FIN:
// nothing was in flight, it is a normal end (close_notify first on the TLS
// side). Activity resets the timer.
//
// # Copying
//
// Each direction copies through a pooled 32 KiB buffer that it holds only
// while data flows; a direction whose read fills it is streaming and takes
// 128 KiB buffers until it is parked. Towards a TLS side, the records made
// of one buffer leave in one write(2); from a TLS side, the loop reads on
// while decrypted records are at hand, so the plain side also gets one write
// per buffer. A direction that finds its source empty gives the buffer back
// and waits inside the socket's read on the runtime poller (a TLS side waits
// for the next record with a one-byte read, so no copy buffer is held);
// once a wait has lasted parkAfter (500 ms; ended by the Server's grace
// sweeper between one and two times that, no timer per wait) the Server's
// parker (an epoll set, Linux only) takes the direction over and its
// goroutine ends, so an idle connection holds neither buffers nor
// goroutines. Data, an end of stream or a kill start it again on a fresh
// goroutine. Request/response traffic is read and written with raw system
// calls, which do not wake the Go runtime's monitor thread every time the
// process wakes from idle (see sysRead); streaming directions use ordinary
// ones.
//
// # Limits and lifecycle
//
// Each listener takes a connection slot (MaxConnections) and a shutdown
// wait-group slot before it calls Accept: at the limit it stops accepting and
// further peers wait in the kernel's backlog (back-pressure, not refusal).
// Accept errors back off from 5 ms to 1 s.
//
// Apply is all-or-nothing: it validates, binds the new listeners' sockets
// (closing them again if one bind fails, leaving the running config alone),
// then swaps the snapshot. Listeners whose direction, name and address did
// not change keep their socket and connections; removed ones stop accepting
// and drain for up to Options.DrainTimeout. Live inbound connections whose
// peer the new allow-list refuses are closed ("policy_revoked"), live
// outbound connections whose listener now expects another server ID too
// ("server_id_changed"). Shutdown stops accepting, waits for live connections
// until its context ends, closes the rest ("drain"), and returns when every
// goroutine has exited.
//
// # Access log
//
// One line per connection at close, message "connection closed", with
// listener, direction, peer_id (the verified SPIFFE ID of the other
// sidecar), remote_addr (that sidecar's address), app_addr (the local app's
// address), bytes_in, bytes_out, duration, reason, class (only when a
// handshake failure class explains the end, see below), tls_version
// ("TLS 1.3"), tls_cipher_suite (the IANA name), tls_key_exchange_group
// ("X25519MLKEM768" is the post-quantum hybrid; "X25519" and "P-256" are
// classical) and tls_resumed. latch_handshakes_total counts handshakes by
// the same group.
//
// bytes_in counts what the accepted side sent through the proxy and bytes_out
// what went back to it: for an inbound listener bytes_in is peer → app and
// bytes_out app → peer; for an outbound listener bytes_in is app → upstream
// and bytes_out upstream → app. (The latch_bytes_total metric says the same
// with a flow label that needs no such convention: app_to_peer, peer_to_app.)
//
// Reasons: eof (both sides closed cleanly), idle_timeout, policy_revoked
// (the allow-list or the federation list no longer admits the peer),
// trust_revoked (the federated bundle of the peer's trust domain was removed
// from the Workload API or is refused; see Server.RecheckTrust),
// server_id_changed, upstream_reset (the dialed side failed mid-stream),
// downstream_reset (the accepted side did), truncated (the TLS side, the
// peer inbound or the upstream outbound, ended without close_notify), drain,
// upstream_unreachable.
//
// A failed or refused handshake is one line "handshake refused" instead, with
// listener, direction, remote_addr, peer_id (when the peer presented a
// readable ID), class (identity.ClassOf) and reason (the error text). An
// inbound connection closed (FIN or RST) before its first byte is a TCP
// health check or a port scan, not a TLS client: it is counted under class
// no_handshake and logged at debug level as "closed before the handshake".
// An outbound connection whose upstream refused this sidecar's certificate
// (a certificate alert) is class client_refused, the class latch check
// gives the same refusal. In TLS 1.3 the client's handshake completes
// before the server judges the client's certificate, so the alert arrives
// on the first read: the refusal line is logged then, and the connection's
// access-log line (reason upstream_reset) carries the class.
package proxy
