package proxy

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(b testing.TB) (client, server *net.TCPConn) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		b.Fatal("accept failed")
	}
	b.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// BenchmarkCopy measures the copy loop alone (pooled buffer, activity
// stamp, byte counts, metrics) between two plain loopback TCP connections:
// client → [pipe] → sink, in 32 KiB writes.
func BenchmarkCopy(b *testing.B) {
	for _, withMetrics := range []bool{false, true} {
		b.Run(fmt.Sprintf("metrics=%v", withMetrics), func(b *testing.B) {
			s := NewServer(nil, Options{})
			if withMetrics {
				s.metrics = NewMetrics(nil)
			}
			l := &listener{s: s, name: "bench", dir: DirectionInbound, metrics: s.metrics.forListener("bench", DirectionInbound)}
			client, down := tcpPair(b)
			up, sink := tcpPair(b)
			c := newConn(l, down)
			c.setUp(up)
			piped := make(chan struct{})
			go func() {
				defer close(piped)
				c.pipe(down, down, up, up, time.Hour)
				c.closeRaw()
			}()
			sunk := make(chan int64, 1)
			go func() {
				n, _ := io.Copy(io.Discard, sink)
				sink.CloseWrite()
				sunk <- n
			}()

			buf := make([]byte, copyBufferSize)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := client.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			client.CloseWrite()
			n := <-sunk
			b.StopTimer()
			io.Copy(io.Discard, client)
			<-piped
			if want := int64(b.N) * int64(len(buf)); n != want || c.bytesIn.Load() != want {
				b.Fatalf("sink got %d bytes, pipe counted %d, want %d", n, c.bytesIn.Load(), want)
			}
		})
	}
}

// BenchmarkEndToEnd measures bulk throughput through both sidecars (two
// mTLS hops' worth of encryption in one process): app → outbound → inbound
// → sink.
func BenchmarkEndToEnd(b *testing.B) {
	m := newMesh(b, func(c net.Conn) {
		io.Copy(io.Discard, c)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}, meshOptions{})
	c := m.dial(b)
	buf := make([]byte, copyBufferSize)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.CloseWrite()
	io.Copy(io.Discard, c)
}

// BenchmarkConnect measures new connections through both sidecars: TCP
// connect, mTLS handshake (resumed after the first), app dial, one echo.
func BenchmarkConnect(b *testing.B) {
	m := newMesh(b, echo, meshOptions{})
	addr := addrOf(b, m.outbound, "backend")
	b.ResetTimer()
	for range b.N {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		if err := roundTrip(c, "x"); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkSnapshotLookup measures what every handshake and every Apply
// sweep pays to consult the running policy: load the snapshot, find the
// listener, match the allow-list (ten rules, the match on the last).
func BenchmarkSnapshotLookup(b *testing.B) {
	var rules []string
	for i := range 9 {
		rules = append(rules, fmt.Sprintf("spiffe://mesh.test/ns/default/sa/svc%d", i))
	}
	rules = append(rules, frontendID)
	cfg := &Config{TLS: identity.Modern()}
	for i := range 20 {
		cfg.Inbound = append(cfg.Inbound, Inbound{Name: fmt.Sprintf("l%d", i), Listen: "127.0.0.1:0", App: "127.0.0.1:1", Allow: allowIDs(b, rules...)})
	}
	cfg.Inbound[7].Name = "web"
	s := NewServer(stubTLS{}, Options{})
	s.snap.Store(s.newSnapshot(cfg))
	authorize := s.authorizer("web")
	peer := mustID(b, frontendID)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := authorize(peer); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// stubTLS builds empty configurations, for code that never handshakes.
type stubTLS struct{}

func (stubTLS) ServerConfig(identity.Profile, func(spiffeid.ID) error) *tls.Config {
	return &tls.Config{}
}
func (stubTLS) ClientConfig(identity.Profile, spiffeid.ID) *tls.Config { return &tls.Config{} }
