package identity

import "time"

// ChainCacheHits is how many peer chains were accepted from the cache.
func ChainCacheHits(t *TLS) uint64 { return t.chains.hits.Load() }

// SetClock replaces the clock peers are verified at. Call it before any
// handshake.
func SetClock(t *TLS, now func() time.Time) { t.now = now }
