// Package proxy is latch's data plane: inbound listeners that terminate mTLS and
// forward plain TCP to the local app, and outbound listeners on loopback that
// originate mTLS to an upstream. It runs whatever immutable Config snapshot it
// was last given (from a static file or from xDS) and owns listener lifecycle,
// the copy loop, limits, timeouts and graceful drain.
package proxy
