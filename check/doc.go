// Package check is the logic of `latch check`: it connects to a TLS endpoint
// with the local workload's X.509-SVID, the way a latch sidecar would, and
// either reports what was negotiated (the JSON of a latch TLS test endpoint,
// or the same fields from the client's side for any other server) or names
// why it failed, as one Class with an exit code and a fix.
//
// Trust decisions are not made here: the client configuration comes from
// package identity, the same verifier every sidecar uses, so a check that
// passes means a sidecar's connection would pass. Scan is the exception: it
// asks which TLS versions, suites and groups a server accepts, one at a
// time, and needs no trust in the server to do so.
package check
