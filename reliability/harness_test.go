package reliability

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/proxy"
)

const trustDomain = "rel.test"

// waitFor bounds every wait on a signal so that a broken proxy fails a test
// instead of hanging it; it is never the expected path.
const waitFor = 20 * time.Second

// mesh is one trust domain: a development CA serving the real Workload API.
type mesh struct {
	ca *devca.CA
}

func newMesh(t testing.TB, opts devca.Options) *mesh {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	ca, err := devca.New(trustDomain, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	return &mesh{ca: ca}
}

func id(name string) spiffeid.ID {
	return spiffeid.RequireFromString("spiffe://" + trustDomain + "/ns/rel/sa/" + name)
}

// source registers a workload and returns its Workload API source, as
// latch proxy gets it.
func (m *mesh) source(t testing.TB, name string) *identity.WorkloadSource {
	t.Helper()
	addr, err := m.ca.AddWorkload(id(name).String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	src, err := identity.NewWorkloadSource(ctx, addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// sidecar is one proxy.Server with its own metrics registry.
type sidecar struct {
	t   testing.TB
	srv *proxy.Server
	reg *prometheus.Registry
}

func newSidecar(t testing.TB, src identity.Source) *sidecar {
	t.Helper()
	reg := prometheus.NewRegistry()
	s := &sidecar{t: t, reg: reg, srv: proxy.NewServer(identity.NewTLS(src), proxy.Options{
		Metrics:      proxy.NewMetrics(reg),
		DrainTimeout: 5 * time.Second,
	})}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		s.srv.Shutdown(ctx)
	})
	return s
}

func (s *sidecar) apply(cfg *proxy.Config) {
	s.t.Helper()
	if err := s.srv.Apply(cfg); err != nil {
		s.t.Fatal(err)
	}
}

// addr is the bound address of the named listener.
func (s *sidecar) addr(name string) string {
	s.t.Helper()
	for _, l := range s.srv.Listeners() {
		if l.Name == name {
			return l.Addr
		}
	}
	s.t.Fatalf("no listener %q", name)
	return ""
}

// metric sums the samples of a counter or gauge family whose labels include
// want.
func (s *sidecar) metric(name string, want map[string]string) float64 {
	s.t.Helper()
	mfs, err := s.reg.Gather()
	if err != nil {
		s.t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if !labelsMatch(m, want) {
				continue
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

func labelsMatch(m *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == k && lp.GetValue() == v {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// waitMetric waits until the metric reaches at least min.
func (s *sidecar) waitMetric(name string, want map[string]string, min float64) float64 {
	s.t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		v := s.metric(name, want)
		if v >= min {
			return v
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s%v = %v, want ≥ %v", name, want, v, min)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// --- the pair --------------------------------------------------------------

// pair is the path of every test: client → outbound sidecar (frontend) →
// mTLS → inbound sidecar (backend) → app.
type pair struct {
	out, in  *sidecar
	app      *app
	entry    string // the outbound listener: where clients dial
	inbound  string // the inbound listener
	inConfig proxy.Inbound
}

type pairOptions struct {
	profile   identity.Profile
	inbound   proxy.Inbound  // Name, Listen and App filled in when empty
	outbound  proxy.Outbound // Name, Listen, Upstreams, ServerID filled in when empty
	appAddr   string         // dial target of the inbound (default: the app)
	allow     identity.AllowList
	frontSrc  identity.Source
	backSrc   identity.Source
	appConfig func(*app)
}

func newPair(t testing.TB, m *mesh, o pairOptions) *pair {
	t.Helper()
	if o.frontSrc == nil {
		o.frontSrc = m.source(t, "frontend")
	}
	if o.backSrc == nil {
		o.backSrc = m.source(t, "backend")
	}
	if o.profile.Name == "" {
		o.profile = identity.Modern()
	}
	p := &pair{app: newApp(t, o.appConfig)}
	in := o.inbound
	if in.Name == "" {
		in.Name = "in"
	}
	if in.Listen == "" {
		in.Listen = "127.0.0.1:0"
	}
	in.App = o.appAddr
	if in.App == "" {
		in.App = p.app.addr()
	}
	if o.allow.Len() == 0 {
		o.allow = identity.NewAllowList(identity.AllowID(id("frontend")))
	}
	in.Allow = o.allow
	p.inConfig = in
	p.in = newSidecar(t, o.backSrc)
	p.in.apply(&proxy.Config{Version: "in-1", Source: "test", TLS: o.profile, Inbound: []proxy.Inbound{in}})
	p.inbound = p.in.addr(in.Name)

	out := o.outbound
	if out.Name == "" {
		out.Name = "out"
	}
	if out.Listen == "" {
		out.Listen = "127.0.0.1:0"
	}
	if len(out.Upstreams) == 0 {
		out.Upstreams = []string{p.inbound}
	}
	if out.ServerID.IsZero() {
		out.ServerID = id("backend")
	}
	p.out = newSidecar(t, o.frontSrc)
	p.out.apply(&proxy.Config{Version: "out-1", Source: "test", TLS: o.profile, Outbound: []proxy.Outbound{out}})
	p.entry = p.out.addr(out.Name)
	return p
}

// --- the app ---------------------------------------------------------------

// app is the application behind the inbound sidecar: an echo server that
// counts what it accepts and reads. A test may replace the per-connection
// behaviour.
type app struct {
	t        testing.TB
	ln       net.Listener
	accepted atomic.Int64
	bytes    atomic.Int64
	handle   func(a *app, c *net.TCPConn)
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
}

func newApp(t testing.TB, configure func(*app)) *app {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &app{t: t, ln: ln, handle: echo, conns: map[net.Conn]struct{}{}}
	if configure != nil {
		configure(a)
	}
	a.wg.Add(1)
	go a.serve()
	t.Cleanup(a.close)
	return a
}

func (a *app) addr() string { return a.ln.Addr().String() }

func (a *app) serve() {
	defer a.wg.Done()
	for {
		c, err := a.ln.Accept()
		if err != nil {
			return
		}
		a.accepted.Add(1)
		a.mu.Lock()
		a.conns[c] = struct{}{}
		a.mu.Unlock()
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			defer func() {
				a.mu.Lock()
				delete(a.conns, c)
				a.mu.Unlock()
				c.Close()
			}()
			a.handle(a, c.(*net.TCPConn))
		}()
	}
}

func (a *app) close() {
	a.ln.Close()
	a.mu.Lock()
	for c := range a.conns {
		c.Close()
	}
	a.mu.Unlock()
	a.wg.Wait()
}

// countingReader counts what the app reads.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// echo writes back everything it reads, then half-closes.
func echo(a *app, c *net.TCPConn) {
	io.Copy(c, countingReader{c, &a.bytes})
	c.CloseWrite()
}

// --- clients ---------------------------------------------------------------

// roundTrip sends payload through addr, half-closes, and returns what came
// back until EOF.
func roundTrip(addr string, payload []byte, timeout time.Duration) ([]byte, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, rerr := io.ReadAll(c)
	werr := <-errc
	if rerr != nil {
		return got, rerr
	}
	return got, werr
}

// echoOK does one round trip of size random bytes and checks them by hash.
func echoOK(addr string, size int, timeout time.Duration) error {
	payload := randomBytes(size)
	got, err := roundTrip(addr, payload, timeout)
	if err != nil {
		return err
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		return fmt.Errorf("%w: sent %d bytes, got %d back", errCorrupted, len(payload), len(got))
	}
	return nil
}

var errCorrupted = errors.New("bytes corrupted")

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t testing.TB) string {
	t.Helper()
	addr, err := freeport.Addr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// isReset reports whether err is a connection reset (ECONNRESET), as opposed
// to a clean end of stream.
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// sawReset reports whether a client connection that has not shut down its
// own write side was reset, given the error its reader ended with. Linux
// reports ECONNRESET to one system call only: when the client's own writer
// took it, the reader sees a plain EOF. The socket's TCP state tells them
// apart: CLOSE after a reset, CLOSE_WAIT after the peer's FIN.
func sawReset(c net.Conn, readErr error) bool {
	if isReset(readErr) {
		return true
	}
	if readErr != nil {
		return false
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	var state uint8
	rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	})
	const tcpClose = 7 // include/net/tcp_states.h
	return state == tcpClose
}

var syscallEPIPE = syscall.EPIPE
