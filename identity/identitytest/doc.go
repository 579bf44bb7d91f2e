// Package identitytest mints throwaway certificate authorities, SPIFFE
// X.509-SVIDs and deliberately broken certificates for tests, and provides a
// Source whose SVID and bundles can be swapped while handshakes run.
//
// It exists so that every hostile certificate latch must refuse (expired, not
// yet valid, no or two URI SANs, a CA certificate used as a leaf, wrong key
// usage, another CA or trust domain) can be built in one line, without a
// Workload API. It is meant for _test.go files only; nothing in it is fit for
// production: keys live in memory and are never protected.
package identitytest
