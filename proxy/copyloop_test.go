package proxy

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"latch.dev/latch/identity"
)

// tls12Profile is the intermediate profile held to TLS 1.2.
func tls12Profile() identity.Profile {
	p := identity.Intermediate()
	p.MaxVersion = tls.VersionTLS12
	return p
}

// randomBytes is n bytes drawn from seed: both ends of a stream derive what
// the other must have sent.
func randomBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// writeChunks writes p in chunks of random sizes (one byte to 200 KiB), with
// pauses around the grace period between some of them.
func writeChunks(c net.Conn, p []byte, rng *rand.Rand) error {
	for len(p) > 0 {
		n := 1 + rng.IntN(min(len(p), 200<<10))
		if rng.IntN(4) == 0 {
			n = 1 + rng.IntN(min(len(p), 64))
		}
		if _, err := c.Write(p[:n]); err != nil {
			return err
		}
		p = p[n:]
		if rng.IntN(3) == 0 {
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
		}
	}
	return nil
}

// streamHeader opens every stream of TestStreamsArriveWhole: the seed of both
// directions' bytes, their sizes, and whether the app answers before it has
// read the request (and half-closes first) or echoes.
type streamHeader struct {
	Seed     uint64
	Request  uint32
	Response uint32
	Echo     uint8
}

// streamApp serves TestStreamsArriveWhole's streams: it checks the request's
// SHA-256 against the one its seed gives, and either echoes it or sends the
// seeded response and half-closes while the request is still coming.
func streamApp(errs chan<- error) func(net.Conn) {
	return func(c net.Conn) {
		var h streamHeader
		if err := binary.Read(c, binary.LittleEndian, &h); err != nil {
			errs <- fmt.Errorf("app: reading a stream's header: %w", err)
			return
		}
		if h.Echo == 1 {
			echo(c)
			return
		}
		var wg sync.WaitGroup
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(h.Seed, 2))
			if err := writeChunks(c, randomBytes(h.Seed+1, int(h.Response)), rng); err != nil {
				errs <- fmt.Errorf("app: stream %x: writing the response: %w", h.Seed, err)
				return
			}
			c.(interface{ CloseWrite() error }).CloseWrite()
		})
		sum := sha256.New()
		n, err := io.Copy(sum, c)
		if err != nil {
			errs <- fmt.Errorf("app: stream %x: reading the request: %w", h.Seed, err)
		} else if want := sha256.Sum256(randomBytes(h.Seed, int(h.Request))); n != int64(h.Request) || !bytes.Equal(sum.Sum(nil), want[:]) {
			errs <- fmt.Errorf("app: stream %x: request of %d bytes arrived as %d bytes with another SHA-256", h.Seed, h.Request, n)
		}
		wg.Wait()
	}
}

// Many concurrent streams of random sizes through a pair, both directions at
// once, written in chunks of random sizes with pauses around the grace
// period (so directions wait, park and resume mid-stream), half-closed in
// either order: every byte arrives, in order, and nothing else (SHA-256 of
// each direction end to end), over TLS 1.3 and TLS 1.2.
func TestStreamsArriveWhole(t *testing.T) {
	for _, tc := range []struct {
		name    string
		profile identity.Profile
	}{
		{"TLS 1.3", identity.Modern()},
		{"TLS 1.2", tls12Profile()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const streams, parallel = 48, 12
			errs := make(chan error, 4*streams)
			m := newMesh(t, streamApp(errs), meshOptions{profile: tc.profile})
			sem := make(chan struct{}, parallel)
			var wg sync.WaitGroup
			for i := range streams {
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					if err := runStream(t, m, uint64(i)*7919+uint64(len(tc.name))); err != nil {
						errs <- fmt.Errorf("stream %d: %w", i, err)
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// runStream runs one stream of TestStreamsArriveWhole from the client's end.
func runStream(t *testing.T, m *mesh, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, 1))
	size := func() uint32 {
		switch rng.IntN(4) {
		case 0:
			return uint32(rng.IntN(100))
		case 1:
			return uint32(rng.IntN(40 << 10))
		default:
			return uint32(rng.IntN(1 << 20))
		}
	}
	h := streamHeader{Seed: seed, Request: size(), Response: size(), Echo: uint8(rng.IntN(2))}
	if h.Echo == 1 {
		h.Response = h.Request
	}
	c := m.dial(t)
	c.SetDeadline(time.Now().Add(4 * waitFor))
	if err := binary.Write(c, binary.LittleEndian, h); err != nil {
		return fmt.Errorf("writing the header: %w", err)
	}
	werr := make(chan error, 1)
	go func() {
		err := writeChunks(c, randomBytes(seed, int(h.Request)), rand.New(rand.NewPCG(seed, 3)))
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	want := randomBytes(seed+1, int(h.Response))
	if h.Echo == 1 {
		want = randomBytes(seed, int(h.Request))
	}
	sum := sha256.New()
	n, err := io.Copy(sum, c)
	if err != nil {
		return fmt.Errorf("reading the response: %w", err)
	}
	if wsum := sha256.Sum256(want); n != int64(len(want)) || !bytes.Equal(sum.Sum(nil), wsum[:]) {
		return fmt.Errorf("response of %d bytes arrived as %d bytes with another SHA-256 (echo %v)", len(want), n, h.Echo == 1)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("writing the request: %w", err)
	}
	return nil
}

// tricklingConn writes what the TLS stack gives it one byte per segment,
// stalling where told: a peer that sends its records a byte at a time, or
// part of a record and then nothing for a while.
type tricklingConn struct {
	*net.TCPConn
	mu     sync.Mutex
	on     bool
	stalls map[int]time.Duration // by offset into what is trickled
	off    int
	// midStall runs in the middle of each stall.
	midStall func()
}

func (c *tricklingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return c.TCPConn.Write(p)
	}
	for i := range p {
		if d, ok := c.stalls[c.off]; ok {
			time.Sleep(d / 2)
			if c.midStall != nil {
				c.midStall()
			}
			time.Sleep(d / 2)
		}
		if _, err := c.TCPConn.Write(p[i : i+1]); err != nil {
			return i, err
		}
		c.off++
	}
	return len(p), nil
}

// A peer that sends its TLS records one byte at a time, and one that sends
// part of a record and stalls for many grace periods (the direction parks
// with the record half in the TLS stack's buffer, the sweeper ending its
// waits mid-record), then the rest: the app gets every byte in order, and the
// echo comes back whole, over TLS 1.3 and TLS 1.2.
func TestTricklingPeer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		profile identity.Profile
	}{
		{"TLS 1.3", identity.Modern()},
		{"TLS 1.2", tls12Profile()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, echo, meshOptions{profile: tc.profile})
			cfg := identity.NewTLS(m.ca.Source(t, frontendID)).ClientConfig(tc.profile, mustID(t, backendID))
			raw, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { raw.Close() })
			var parkedMidRecord int
			tr := &tricklingConn{TCPConn: raw.(*net.TCPConn), stalls: map[int]time.Duration{}, midStall: func() {
				if m.inbound.parker.count() == 2 {
					parkedMidRecord++
				}
			}}
			tc := tls.Client(tr, cfg)
			tc.SetDeadline(time.Now().Add(4 * waitFor))
			if err := tc.Handshake(); err != nil {
				t.Fatal(err)
			}
			// Stalls inside the first records: in the header, right after
			// it, in the middle of the payload and just before the tag.
			for _, off := range []int{2, 5, 40, 1000, 2055, 2070} {
				tr.stalls[off] = 30 * time.Millisecond
			}
			tr.mu.Lock()
			tr.on = true
			tr.mu.Unlock()
			for i, size := range []int{2048, 1, 300, 5000} {
				msg := randomBytes(uint64(i), size)
				if _, err := tc.Write(msg); err != nil {
					t.Fatalf("message %d: write: %v", i, err)
				}
				got := make([]byte, size)
				if _, err := io.ReadFull(tc, got); err != nil {
					t.Fatalf("message %d (%d bytes): read: %v", i, size, err)
				}
				if !bytes.Equal(got, msg) {
					t.Fatalf("message %d (%d bytes): the echo differs", i, size)
				}
			}
			if err := tc.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			raw.(*net.TCPConn).CloseWrite()
			if n, err := io.Copy(io.Discard, tc); n != 0 || err != nil {
				t.Fatalf("after the half-close: %d more bytes, %v; want a clean end", n, err)
			}
			// Both directions parked while a record was half sent: the
			// peer's (waiting for the rest) and the app's.
			if parkedMidRecord == 0 {
				t.Error("no stall found the connection parked")
			}
		})
	}
}

// An app that never reads: the client's writes stop being taken once the
// socket buffers along the way are full, and the sidecars hold a copy
// buffer per direction, not what the client keeps sending (back-pressure:
// memory stays bounded however much a peer offers).
func TestPeerThatNeverReads(t *testing.T) {
	stuck := make(chan struct{})
	defer close(stuck) // before the mesh's cleanup waits for the app
	m := newMesh(t, func(net.Conn) { <-stuck }, meshOptions{})
	c := m.dial(t)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	chunk := make([]byte, 1<<20)
	sent := 0
	for {
		c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := c.Write(chunk)
		sent += n
		if err != nil {
			if !isTimeout(err) {
				t.Fatalf("after %d bytes: %v", sent, err)
			}
			break
		}
		if sent > 256<<20 {
			t.Fatalf("%d MiB taken from a client whose app reads nothing", sent>>20)
		}
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%.1f MiB taken before the client's writes blocked; heap in use grew by %.1f MiB", float64(sent)/(1<<20), float64(grew)/(1<<20))
	if grew > 8<<20 {
		t.Errorf("heap in use grew by %d MiB while the app read nothing", grew>>20)
	}
}

// A connection whose app reads nothing goes idle with the sidecar's write
// towards the peer sidecar stuck on a full socket: the idle timeout closes
// it then, not five seconds later (tls.Conn.Close's write deadline for its
// close_notify, which waited behind the stuck write).
func TestIdleTimeoutWithAStuckWrite(t *testing.T) {
	stuck := make(chan struct{})
	defer close(stuck) // before the mesh's cleanup waits for the app
	const idle = 300 * time.Millisecond
	m := newMesh(t, func(net.Conn) { <-stuck }, meshOptions{outbound: func(o *Outbound) { o.IdleTimeout = idle }})
	mark := m.logs.mark()
	c := m.dial(t)
	chunk := make([]byte, 1<<20)
	for {
		c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Write(chunk); err != nil {
			if !isTimeout(err) {
				t.Fatal(err)
			}
			break
		}
	}
	blocked := time.Now()
	expectClosed(t, c)
	took := time.Since(blocked)
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "backend", "reason": reasonIdleTimeout})
	t.Logf("closed %v after the client's writes blocked (idle timeout %v)", took.Round(time.Millisecond), idle)
	if took >= 4*time.Second {
		t.Errorf("closed %v after the client's writes blocked, with an idle timeout of %v: the close waited for the stuck write", took, idle)
	}
}
