//go:build linux

package proxy

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"
)

// threads is the number of OS threads of this process.
func threads(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range bytes.Lines(b) {
		if v, ok := bytes.CutPrefix(line, []byte("Threads:")); ok {
			n, err := strconv.Atoi(string(bytes.TrimSpace(v)))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}

// Many idle connections, each with a TLS record left half sent by the peer
// (the direction parked mid-record): the process's OS threads stay what they
// were with a few connections (the copy loop's raw system calls never block
// a thread, and parked directions wait in one epoll set per Server), and
// every connection still works afterwards.
func TestIdleConnectionsHoldNoThreads(t *testing.T) {
	const warm, many = 16, 400
	m := newMesh(t, echo, meshOptions{})
	cfg := m.peerClient(t, frontendID)
	type peer struct {
		raw  *net.TCPConn
		tc   *tls.Conn
		rest []byte // the end of a record not sent yet
	}
	open := func(n int) []*peer {
		ps := make([]*peer, n)
		var wg sync.WaitGroup
		sem := make(chan struct{}, 8)
		for i := range ps {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				raw, err := net.Dial("tcp", addrOf(t, m.inbound, "web"))
				if err != nil {
					t.Error(err)
					return
				}
				t.Cleanup(func() { raw.Close() })
				// Capture one record, send all but its last bytes.
				rec := &recordCatcher{TCPConn: raw.(*net.TCPConn)}
				tc := tls.Client(rec, cfg)
				if err := roundTrip(tc, "hello"); err != nil {
					t.Error(err)
					return
				}
				rec.catch = true
				if _, err := tc.Write([]byte("half")); err != nil {
					t.Error(err)
					return
				}
				if _, err := raw.Write(rec.caught[:len(rec.caught)-3]); err != nil {
					t.Error(err)
					return
				}
				ps[i] = &peer{raw: raw.(*net.TCPConn), tc: tc, rest: rec.caught[len(rec.caught)-3:]}
			})
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		return ps
	}
	parked := func(want int) func() bool {
		return func() bool { return m.inbound.parker.count() == want }
	}
	first := open(warm)
	until(t, "the first connections parked", parked(2*warm))
	before := threads(t)
	rest := open(many)
	until(t, "every connection parked", parked(2*(warm+many)))
	after := threads(t)
	t.Logf("%d threads with %d idle connections, %d with %d", before, warm, after, warm+many)
	if after > before+4 {
		t.Errorf("threads grew from %d to %d with %d more idle connections", before, after, many)
	}
	for i, p := range append(first, rest...) {
		if _, err := p.raw.Write(p.rest); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		got := make([]byte, 4)
		p.raw.SetReadDeadline(time.Now().Add(waitFor))
		if _, err := io.ReadFull(p.tc, got); err != nil || string(got) != "half" {
			t.Fatalf("connection %d: the record completed after parking came back as %q, %v", i, got, err)
		}
	}
}

// recordCatcher keeps what the TLS stack writes once catch is set, instead
// of sending it.
type recordCatcher struct {
	*net.TCPConn
	catch  bool
	caught []byte
}

func (c *recordCatcher) Write(p []byte) (int, error) {
	if c.catch {
		c.caught = append(c.caught, p...)
		return len(p), nil
	}
	return c.TCPConn.Write(p)
}
