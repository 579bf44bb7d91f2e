// Package reliability holds latch's reliability and hostile-input suite: load
// (thousands of concurrent proxied connections, floods past the connection
// limit, slow readers), faults (app down, upstream resets, Workload API
// outage, drain under load), a ClientHello fuzzer thrown at an inbound port,
// an independent TLS scanner (sslscan), and a soak run with SVID rotation, a
// CA rollover and policy changes.
//
// Everything runs over real sockets on 127.0.0.1 with real mTLS: sidecars are
// proxy.Servers in the test process, their identities come from a
// development CA (identity/devca) through the real SPIFFE Workload API.
//
// The package has no non-test code. Run it with
//
//	go test ./reliability -run . -v -args -summary
//
// which prints the figures table at the end. -reliability.full (or
// LATCH_FULL=1) raises the load to 10,000 concurrent connections; LATCH_SOAK=10m
// lengthens the soak. See docs/security.md.
package reliability
