package freeport

import (
	"net"
	"strconv"
	"sync"
	"testing"
)

func listen(port int) (net.Listener, error) {
	return net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
}

// Ports handed out at once are distinct, below the ephemeral range, and
// bindable by whoever asked.
func TestPortDistinctBelowEphemeralAndBindable(t *testing.T) {
	if ephemeralLow() <= floor {
		t.Skip("no room below this machine's ephemeral range")
	}
	var (
		mu   sync.Mutex
		seen = map[int]bool{}
		wg   sync.WaitGroup
	)
	for range 8 {
		wg.Go(func() {
			for range 25 {
				p, err := Port()
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				dup := seen[p]
				seen[p] = true
				mu.Unlock()
				if dup {
					t.Errorf("port %d handed out twice", p)
				}
				if p < floor || p >= ephemeralLow() {
					t.Errorf("port %d outside [%d, %d)", p, floor, ephemeralLow())
				}
				ln, err := listen(p)
				if err != nil {
					t.Errorf("binding the port handed out: %v", err)
					continue
				}
				ln.Close()
			}
		})
	}
	wg.Wait()
}

// A port somebody listens on is passed over.
func TestPortSkipsPortsInUse(t *testing.T) {
	if ephemeralLow() <= floor {
		t.Skip("no room below this machine's ephemeral range")
	}
	first, err := Port()
	if err != nil {
		t.Fatal(err)
	}
	// Take the port that would come next, then ask.
	busy := first + 1
	if busy >= ephemeralLow() {
		busy = floor
	}
	ln, err := listen(busy)
	if err != nil {
		t.Skipf("port %d taken by someone else already: %v", busy, err)
	}
	defer ln.Close()
	got, err := Port()
	if err != nil {
		t.Fatal(err)
	}
	if got == busy {
		t.Fatalf("Port handed out %d, which is being listened on", got)
	}
}

// Addr is a loopback address the caller can bind.
func TestAddrBindable(t *testing.T) {
	addr, err := Addr()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("binding %s: %v", addr, err)
	}
	if got := ln.Addr().String(); got != addr {
		t.Errorf("bound %s, Addr said %s", got, addr)
	}
	ln.Close()
}
