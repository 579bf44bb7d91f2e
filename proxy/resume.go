package proxy

import (
	"crypto/tls"
	"time"
)

// guardResumption keeps a TLS session from being resumed when the peer
// certificate it holds could expire before the handshake completes.
//
// Go's TLS stack already declines to resume a session whose peer certificate
// has expired, but it checks at the start of the handshake, while latch's
// verification (identity, in VerifyConnection) checks again at its end
// against the current clock and bundle. A session resumed a moment before
// its certificate expires therefore fails verification instead of falling
// back to a full handshake: with short-lived SVIDs and steady traffic that
// happens at every expiry. Shifting the stack's clock forward by the
// handshake timeout makes its own check decline those sessions, so they get
// a full handshake with the peer's current SVID. The shift touches nothing
// else that matters: ticket ages and lifetimes are measured on the same
// shifted clock, Go does no certificate verification of its own on these
// configurations, and identity verifies with the real clock.
func guardResumption(c *tls.Config, margin time.Duration) *tls.Config {
	c = c.Clone() // never change a configuration someone else may hold
	c.Time = func() time.Time { return time.Now().Add(margin) }
	return c
}
