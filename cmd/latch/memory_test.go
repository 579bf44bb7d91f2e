package main

import (
	"runtime"
	"testing"
)

// TestReleaserReleasesOnceABurstIsOver drives the release decision tick by
// tick with a fake allocation counter: a release after a burst once a tick
// is quiet, never while allocation goes on, never twice for one burst.
func TestReleaserReleasesOnceABurstIsOver(t *testing.T) {
	var total uint64
	r, releases := fakeReleaser(&total)

	steps := []struct {
		name    string
		alloc   uint64 // allocated during the tick
		release bool
	}{
		{"start-up burst still going", 12 * MB, false},
		{"start-up burst over", 0, true},
		{"idle after the release", 0, false},
		{"idle, a trickle", 100 << 10, false},
		{"handshake flood", 8 * MB, false},
		{"flood goes on", 8 * MB, false},
		{"flood over, a trickle below quiet", 200 << 10, true},
		{"idle", 0, false},
		{"steady traffic that allocates", 2 * MB, false},
		{"steady traffic that allocates", 2 * MB, false},
		{"steady traffic that allocates", 2 * MB, false},
		{"traffic stops", 0, true},
		{"bulk copying allocates nothing", 0, false},
		{"bulk copying allocates nothing", 0, false},
	}
	for i, s := range steps {
		total += s.alloc
		before := *releases
		got := r.step()
		if got != s.release || *releases-before != map[bool]int{false: 0, true: 1}[s.release] {
			t.Fatalf("tick %d (%s): released %v (%d calls), want %v", i, s.name, got, *releases-before, s.release)
		}
	}

	// A trickle that stays below quiet adds up to a burst and is released
	// once it has: quiet ticks are not a reason to keep garbage forever.
	for i := 0; ; i++ {
		total += 200 << 10
		if r.step() {
			if i < 4*MB/(200<<10)-1 {
				t.Fatalf("released after %d ticks of trickle, before a burst's worth", i+1)
			}
			break
		}
		if i > 4*MB/(200<<10)+1 {
			t.Fatal("a burst's worth of trickle never released")
		}
	}
}

const MB = 1 << 20

// fakeReleaser is a releaser with the production thresholds' shape (4 MiB
// burst, 256 KiB quiet) over a fake allocation counter, counting its
// releases.
func fakeReleaser(total *uint64) (r *releaser, releases *int) {
	releases = new(int)
	r = &releaser{burst: 4 * MB, quiet: MB / 4,
		allocated: func() uint64 { return *total },
		release:   func() { *releases++; *total += 1024 }, // the collection allocates a little itself
	}
	r.last = r.allocated()
	return r, releases
}

// TestHeapAllocatedCounts: the counter the releaser reads moves with real
// allocations (a runtime metric name that stopped existing would read 0).
func TestHeapAllocatedCounts(t *testing.T) {
	before := heapAllocated()
	sink := make([][]byte, 0, 64)
	for range 64 {
		sink = append(sink, make([]byte, 64<<10))
	}
	runtime.KeepAlive(sink)
	if got := heapAllocated() - before; got < 4<<20 {
		t.Fatalf("heapAllocated grew by %d bytes after allocating 4 MiB", got)
	}
}

// TestReleaserStartupIsABurstOfAnySize: the first quiet tick after start
// releases even when start-up allocated less than a burst (a sidecar with a
// small config), and not before start-up has gone quiet.
func TestReleaserStartupIsABurstOfAnySize(t *testing.T) {
	var total uint64
	r, releases := fakeReleaser(&total)
	for i, alloc := range []uint64{MB, MB / 2} { // start-up still allocating
		total += alloc
		if r.step() {
			t.Fatalf("tick %d: released while start-up allocates %d bytes per tick", i, alloc)
		}
	}
	total += 10 << 10 // quiet, 1.5 MiB in all: below a burst
	if !r.step() || *releases != 1 {
		t.Fatalf("first quiet tick: %d releases, want 1", *releases)
	}
	for range 3 {
		if r.step() {
			t.Fatal("released again with nothing allocated")
		}
	}
	total += 5 * MB
	r.step() // the burst's own tick: not quiet
	if !r.step() || *releases != 2 {
		t.Fatalf("after a later burst: %d releases, want 2", *releases)
	}
}
