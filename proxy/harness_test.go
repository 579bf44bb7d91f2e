package proxy

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// Every test's connections park as soon as they wait (see parker), so
	// the whole suite runs through parking and resuming. Benchmarks keep
	// the default, which is what they measure, unless they run one
	// iteration each (make test's smoke run of every benchmark): that run
	// measures nothing, and a direction parks at its first wait, so that
	// every benchmark goes through the parker even in a run this short, and
	// one that leaves it running fails goleak.
	switch {
	case flag.Lookup("test.bench").Value.String() == "":
		parkAfter = time.Millisecond
	case flag.Lookup("test.benchtime").Value.String() == "1x":
		parkAfter = 0
	}
	goleak.VerifyTestMain(m)
}

const (
	trustDomain = "mesh.test"
	frontendID  = "spiffe://mesh.test/ns/default/sa/frontend"
	backendID   = "spiffe://mesh.test/ns/default/sa/backend"
	otherID     = "spiffe://mesh.test/ns/default/sa/other"
	intruderID  = "spiffe://mesh.test/ns/default/sa/intruder"
)

// waitFor bounds every wait on a signal, so a broken proxy fails the test
// instead of hanging it. It is never the expected path.
const waitFor = 10 * time.Second

func mustID(t testing.TB, s string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromString(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func allowIDs(t testing.TB, ids ...string) identity.AllowList {
	var rules []identity.Rule
	for _, s := range ids {
		rules = append(rules, identity.AllowID(mustID(t, s)))
	}
	return identity.NewAllowList(rules...)
}

// --- captured logs ---------------------------------------------------------

// record is one captured log line, attributes flattened to strings.
type record struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func (r record) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %q", r.level, r.msg)
	for k, v := range r.attrs {
		fmt.Fprintf(&b, " %s=%q", k, v)
	}
	return b.String()
}

// logs is a slog.Handler that keeps every record and lets a test wait for a
// matching one: the log line is the signal that the proxy decided something.
type logs struct {
	mu      sync.Mutex
	changed chan struct{}
	records []record
}

func newLogs() *logs { return &logs{changed: make(chan struct{})} }

func (l *logs) logger() *slog.Logger { return slog.New(l) }

func (l *logs) Enabled(context.Context, slog.Level) bool { return true }
func (l *logs) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logs) WithGroup(string) slog.Handler            { return l }
func (l *logs) Handle(_ context.Context, r slog.Record) error {
	rec := record{level: r.Level, msg: r.Message, attrs: make(map[string]string)}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.Resolve().String()
		return true
	})
	l.mu.Lock()
	l.records = append(l.records, rec)
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
	return nil
}

// mark returns a position: wait(since=mark) only looks at later records.
func (l *logs) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.records)
}

// wait returns the first record from since on with message msg whose
// attributes include want.
func (l *logs) wait(t testing.TB, since int, msg string, want map[string]string) record {
	t.Helper()
	deadline := time.NewTimer(waitFor)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		for _, r := range l.records[since:] {
			if r.msg == msg && matches(r, want) {
				l.mu.Unlock()
				return r
			}
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("no log line %q with %v; got:\n%s", msg, want, l.dump())
		}
	}
}

func (l *logs) count(msg string, want map[string]string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, r := range l.records {
		if r.msg == msg && matches(r, want) {
			n++
		}
	}
	return n
}

func matches(r record, want map[string]string) bool {
	for k, v := range want {
		if r.attrs[k] != v {
			return false
		}
	}
	return true
}

func (l *logs) dump() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, r := range l.records {
		b.WriteString("  " + r.String() + "\n")
	}
	return b.String()
}

// --- the application behind the inbound listener ---------------------------

// app is a TCP server on loopback that records every connection it accepted
// and every byte it read, so tests can assert that nothing reached it.
type app struct {
	ln       net.Listener
	accepted atomic.Int64
	read     atomic.Int64
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    []net.Conn
}

// countingConn counts what the app reads.
type countingConn struct {
	net.Conn
	a *app
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.a.read.Add(int64(n))
	return n, err
}

// CloseWrite lets handlers half-close through the wrapper.
func (c countingConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

func newApp(t testing.TB, handle func(net.Conn)) *app {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &app{ln: ln}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.accepted.Add(1)
			a.mu.Lock()
			a.conns = append(a.conns, c)
			a.mu.Unlock()
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				defer c.Close()
				handle(countingConn{c, a})
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		a.mu.Lock()
		for _, c := range a.conns {
			c.Close()
		}
		a.mu.Unlock()
		a.wg.Wait()
	})
	return a
}

func (a *app) addr() string { return a.ln.Addr().String() }

// echo copies back what it reads and half-closes when the client did.
func echo(c net.Conn) {
	io.Copy(c, c)
	c.(interface{ CloseWrite() error }).CloseWrite()
}

// --- servers ---------------------------------------------------------------

// startServer applies cfg to a new Server and shuts it down at cleanup.
func startServer(t testing.TB, tlsc TLSConfigs, cfg *Config, opts Options) *Server {
	t.Helper()
	s := NewServer(tlsc, opts)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	if err := s.Apply(cfg); err != nil {
		t.Fatalf("apply: %v", err)
	}
	return s
}

func addrOf(t testing.TB, s *Server, name string) string {
	t.Helper()
	for _, l := range s.Listeners() {
		if l.Name == name {
			return l.Addr
		}
	}
	t.Fatalf("no listener %q", name)
	return ""
}

// mesh is the usual picture: a test client → outbound ("backend", with the
// frontend's identity) → inbound ("web", with the backend's identity) → app.
type mesh struct {
	ca       *identitytest.CA
	logs     *logs
	app      *app
	inbound  *Server
	outbound *Server
	inCfg    *Config
}

type meshOptions struct {
	inbound  func(*Inbound)
	outbound func(*Outbound)
	metrics  *Metrics
	profile  identity.Profile
	// drainTimeout is both servers' Options.DrainTimeout (0: the default).
	drainTimeout time.Duration
	// noResumption is the outbound server's
	// Options.DisableSessionResumption.
	noResumption bool
}

func newMesh(t testing.TB, handle func(net.Conn), mo meshOptions) *mesh {
	t.Helper()
	ca := identitytest.NewCA(t, trustDomain)
	return newMeshWith(t, handle, mo, identity.NewTLS(ca.Source(t, backendID)), identity.NewTLS(ca.Source(t, frontendID)), ca)
}

func newMeshWith(t testing.TB, handle func(net.Conn), mo meshOptions, backendTLS, frontendTLS TLSConfigs, ca *identitytest.CA) *mesh {
	t.Helper()
	m := &mesh{ca: ca, logs: newLogs()}
	m.app = newApp(t, handle)
	prof := mo.profile
	if prof.Name == "" {
		prof = identity.Modern()
	}
	in := Inbound{
		Name:   "web",
		Listen: "127.0.0.1:0",
		App:    m.app.addr(),
		Allow:  allowIDs(t, frontendID),
	}
	if mo.inbound != nil {
		mo.inbound(&in)
	}
	m.inCfg = &Config{Version: "in-1", Source: "test", TLS: prof, Inbound: []Inbound{in}}
	opts := Options{Logger: m.logs.logger(), Metrics: mo.metrics, DrainTimeout: mo.drainTimeout}
	m.inbound = startServer(t, backendTLS, m.inCfg, opts)
	out := Outbound{
		Name:      "backend",
		Listen:    "127.0.0.1:0",
		Upstreams: []string{addrOf(t, m.inbound, "web")},
		ServerID:  mustID(t, backendID),
	}
	if mo.outbound != nil {
		mo.outbound(&out)
	}
	opts.DisableSessionResumption = mo.noResumption
	m.outbound = startServer(t, frontendTLS, &Config{Version: "out-1", Source: "test", TLS: prof, Outbound: []Outbound{out}}, opts)
	return m
}

// dial connects a plain TCP client to the outbound listener, as the local
// app would.
func (m *mesh) dial(t testing.TB) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addrOf(t, m.outbound, "backend"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// dialInbound connects straight to the inbound listener as a peer sidecar
// with the given client configuration.
func (m *mesh) dialInbound(t testing.TB, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	raw, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	tc := tls.Client(raw, cfg)
	raw.SetDeadline(time.Now().Add(waitFor))
	err = tc.Handshake()
	raw.SetDeadline(time.Time{})
	return tc, err
}

// peerClient is the client configuration of a well-behaved sidecar with
// identity id, trusting the mesh CA and expecting the backend.
func (m *mesh) peerClient(t testing.TB, id string) *tls.Config {
	return identity.NewTLS(m.ca.Source(t, id)).ClientConfig(identity.Modern(), mustID(t, backendID))
}

// roundTrip writes msg and reads the same number of bytes back.
func roundTrip(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(waitFor))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("got %q, want %q", buf, msg)
	}
	return nil
}

// expectClosed reads until the connection ends and returns the error (io.EOF
// for a clean close).
func expectClosed(t testing.TB, c net.Conn) error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitFor))
	_, err := io.Copy(io.Discard, c)
	if err == nil {
		err = io.EOF
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("connection still open after %v", waitFor)
	}
	return err
}

// tlsDial connects to addr as a sidecar with the identity of tlsc, expecting
// the server to prove serverID.
func tlsDial(addr string, tlsc *identity.TLS, serverID string) (*tls.Conn, error) {
	id, err := spiffeid.FromString(serverID)
	if err != nil {
		return nil, err
	}
	d := &net.Dialer{Timeout: waitFor}
	return tls.DialWithDialer(d, "tcp", addr, tlsc.ClientConfig(identity.Modern(), id))
}
