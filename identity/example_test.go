package identity_test

import (
	"context"
	"crypto/tls"
	"log"
	"log/slog"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// A sidecar's inbound side: the SVID and bundle come from the Workload API,
// the listener's config is built once, and every accepted connection is
// verified and authorized in its handshake, resumed or not.
func ExampleTLS_ServerConfig() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := identity.NewWorkloadSource(ctx, "", slog.Default()) // $SPIFFE_ENDPOINT_SOCKET
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()

	allow := identity.NewAllowList(identity.AllowPathPrefix(spiffeid.RequireFromString("spiffe://mesh.test/ns/frontend")))
	cfg := identity.NewTLS(src).ServerConfig(identity.Modern(), allow.Authorize)
	ln, err := tls.Listen("tcp", "127.0.0.1:8443", cfg)
	if err != nil {
		log.Fatal(err)
	}
	conn, err := ln.Accept()
	if err != nil {
		log.Fatal(err)
	}
	tc := conn.(*tls.Conn)
	if err := tc.HandshakeContext(ctx); err != nil {
		log.Printf("handshake refused: class=%s reason=%v", identity.ClassOf(err), err)
		return
	}
	peer, _ := identity.PeerID(tc.ConnectionState())
	log.Printf("accepted %s", peer)
}

// A sidecar's outbound side: the upstream must prove the expected SPIFFE ID.
func ExampleTLS_ClientConfig() {
	var src identity.Source // from NewWorkloadSource
	cfg := identity.NewTLS(src).ClientConfig(identity.Modern(), spiffeid.RequireFromString("spiffe://mesh.test/ns/backend"))
	raw, err := net.Dial("tcp", "127.0.0.1:9443")
	if err != nil {
		log.Fatal(err)
	}
	tc := tls.Client(raw, cfg)
	if err := tc.Handshake(); err != nil {
		log.Printf("upstream refused: class=%s reason=%v", identity.ClassOf(err), err)
		return
	}
	info := identity.DescribeConnection(tc.ConnectionState(), false)
	log.Printf("connected: %s %s %s to %s", info.Version, info.CipherSuite, info.KeyExchangeGroup, info.ServerSPIFFEID)
}
