// Package server is latch's control plane: it serves the Envoy resources
// translated from the declarations to sidecars over ADS (state-of-the-world
// and delta) with go-control-plane's snapshot cache, one snapshot per node,
// versioned by content hash.
//
// The node ID is the sidecar's SPIFFE ID, and the server holds every stream
// to the ID the client's certificate proved: a request for any other node is
// refused with PermissionDenied and logged, so a workload can only learn its
// own policy. The server keeps no state of its own, so replicas fed the same
// declarations agree.
package server
