package client_test

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity/identitytest"
	"latch.dev/latch/xds/client"
)

// service stands for a Kubernetes Service in front of the control plane's
// replicas: one address, each new connection sent to one of the replicas
// (in turn here, at random in kube-proxy). A replica is taken out when it
// dies, as its endpoint is once its pod is gone; a connection to a dead
// replica is closed, as a connection to a pod that is gone fails.
type service struct {
	lis net.Listener

	mu       sync.Mutex
	replicas []string
	next     int
	conns    map[net.Conn]bool
	wg       sync.WaitGroup
}

func startService(t *testing.T, replicas ...string) *service {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &service{lis: lis, replicas: replicas, conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(func() {
		lis.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *service) addr() string { return s.lis.Addr().String() }

func (s *service) setReplicas(replicas ...string) {
	s.mu.Lock()
	s.replicas = replicas
	s.mu.Unlock()
}

func (s *service) serve() {
	defer s.wg.Done()
	for {
		c, err := s.lis.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		var to string
		if len(s.replicas) > 0 {
			to = s.replicas[s.next%len(s.replicas)]
			s.next++
		}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			if to == "" {
				return
			}
			up, err := net.Dial("tcp", to)
			if err != nil {
				return
			}
			defer up.Close()
			s.track(c, up)
			defer s.untrack(c, up)
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
			go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
			<-done
		}()
	}
}

func (s *service) track(cs ...net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range cs {
		s.conns[c] = true
	}
}

func (s *service) untrack(cs ...net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range cs {
		delete(s.conns, c)
	}
}

// TestReplicaFailover: two control-plane replicas serve the same
// declarations behind one Service address. Sidecars spread over both; when
// one replica dies, the sidecars it served reconnect (backoff with jitter)
// and land on the other, which serves them the same version: nothing is
// applied again, nothing is refused. With no replica answering, every
// sidecar keeps its last good configuration, and picks up the first replica
// back.
func TestReplicaFailover(t *testing.T) {
	eachProtocol(t, func(t *testing.T, p client.Protocol) {
		ca := identitytest.NewCA(t, "mesh.test")
		dir := t.TempDir()
		const n = 6
		ids := make([]spiffeid.ID, n)
		for i := range n {
			ids[i] = spiffeid.RequireFromString(fmt.Sprintf("spiffe://mesh.test/s%d", i))
			writeFile(t, dir, fmt.Sprintf("s%d.yaml", i), declaration(ids[i], 15000+i, frontend.String()))
		}
		a := startControlPlane(t, ca, dir, "127.0.0.1:0")
		b := startControlPlane(t, ca, dir, "127.0.0.1:0")
		svc := startService(t, a.addr, b.addr)

		sidecars := make([]*sidecar, n)
		versions := make([]string, n)
		for i := range n {
			sidecars[i] = startSidecar(t, sidecarOptsFor(t, p, ca, svc.addr(), ids[i]))
			cfg := sidecars[i].next(t)
			versions[i] = cfg.Version
			if v := b.srv.Version(ids[i].String()); v != cfg.Version || a.srv.Version(ids[i].String()) != v {
				t.Fatalf("replicas serve %s versions %q and %q, the sidecar got %q: same declarations must give the same version", ids[i], a.srv.Version(ids[i].String()), v, cfg.Version)
			}
		}
		onA, onB := a.srv.Connected(), b.srv.Connected()
		if onA == 0 || onB == 0 || onA+onB != n {
			t.Fatalf("streams: %d on one replica, %d on the other; want them spread", onA, onB)
		}

		// One replica dies; its endpoint leaves the Service.
		start := time.Now()
		a.stop()
		svc.setReplicas(b.addr)
		waitFor(t, "every sidecar on the surviving replica", func() bool { return b.srv.Connected() == n })
		for i, sc := range sidecars {
			waitFor(t, "the moved sidecar's ACK", func() bool {
				acks := b.srv.Acks()
				for _, ack := range acks {
					if ack.Node == ids[i].String() {
						return ack.Acked == 1 && ack.Version == versions[i]
					}
				}
				return false
			})
			// LastError may name a failed attempt on the way (the dead
			// replica, before its endpoint left): connection errors, not
			// refusals, which the control plane would show.
			if st := sc.c.Status(); !st.Connected || st.AppliedVersion != versions[i] {
				t.Errorf("sidecar %d after the failover: %+v (version was %s)", i, st, versions[i])
			}
			if nack := b.srv.LastNACK(ids[i].String()); nack != "" {
				t.Errorf("sidecar %d NACKed on the surviving replica: %s", i, nack)
			}
		}
		for _, sc := range sidecars {
			sc.noneFor(t, 10*time.Millisecond) // the same version: nothing applied again
		}
		t.Logf("%d sidecars on the dying replica moved to the other in %v", onA, time.Since(start).Round(time.Millisecond))

		// No replica answers: every sidecar keeps what it runs.
		b.stop()
		svc.setReplicas()
		for _, sc := range sidecars {
			waitFor(t, "the sidecar to notice", func() bool { return !sc.c.Status().Connected })
		}
		for i, sc := range sidecars {
			sc.noneFor(t, 20*time.Millisecond)
			if st := sc.c.Status(); st.AppliedVersion != versions[i] {
				t.Errorf("sidecar %d with no control plane: %+v", i, st)
			}
		}
		// A replica comes back (on a new address, as a new pod would).
		c := startControlPlane(t, ca, dir, "127.0.0.1:0")
		svc.setReplicas(c.addr)
		waitFor(t, "every sidecar back", func() bool { return c.srv.Connected() == n })
		for i, sc := range sidecars {
			waitFor(t, "the sidecar connected", func() bool { return sc.c.Status().Connected })
			sc.noneFor(t, 10*time.Millisecond)
			if nack := c.srv.LastNACK(ids[i].String()); nack != "" || sc.c.Status().AppliedVersion != versions[i] {
				t.Errorf("sidecar %d after the outage: %+v, NACK %q", i, sc.c.Status(), nack)
			}
		}
	})
}
