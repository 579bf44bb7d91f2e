package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/identitytest"
)

// TestPolicyChange applies a config that no longer allows the frontend: its
// live connection is closed and logged, its new connections are refused, and
// the newly allowed peer gets through, on the same socket.
func TestPolicyChange(t *testing.T) {
	m := newMesh(t, echo, meshOptions{})
	addr := addrOf(t, m.inbound, "web")

	live, err := m.dialInbound(t, m.peerClient(t, frontendID))
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(live, "before"); err != nil {
		t.Fatal(err)
	}
	if c, err := m.dialInbound(t, m.peerClient(t, otherID)); err == nil && roundTrip(c, "x") == nil {
		t.Fatal("other peer served before it was allowed")
	}

	mark := m.logs.mark()
	next := *m.inCfg
	next.Version = "in-2"
	next.Inbound = []Inbound{next.Inbound[0]}
	next.Inbound[0].Allow = allowIDs(t, otherID)
	if err := m.inbound.Apply(&next); err != nil {
		t.Fatal(err)
	}

	expectClosed(t, live)
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "web", "peer_id": frontendID, "reason": "policy_revoked"})

	c, err := m.dialInbound(t, m.peerClient(t, frontendID))
	if err == nil {
		err = roundTrip(c, "after")
	}
	if err == nil {
		t.Fatal("frontend served after the policy stopped allowing it")
	}
	m.logs.wait(t, mark, "handshake refused", map[string]string{"listener": "web", "peer_id": frontendID, "class": "not_allowed"})

	ok, err := m.dialInbound(t, m.peerClient(t, otherID))
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(ok, "newly allowed"); err != nil {
		t.Fatalf("newly allowed peer: %v", err)
	}
	if got := addrOf(t, m.inbound, "web"); got != addr {
		t.Errorf("unchanged listener moved from %s to %s", addr, got)
	}
	if v := m.inbound.Current().Version; v != "in-2" {
		t.Errorf("Current().Version = %q, want in-2", v)
	}
}

// TestOutboundServerIDChange: a live outbound connection to an upstream that
// is no longer the expected server is closed.
func TestOutboundServerIDChange(t *testing.T) {
	m := newMesh(t, echo, meshOptions{})
	c := m.dial(t)
	if err := roundTrip(c, "before"); err != nil {
		t.Fatal(err)
	}
	mark := m.logs.mark()
	cfg := *m.outbound.Current()
	cfg.Outbound = []Outbound{cfg.Outbound[0]}
	cfg.Outbound[0].ServerID = mustID(t, otherID)
	if err := m.outbound.Apply(&cfg); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c)
	m.logs.wait(t, mark, "connection closed", map[string]string{"listener": "backend", "reason": "server_id_changed"})
}

// TestApplyBindConflict: a config whose new listener cannot bind is refused
// as a whole, and the old config keeps serving.
func TestApplyBindConflict(t *testing.T) {
	m := newMesh(t, echo, meshOptions{})
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()

	next := *m.inCfg
	next.Version = "in-2"
	next.Inbound = append([]Inbound{
		{Name: "fresh", Listen: "127.0.0.1:0", App: m.app.addr(), Allow: allowIDs(t, frontendID)},
		{Name: "clash", Listen: taken.Addr().String(), App: m.app.addr(), Allow: allowIDs(t, frontendID)},
	}, next.Inbound[0])
	next.Inbound[2].Allow = identity.NewAllowList() // would deny everyone, if applied
	err = m.inbound.Apply(&next)
	if err == nil || !strings.Contains(err.Error(), `"clash"`) {
		t.Fatalf("Apply with a taken address: %v, want an error naming the listener", err)
	}
	if v := m.inbound.Current().Version; v != "in-1" {
		t.Fatalf("Current().Version = %q after a failed Apply, want in-1", v)
	}
	if ls := m.inbound.Listeners(); len(ls) != 1 || ls[0].Name != "web" {
		t.Fatalf("listeners after a failed Apply: %+v", ls)
	}
	if err := roundTrip(m.dial(t), "still served"); err != nil {
		t.Fatalf("old config after a failed Apply: %v", err)
	}
}

// TestListenerRemovedDrains: a listener dropped from the config stops
// accepting, while its live connection goes on until it ends; its limit is
// no longer published.
func TestListenerRemovedDrains(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newMesh(t, echo, meshOptions{metrics: NewMetrics(reg)})
	limitSeries := func() int {
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			if f.GetName() != "latch_listener_max_connections" {
				continue
			}
			n := 0
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "listener" && l.GetValue() == "web" {
						n++
					}
				}
			}
			return n
		}
		return 0
	}
	if n := limitSeries(); n != 1 {
		t.Fatalf("latch_listener_max_connections{listener=web} has %d series, want 1", n)
	}
	addr := addrOf(t, m.inbound, "web")
	live, err := m.dialInbound(t, m.peerClient(t, frontendID))
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(live, "established"); err != nil {
		t.Fatal(err)
	}
	if err := m.inbound.Apply(&Config{Version: "empty"}); err != nil {
		t.Fatal(err)
	}
	if ls := m.inbound.Listeners(); len(ls) != 0 {
		t.Fatalf("listeners after removal: %+v", ls)
	}
	if n := limitSeries(); n != 0 {
		t.Errorf("latch_listener_max_connections of a removed listener still published (%d series)", n)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("removed listener still accepts")
	}
	if err := roundTrip(live, "draining"); err != nil {
		t.Fatalf("live connection of a removed listener: %v", err)
	}
}

// TestApplyFile is what SIGHUP does: a good file is applied; a broken one is
// refused with its file and line, and the running config keeps serving.
func TestApplyFile(t *testing.T) {
	ca := identitytest.NewCA(t, trustDomain)
	a := newApp(t, echo)
	logs := newLogs()
	s := NewServer(identity.NewTLS(ca.Source(t, backendID)), Options{Logger: logs.logger()})
	t.Cleanup(func() { s.Shutdown(t.Context()) })

	path := filepath.Join(t.TempDir(), "latch.yaml")
	good := "inbound:\n  - name: web\n    listen: 127.0.0.1:0\n    app: " + a.addr() + "\n    allow:\n      - id: " + frontendID + "\n"
	if err := os.WriteFile(path, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := s.ApplyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Source != "file:"+path || len(cfg.Version) != 12 {
		t.Errorf("Source %q Version %q", cfg.Source, cfg.Version)
	}

	broken := good + "    idleTimeout: soon\n"
	if err := os.WriteFile(path, []byte(broken), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = s.ApplyFile(path)
	if err == nil || !strings.Contains(err.Error(), path+":7:18: inbound[0].idleTimeout") {
		t.Fatalf("ApplyFile(broken) = %v, want an error at %s:7:18", err, path)
	}
	if s.Current() != cfg {
		t.Fatal("a broken file replaced the running config")
	}
	c, err := tlsDial(addrOf(t, s, "web"), identity.NewTLS(ca.Source(t, frontendID)), backendID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c, "still served"); err != nil {
		t.Fatalf("after a broken reload: %v", err)
	}
}
