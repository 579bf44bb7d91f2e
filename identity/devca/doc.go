// Package devca is a DEVELOPMENT CA — NOT FOR PRODUCTION: an in-memory SPIFFE
// identity provider for latch's tests and for `latch demo`.
//
// It stands in for a SPIRE agent. A CA holds its signing keys in memory only
// (ECDSA P-256, never written anywhere), issues short-lived X.509-SVIDs that
// follow the SPIFFE X509-SVID specification, and serves them through a real gRPC
// SPIFFE Workload API server (the go-spiffe `workload` protobuf service), so the
// code under test talks to it exactly as it would talk to SPIRE: through
// workloadapi.X509Source and a "unix://" socket address.
//
// Workloads are told apart by socket: AddWorkload registers one SPIFFE ID and
// returns the address of a unix socket that serves that identity and no other.
// That is simpler and sturdier than attesting callers by peer credentials, and it
// is enough for a development tool where every "workload" is a goroutine or a
// child process of the same user.
//
// Identities change the way they do in production, only faster, so rotation and
// trust rollover can be tested end to end:
//
//   - every SVID is re-issued after RotateEvery (by default half its lifetime) and
//     pushed to every connected FetchX509SVID stream; RotateNow forces it;
//   - the CA rolls over with overlap: a new CA is first published in the bundle
//     (pending), starts signing only after an overlap (active), and the old CA
//     stays in the bundle (retired) until the last SVID it signed has expired.
//     So at every instant, every unexpired SVID verifies against the bundle every
//     workload holds, which is what makes a rollover cost zero failed handshakes.
//
// Each step is observable through Subscribe (events) and Status (the authorities
// in the bundle, which one signs, and each workload's current SVID).
//
// Nothing here is hardened for production use: there is no attestation, no
// persistence, no revocation, and the CA is as trustworthy as the process memory
// it lives in. Every log line carries devca=true so nobody mistakes it for the
// real thing.
package devca
