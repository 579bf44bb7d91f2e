package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
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
			// The pipe parks its directions with the Server's parker,
			// whose loop runs until the Server shuts down.
			b.Cleanup(func() { s.Shutdown(context.Background()) })
			l := &listener{s: s, name: "bench", dir: DirectionInbound, metrics: s.metrics.forListener("bench", DirectionInbound)}
			client, down := tcpPair(b)
			up, sink := tcpPair(b)
			c := newConn(l, down)
			c.setUp(up)
			piped := make(chan struct{})
			c.pipe(down, down, newSocket(down), up, up, newSocket(up), time.Hour, func() {
				c.closeRaw()
				close(piped)
			})
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
	cpu0 := processCPU(b)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.CloseWrite()
	io.Copy(io.Discard, c)
	b.StopTimer()
	// The whole process: both sidecars, the app writing and the sink.
	b.ReportMetric((processCPU(b)-cpu0).Seconds()/(float64(b.N)*float64(len(buf))/1e9), "cpu-s/GB")
}

// BenchmarkEcho measures a 1 KiB request and its echo on one persistent
// connection through both sidecars: the request/response hot path (a wake-up,
// a read, a seal or open and a write on each of four hops), and what it
// allocates (sidecars, app and echo server are one process here). cpu-µs/op
// is the process's CPU time per round trip. With the client, the app and
// both sidecars in one process, the process never idles between messages,
// so what a pair of sidecar processes pays for going idle and waking up
// (see sysRead) does not show here; latch-bench counts it.
func BenchmarkEcho(b *testing.B) {
	m := newMesh(b, echo, meshOptions{})
	c := m.dial(b)
	msg := make([]byte, 1024)
	reply := make([]byte, len(msg))
	b.ReportAllocs()
	cpu0 := processCPU(b)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	cpu := processCPU(b) - cpu0
	b.ReportMetric(float64(cpu.Nanoseconds())/1e3/float64(b.N), "cpu-µs/op")
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

func (stubTLS) ServerConfig(identity.Profile, func(spiffeid.ID) error, ...identity.PeerOption) *tls.Config {
	return &tls.Config{}
}
func (stubTLS) ClientConfig(identity.Profile, spiffeid.ID, ...identity.PeerOption) *tls.Config {
	return &tls.Config{}
}
func (stubTLS) LocalTrustDomain() (spiffeid.TrustDomain, error) {
	return spiffeid.RequireTrustDomainFromString(trustDomain), nil
}
func (stubTLS) TrustDomainUsable(spiffeid.TrustDomain) error { return nil }

// BenchmarkIdleConnections measures what an idle proxied connection costs:
// it opens idleConns connections through an outbound+inbound pair in this
// process, each with one 1-byte echo so the copy loop is live, and reports
// the heap in use (after a GC) and the goroutine stacks per connection,
// against the same number of direct connections to the same app, so the
// figures are the pair's (two sidecars) own cost. b.N is not used: the
// figures are per connection, not per iteration.
func BenchmarkIdleConnections(b *testing.B) {
	const idleConns = 2000
	m := newMesh(b, func(c net.Conn) {
		// A frugal echo: 1 byte at a time, so the app's own cost is small
		// and the same in both runs.
		var one [1]byte
		for {
			n, err := c.Read(one[:])
			if n > 0 {
				if _, err := c.Write(one[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}, meshOptions{})
	open := func(addr string) (heap, stack uint64, goroutines int) {
		conns := make([]net.Conn, 0, idleConns)
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		_, heap0, stack0, g0 := memNow()
		for range idleConns {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
			if err := roundTrip(c, "x"); err != nil {
				b.Fatal(err)
			}
		}
		time.Sleep(3 * parkAfter) // idle long enough to be parked: 1 to 2 × parkAfter (see grace)
		_, heap1, stack1, g1 := memNow()
		return heap1 - heap0, stack1 - stack0, g1 - g0
	}
	for range b.N {
		dh, ds, dg := open(m.app.addr())
		ph, ps, pg := open(addrOf(b, m.outbound, "backend"))
		b.ReportMetric(float64(int64(ph)-int64(dh))/idleConns/2, "heap-B/conn/sidecar")
		b.ReportMetric(float64(int64(ps)-int64(ds))/idleConns/2, "stack-B/conn/sidecar")
		b.ReportMetric(float64(pg-dg)/idleConns/2, "goroutines/conn/sidecar")
	}
}

// memNow returns the heap and stack in use after a GC and the goroutine
// count, once they settle (closing connections ends goroutines
// asynchronously).
func memNow() (ms runtime.MemStats, heap, stack uint64, goroutines int) {
	runtime.GC()
	time.Sleep(100 * time.Millisecond) // let freshly started goroutines park
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms, ms.HeapInuse, ms.StackInuse, runtime.NumGoroutine()
}

// BenchmarkProxyHeader measures building the PROXY protocol v2 header of one
// inbound connection (addresses, PP2_TYPE_SSL, SPIFFE ID, the SHA-256 of
// the peer's leaf): what a listener with proxyProtocol pays per connection
// besides the one write(2) that sends it. header-B is its size on the wire.
func BenchmarkProxyHeader(b *testing.B) {
	ca := identitytest.NewCA(b, trustDomain)
	svid := ca.SVID(b, frontendID)
	cs := tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256,
		CurveID: tls.X25519MLKEM768, PeerCertificates: svid.Certificates}
	remote := &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 40000}
	local := &net.TCPAddr{IP: net.IPv4(10, 1, 2, 4), Port: 8443}
	var size int
	b.ReportAllocs()
	for b.Loop() {
		h, err := proxyHeader(remote, local, cs, svid.ID)
		if err != nil {
			b.Fatal(err)
		}
		size = len(h)
	}
	b.ReportMetric(float64(size), "header-B")
}

// BenchmarkConnectProxyProtocol is BenchmarkConnect with and without the
// PROXY protocol header on the inbound listener, so the difference is the
// header's whole cost per connection: building it, one more write to the app
// and the app's parsing it (go-proxyproto, as an app would).
func BenchmarkConnectProxyProtocol(b *testing.B) {
	for _, on := range []bool{false, true} {
		b.Run(fmt.Sprintf("header=%v", on), func(b *testing.B) {
			handle := echo
			if on {
				handle = func(c net.Conn) {
					br := bufio.NewReader(c)
					if _, err := proxyproto.Read(br); err != nil {
						return
					}
					io.Copy(c, br)
				}
			}
			m := newMesh(b, handle, meshOptions{inbound: func(in *Inbound) { in.ProxyProtocol = on }})
			addr := addrOf(b, m.outbound, "backend")
			for b.Loop() {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				if err := roundTrip(c, "x"); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
