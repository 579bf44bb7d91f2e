package proxy

import (
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"latch.dev/latch/identity"
)

// flakyListener fails its first Accepts (as a listener out of file
// descriptors would), then blocks until closed.
type flakyListener struct {
	net.Listener
	mu       sync.Mutex
	failures int
	closed   chan struct{}
	once     sync.Once
}

func (f *flakyListener) Accept() (net.Conn, error) {
	f.mu.Lock()
	if f.failures > 0 {
		f.failures--
		f.mu.Unlock()
		return nil, errors.New("accept: too many open files")
	}
	f.mu.Unlock()
	<-f.closed
	return nil, net.ErrClosed
}

func (f *flakyListener) Close() error {
	f.once.Do(func() { close(f.closed) })
	return f.Listener.Close()
}

// TestAcceptErrorsBackOff: a failing Accept is retried after a growing
// pause, not in a busy loop, and the loop still ends when the listener
// closes.
func TestAcceptErrorsBackOff(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := newLogs()
	s := NewServer(stubTLS{}, Options{Logger: logs.logger()})
	fl := &flakyListener{Listener: inner, failures: 3, closed: make(chan struct{})}
	l := s.newListener(&route{name: "flaky", dir: DirectionInbound, maxConns: 1}, fl)
	s.wg.Add(1)
	start := time.Now()
	go l.acceptLoop()
	logs.wait(t, 0, "accept failed, backing off", map[string]string{"backoff": "20ms"})
	if el := time.Since(start); el < 15*time.Millisecond {
		t.Errorf("three failed accepts retried within %v: no backoff", el)
	}
	for _, want := range []string{"5ms", "10ms", "20ms"} {
		if logs.count("accept failed, backing off", map[string]string{"backoff": want}) != 1 {
			t.Errorf("no backoff of %s; log:\n%s", want, logs.dump())
		}
	}
	l.stopAccepting()
	s.wg.Wait()
}

// TestRemovedListenerDrainTimeout: the live connections of a removed
// listener are closed (reason drain) once the drain timeout has passed.
func TestRemovedListenerDrainTimeout(t *testing.T) {
	m := newMesh(t, echo, meshOptions{})
	// A second inbound server, with a short drain timeout.
	logs := newLogs()
	cfg := *m.inCfg
	s := startServer(t, m.inbound.tlsc, &cfg, Options{Logger: logs.logger(), DrainTimeout: 200 * time.Millisecond})
	c, err := tlsDial(addrOf(t, s, "web"), identity.NewTLS(m.ca.Source(t, frontendID)), backendID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c, "established"); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(&Config{Version: "empty"}); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c)
	logs.wait(t, 0, "connection closed", map[string]string{"listener": "web", "reason": "drain"})
}

// TestUpstreamUnreachable: an app that is down costs the peer its
// connection (reason upstream_unreachable) and counts a connect failure.
func TestUpstreamUnreachable(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	m := newMesh(t, echo, meshOptions{metrics: NewMetrics(nil), inbound: func(in *Inbound) { in.App = deadAddr }})
	c := m.dial(t)
	c.Write([]byte("anyone?"))
	expectClosed(t, c)
	m.logs.wait(t, 0, "connection closed", map[string]string{"listener": "web", "reason": "upstream_unreachable", "peer_id": frontendID})
	if n := metricValue(t, m.inbound.metrics.connectFailures.WithLabelValues("web", "inbound")); n != 1 {
		t.Errorf("latch_upstream_connect_failures_total = %v, want 1", n)
	}
}

// TestOutboundFailover: upstreams are tried in order; a dead first one
// costs a connect failure, not the connection.
func TestOutboundFailover(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	m := newMesh(t, echo, meshOptions{outbound: func(out *Outbound) {
		out.Upstreams = append([]string{deadAddr}, out.Upstreams...)
	}})
	if err := roundTrip(m.dial(t), "via the second upstream"); err != nil {
		t.Fatal(err)
	}
	m.logs.wait(t, 0, "connecting to upstream failed", map[string]string{"listener": "backend", "remote_addr": deadAddr})
}
