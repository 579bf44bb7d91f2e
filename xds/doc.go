// Package xds groups latch's policy-over-xDS parts, one subpackage per step of
// the flow: policy (the ServicePolicy declarations service owners write),
// translate (declarations → Envoy v3 resources, a pure function), server (the
// control plane that serves those resources over ADS to each sidecar, keyed by
// the SPIFFE ID the sidecar proved) and client (the sidecar's ADS client, which
// validates every resource against the subset latch implements and turns it
// into an immutable proxy.Config).
package xds
