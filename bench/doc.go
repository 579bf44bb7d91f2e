// Package bench is latch's side-by-side performance harness: it measures a
// latch sidecar pair against the same topology built from other proxies
// (HAProxy, nginx's stream module, stunnel) and against a direct connection,
// all on loopback, in one interleaved run.
//
// Every topology is the picture from the design, shrunk onto one machine:
//
//	load client → outbound proxy (plain in, mTLS out) → inbound proxy (mTLS in, plain out) → backend
//
// Each proxy runs as its own child process, so its resident memory
// (/proc/PID/smaps_rollup: RSS, its anonymous part and PSS, see Usage) and
// CPU time (/proc/PID/stat utime+stime) are counted per sidecar, the way a
// pod would see them. The load client and the backend live in this process.
// Identities come from an in-process identity/devca (a real Workload API
// server, one socket per sidecar); the peers read the same kind of
// certificates (ECDSA P-256, SPIFFE URI SAN) from PEM files in a temporary
// directory.
//
// The harness is a tool, not a test: CI never runs it (cmd/latch-bench does),
// and a peer that is not installed is skipped with a note. Everything it starts
// it stops, and its temporary directory is removed on the way out.
package bench
