// Package translate turns a ServicePolicy declaration into the Envoy v3
// resources its sidecar serves: an inbound Listener per port (mTLS with a
// DownstreamTlsContext that requires a client certificate, an RBAC ALLOW
// filter on the peer's SPIFFE ID, then tcp_proxy to a plain app cluster), and
// an outbound Listener on loopback per upstream (tcp_proxy to a Cluster whose
// UpstreamTlsContext names the server ID the upstream must prove), with the
// upstream's endpoints as a ClusterLoadAssignment.
//
// Secrets are referenced by SDS name following SPIRE's convention — the SVID
// by its SPIFFE ID, the bundle by spiffe://<trust-domain> — and never carried.
// Translate is pure: same declaration, same resources, same Hash, so control
// plane replicas agree on versions without talking to each other.
package translate
