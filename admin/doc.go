// Package admin is what an operator of a latch daemon talks to: a small HTTP
// server on loopback with /healthz, /readyz, /metrics, /status and (only when
// asked for) pprof; the identity monitor that exports how long the SVID and
// every bundle CA have left and warns before either runs out or when the
// bundle rolls over; and the optional TLS test endpoint, an mTLS listener that
// answers every connection with one JSON document describing what was just
// negotiated, so a peer can test its trust store against a new certificate or
// CA before the switch (the practice of announced rollovers).
//
// The package holds building blocks; cmd/latch wires them into each daemon
// with the parts' own readiness and status functions.
package admin
