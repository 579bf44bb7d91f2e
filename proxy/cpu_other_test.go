//go:build !unix

package proxy

import (
	"testing"
	"time"
)

// processCPU has no portable source outside Unix: the benchmarks' CPU
// figures read zero there, their throughput and allocations do not.
func processCPU(*testing.B) time.Duration { return 0 }
