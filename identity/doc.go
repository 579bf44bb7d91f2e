// Package identity holds everything latch knows about who is who: the X.509-SVID
// and trust bundles obtained from the SPIFFE Workload API, the TLS profile every
// connection is held to, peer verification against the bundle of the peer's own
// trust domain (the local one, or a federated one a configuration accepts), and
// authorization of peers by SPIFFE ID.
//
// The proxy consumes this package through two small values: a *tls.Config built
// per listener (certificates and bundles are looked up per handshake, so rotation
// needs no restart) and an AllowList that decides which peers may connect.
//
// # Verification
//
// TLS.ServerConfig and TLS.ClientConfig verify the peer in
// tls.Config.VerifyConnection, which Go runs on every handshake, resumed ones
// included, and whatever InsecureSkipVerify or ClientAuth say. Go's own
// certificate verification is switched off (ClientAuth RequireAnyClientCert on
// the server, InsecureSkipVerify on the client) because it knows web PKI, not
// SPIFFE; system roots are never consulted. The peer is refused unless:
//
//   - its leaf holds exactly one URI SAN, a SPIFFE ID with a workload path;
//   - that ID is in the trust domain of the local SVID, or in a foreign trust
//     domain the configuration federates with (FederatesWith); the bundle it
//     is verified against is the one of the trust domain its own ID names,
//     never another's, and a federated bundle holding a CA of the local
//     trust domain is refused whole (CheckFederatedBundle);
//   - the leaf is not a CA certificate, has digitalSignature and neither
//     keyCertSign nor cRLSign, and carries the extended key usage of its role
//     (clientAuth for a client, serverAuth for a server). The X509-SVID
//     specification makes the extended key usage a SHOULD; latch requires it,
//     as every SPIFFE issuer sets it;
//   - every further certificate it sent is a CA with keyCertSign, and the chain
//     verifies against the bundle current at this handshake, at the current time;
//   - the authorizer (server) allows the ID, or the ID is the expected server
//     ID (client).
//
// Session resumption stays on: a resumed session's peer is verified and
// authorized again, against the bundle, clock and policy of the moment, so a
// ticket never outlives the trust or permission it was issued under.
//
// Refusals are *VerifyError values with a Class; ClassOf also classifies what
// the other side of a refused handshake sees, for metrics and diagnosis.
package identity
