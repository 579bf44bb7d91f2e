package reliability

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/proxy"
)

// capturedHello is what a latch sidecar's client configuration sends first:
// the complete ClientHello record, and the SNI a server saw in it.
type capturedHello struct {
	record []byte
	sni    string
}

// captureClientHello runs a latch client handshake against a server that
// only records the ClientHello, then aborts.
func captureClientHello(t testing.TB, src identity.Source, p identity.Profile, server spiffeid.ID) capturedHello {
	t.Helper()
	cc, sc := net.Pipe()
	defer cc.Close()
	defer sc.Close()
	client := tls.Client(cc, identity.NewTLS(src).ClientConfig(p, server))
	go client.Handshake()

	// Read the first record off the wire as bytes...
	sc.SetDeadline(time.Now().Add(waitFor))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(sc, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(sc, body); err != nil {
		t.Fatal(err)
	}
	rec := append(hdr, body...)

	// ...and let Go's server parse the same bytes for the SNI.
	var sni string
	parsed := make(chan struct{})
	s := tls.Server(&replayConn{r: strings.NewReader(string(rec))}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			sni = h.ServerName
			close(parsed)
			return nil, errors.New("captured")
		},
	})
	s.Handshake()
	select {
	case <-parsed:
	default:
		t.Fatal("the captured record is not a ClientHello Go can parse")
	}
	return capturedHello{record: rec, sni: sni}
}

// replayConn is a net.Conn that reads from r and swallows writes.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *replayConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *replayConn) Close() error                     { return nil }
func (c *replayConn) SetDeadline(time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }

// mutation turns a real ClientHello into hostile input.
type mutation struct {
	name string
	f    func(r *rand.Rand, hello []byte) []byte
}

var mutations = []mutation{
	{"random bytes", func(r *rand.Rand, _ []byte) []byte { return randBytes(r, r.IntN(1500)) }},
	{"bit flips", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		for range 1 + r.IntN(8) {
			i := r.IntN(len(b))
			b[i] ^= 1 << r.IntN(8)
		}
		return b
	}},
	{"truncated", func(r *rand.Rand, h []byte) []byte { return clone(h[:r.IntN(len(h))]) }},
	{"record length", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		binary.BigEndian.PutUint16(b[3:], []uint16{0, 1, 4, 0x3fff, 0x4000, 0x4001, 0x4800, 0xffff, uint16(r.IntN(0x10000))}[r.IntN(9)])
		return b
	}},
	{"handshake length", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		n := []uint32{0, 1, 0xffffff, uint32(r.IntN(1 << 24))}[r.IntN(4)]
		b[6], b[7], b[8] = byte(n>>16), byte(n>>8), byte(n)
		return b
	}},
	{"content type", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		b[0] = []byte{20, 21, 23, 24, 0, 0xff, byte(r.IntN(256))}[r.IntN(7)]
		return b
	}},
	{"legacy version", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		v := []uint16{0x0300, 0x0301, 0x0302, 0x0002, 0x7f1c, 0xfefd, 0xffff}[r.IntN(7)]
		if r.IntN(2) == 0 {
			binary.BigEndian.PutUint16(b[1:], v) // record version
		} else {
			binary.BigEndian.PutUint16(b[9:], v) // client_version
		}
		return b
	}},
	{"handshake type", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		b[5] = []byte{0, 2, 4, 8, 11, 13, 15, 16, 20, 24, byte(r.IntN(256))}[r.IntN(11)]
		return b
	}},
	{"spliced garbage", func(r *rand.Rand, h []byte) []byte {
		b := clone(h)
		i := 5 + r.IntN(len(b)-5)
		j := min(len(b), i+1+r.IntN(64))
		copy(b[i:j], randBytes(r, j-i))
		return b
	}},
	{"hello twice / trailing garbage", func(r *rand.Rand, h []byte) []byte {
		if r.IntN(2) == 0 {
			return append(clone(h), h...)
		}
		return append(clone(h), randBytes(r, 1+r.IntN(512))...)
	}},
	{"fragmented into 1-byte records", func(r *rand.Rand, h []byte) []byte {
		var b []byte
		for _, c := range h[5:] {
			b = append(b, h[0], h[1], h[2], 0, 1, c)
		}
		if r.IntN(2) == 0 {
			b = b[:r.IntN(len(b))]
		}
		return b
	}},
	{"SSLv2 hello", func(r *rand.Rand, _ []byte) []byte {
		body := append([]byte{1, 0, 2, 0, 3, 0, 0, 0, 16}, randBytes(r, 3+16)...)
		return append([]byte{0x80, byte(len(body))}, body...)
	}},
	{"plaintext protocol", func(r *rand.Rand, _ []byte) []byte {
		return []byte([]string{
			"GET / HTTP/1.1\r\nHost: app\r\n\r\n",
			"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
			"SSH-2.0-OpenSSH_9.6\r\n",
			"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
			"*1\r\n$4\r\nPING\r\n",
		}[r.IntN(5)])
	}},
	{"alert / CCS / appdata records", func(r *rand.Rand, _ []byte) []byte {
		return [][]byte{
			{21, 3, 3, 0, 2, 2, 40},
			{20, 3, 3, 0, 1, 1},
			append([]byte{23, 3, 3, 0, 64}, randBytes(r, 64)...),
			{22, 3, 3, 0, 0},
		}[r.IntN(4)]
	}},
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestHostileClientHello throws random and mutated ClientHello and record
// bytes at an inbound port. Nothing may crash, no connection may reach the
// app, no byte may reach it, every attempt ends with the sidecar closing the
// connection, and a legitimate peer is still served afterwards.
func TestHostileClientHello(t *testing.T) {
	verdict(t, "hostile input")
	iterations := 2000
	if full() {
		iterations = 20000
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	m := newMesh(t, devca.Options{})
	front := m.source(t, "frontend")
	p := newPair(t, m, pairOptions{
		frontSrc: front,
		profile:  identity.Intermediate(),
		inbound:  proxy.Inbound{HandshakeTimeout: time.Second},
	})

	var hellos []capturedHello
	for _, prof := range []identity.Profile{identity.Modern(), identity.Intermediate()} {
		hellos = append(hellos, captureClientHello(t, front, prof, id("backend")))
	}
	figuref("hostile input", "SNI sent by a latch client", "%q (no server name: nothing to leak, nothing for ECH to hide)", hellos[0].sni)
	if hellos[0].sni != "" || hellos[1].sni != "" {
		t.Errorf("latch client sends SNI %q / %q", hellos[0].sni, hellos[1].sni)
	}

	var (
		tried, serverClosed, timedOut atomic.Int64
		byMutation                    sync.Map // name → *atomic.Int64
		wg                            sync.WaitGroup
		next                          atomic.Int64
	)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			for next.Add(1) <= int64(iterations) {
				mu := mutations[r.IntN(len(mutations))]
				input := mu.f(r, hellos[r.IntN(len(hellos))].record)
				// One attempt in 50 keeps its write side open: the sidecar's
				// handshake timeout has to end it.
				keepOpen := r.IntN(50) == 0
				closed, err := throw(p.inbound, input, keepOpen)
				tried.Add(1)
				v, _ := byMutation.LoadOrStore(mu.name, new(atomic.Int64))
				v.(*atomic.Int64).Add(1)
				switch {
				case closed:
					serverClosed.Add(1)
				default:
					timedOut.Add(1)
					t.Errorf("%s (%d bytes, keepOpen %v): sidecar did not close the connection: %v", mu.name, len(input), keepOpen, err)
				}
			}
		}()
	}
	wg.Wait()

	// Every attempt was counted as a failed handshake, and is gone.
	failures := p.in.waitMetric("latch_handshake_failures_total", nil, float64(iterations))
	deadline := time.Now().Add(waitFor)
	for p.in.srv.Listeners()[0].Active != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := echoOK(p.entry, 4096, waitFor); err != nil {
		t.Errorf("legitimate peer refused after the hostile run: %v", err)
	}
	appConns, appBytes := p.app.accepted.Load()-1, p.app.bytes.Load()-4096

	var names []string
	byMutation.Range(func(k, _ any) bool { names = append(names, k.(string)); return true })
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		v, _ := byMutation.Load(n)
		parts = append(parts, fmt.Sprintf("%s %d", n, v.(*atomic.Int64).Load()))
	}
	t.Logf("hostile inputs: %d tried (%s); closed by the sidecar %d; handshake failures counted %v; app connections %d, app bytes %d",
		tried.Load(), strings.Join(parts, ", "), serverClosed.Load(), failures, appConns, appBytes)
	figuref("hostile input", "mutated/random ClientHello and record inputs thrown at the inbound port", "%d (%d kinds of mutation, seed %d)", tried.Load(), len(names), seed)
	figuref("hostile input", "refused and closed by the sidecar / counted as failed handshakes", "%d / %v", serverClosed.Load(), failures)
	figuref("hostile input", "connections / bytes that reached the app", "%d / %d", appConns, appBytes)
	if appConns != 0 || appBytes != 0 {
		t.Errorf("hostile input reached the app: %d connections, %d bytes", appConns, appBytes)
	}
	// The legitimate connection's inbound side ends just after its client
	// saw EOF: wait for it too.
	for p.in.srv.Listeners()[0].Active != 0 && time.Now().Before(deadline.Add(waitFor)) {
		time.Sleep(10 * time.Millisecond)
	}
	if a := p.in.srv.Listeners()[0].Active; a != 0 {
		t.Errorf("%d hostile connections still open", a)
	}
}

// throw sends input to addr and reports whether the server closed the
// connection (EOF or reset) within the bound. Unless keepOpen, the write side
// is half-closed after the input, as a client that has nothing more to say.
func throw(addr string, input []byte, keepOpen bool) (bool, error) {
	c, err := net.DialTimeout("tcp", addr, waitFor)
	if err != nil {
		return false, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	if _, err := c.Write(input); err != nil && !isReset(err) && !errors.Is(err, syscallEPIPE) {
		return false, err
	}
	if !keepOpen {
		c.(*net.TCPConn).CloseWrite()
	}
	_, err = io.Copy(io.Discard, c) // alerts are fine; we wait for the close
	if err == nil || isReset(err) {
		return true, nil
	}
	return false, err
}
