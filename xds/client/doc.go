// Package client is the sidecar's ADS client. It subscribes to listeners,
// clusters and endpoints over one mTLS gRPC stream to the control plane
// (delta xDS, falling back to state of the world against a control plane
// that does not implement it), validates every resource against Envoy's own
// rules and the subset of Envoy's v3 API latch implements, and turns a
// complete, valid set into an immutable proxy.Config that it hands to apply.
//
// Anything outside the subset that could change security — an unknown filter
// or field, TLS parameters wider than the profile, a plain listener off
// loopback, an RBAC policy that is not a pure ALLOW on peer SPIFFE IDs, a
// secret other than the workload's own — refuses (NACKs) the whole response
// with an error naming the resource and the field; the running configuration
// is untouched. Validation (validate.go, envoy.go) is kept apart from the
// stream logic (client.go, delta.go, sotw.go), as in grpc-go's xDS client.
//
// When the control plane is unreachable the last good configuration keeps
// running and the client reconnects with jittered exponential backoff; with
// a state directory the last applied resources survive a restart.
package client
