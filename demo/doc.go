// Package demo runs a complete latch mesh on loopback: the development CA and
// its Workload API, an echo app, a server-side and a client-side sidecar, and
// an intruder whose identity is valid but not allowed. It is what `latch demo`
// runs and what the end-to-end demo test asserts; everything in it is the real
// code path (gRPC Workload API, real TLS, real sockets), only the CA is a
// throwaway — which is why none of this is for production.
package demo
