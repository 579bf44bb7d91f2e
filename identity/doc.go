// Package identity holds everything latch knows about who is who: the X.509-SVID
// and trust bundle obtained from the SPIFFE Workload API, the TLS profile every
// connection is held to, peer verification against the local trust domain only,
// and authorization of peers by SPIFFE ID.
//
// The proxy consumes this package through two small values: a *tls.Config built
// per listener (certificates and bundles are looked up per handshake, so rotation
// needs no restart) and an AllowList that decides which peers may connect.
package identity
