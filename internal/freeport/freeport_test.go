package freeport

import (
	"net"
	"strconv"
	"sync"
	"testing"
)

func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Ports handed out at once are distinct, below the ephemeral range, and
// bindable by whoever asked.
func TestAddrDistinctBelowEphemeralAndBindable(t *testing.T) {
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
				addr, err := Addr()
				if err != nil {
					t.Error(err)
					return
				}
				p := port(t, addr)
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
				ln, err := net.Listen("tcp", addr)
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
func TestAddrSkipsPortsInUse(t *testing.T) {
	if ephemeralLow() <= floor {
		t.Skip("no room below this machine's ephemeral range")
	}
	first, err := Addr()
	if err != nil {
		t.Fatal(err)
	}
	// Take the port that would come next, then ask.
	busy := port(t, first) + 1
	if busy >= ephemeralLow() {
		busy = floor
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(busy)))
	if err != nil {
		t.Skipf("port %d taken by someone else already: %v", busy, err)
	}
	defer ln.Close()
	got, err := Addr()
	if err != nil {
		t.Fatal(err)
	}
	if port(t, got) == busy {
		t.Fatalf("Addr handed out %s, which is being listened on", got)
	}
}
