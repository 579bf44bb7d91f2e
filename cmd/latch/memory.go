package main

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// A sidecar's memory comes in bursts: handshakes, a config push, a flood of
// new connections. Go's collector lets the heap grow to twice the live data
// before collecting (GOGC=100) and its scavenger keeps what the heap may grow
// back into, so after a burst the process holds about twice what its idle
// connections need, for as long as it stays idle: which for a sidecar is
// most of the time. releaser gives that back once the burst is over, as
// Envoy's shrink-heap overload action does for its allocator.
//
// It costs one forced collection per burst, never more than one per tick,
// and none while traffic allocates steadily (then the heap is in use) or
// while nothing has been allocated since the last release.
//
// Start-up is the first burst, whatever its size: the first quiet tick
// releases.
type releaser struct {
	// burst is how much must have been allocated since the last release
	// for another to be worth a collection.
	burst uint64
	// quiet is the most that may be allocated during one tick for the
	// process to count as idle.
	quiet uint64

	allocated func() uint64 // bytes allocated since the process started
	release   func()

	// startedUp is set by the first release, the one that ends start-up.
	startedUp bool

	last      uint64 // allocated at the previous step
	atRelease uint64 // allocated right after the last release
}

const (
	releaseTick  = time.Second
	releaseBurst = 4 << 20
	releaseQuiet = 256 << 10
)

func newReleaser() *releaser {
	r := &releaser{burst: releaseBurst, quiet: releaseQuiet, allocated: heapAllocated, release: debug.FreeOSMemory}
	r.last = r.allocated()
	return r
}

// step looks at the allocations since the previous step and releases the
// free heap if a burst has ended. It reports whether it did.
func (r *releaser) step() bool {
	now := r.allocated()
	tick := now - r.last
	r.last = now
	if tick > r.quiet || (r.startedUp && now-r.atRelease < r.burst) {
		return false
	}
	r.release()
	r.startedUp = true
	r.atRelease = r.allocated()
	r.last = r.atRelease
	return true
}

// run steps every tick until ctx ends.
func (r *releaser) run(ctx context.Context, tick time.Duration) error {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			r.step()
		}
	}
}

var allocSample = []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}

// heapAllocated is the cumulative count of heap bytes allocated. Only run
// reads it, from one goroutine, so the shared sample slice is safe.
func heapAllocated() uint64 {
	metrics.Read(allocSample)
	return allocSample[0].Value.Uint64()
}
