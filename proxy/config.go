package proxy

import (
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// Config is one complete, immutable snapshot of what the data plane serves.
// It is built once (from a file or from xDS), validated, then handed to the
// Server, which swaps it in atomically. Nothing mutates a Config after that.
type Config struct {
	// Version identifies the snapshot in logs and status (a file hash, an xDS
	// version).
	Version string
	// Source says where the snapshot came from ("file:/etc/latch.yaml", "xds").
	Source string
	// TLS is the profile every listener is held to.
	TLS      identity.Profile
	Inbound  []Inbound
	Outbound []Outbound
}

// InboundFederation lists, in order of appearance and each once, the
// foreign trust domains some inbound listener of c federates with: whose
// workloads may call this sidecar at all. The TLS test endpoint answers them
// too, so a federated peer can test before it is allowed. A nil Config
// federates with none.
func (c *Config) InboundFederation() []spiffeid.TrustDomain {
	if c == nil {
		return nil
	}
	var out []spiffeid.TrustDomain
	for _, in := range c.Inbound {
		for _, td := range in.FederatesWith {
			if !slices.Contains(out, td) {
				out = append(out, td)
			}
		}
	}
	return out
}

// Inbound terminates mTLS from peers and forwards plain TCP to the app.
type Inbound struct {
	// Name is unique among all listeners of a Config and stable across
	// snapshots: a listener keeps its socket while its Name and Listen do not
	// change.
	Name string
	// Listen is the host:port the sidecar accepts peers on.
	Listen string
	// App is the host:port of the local application.
	App string
	// Allow decides which peer SPIFFE IDs may connect. Empty denies all.
	Allow identity.AllowList
	// ProxyProtocol makes the sidecar send the app a PROXY protocol v2
	// header before the first byte of each connection: the peer's address,
	// its SPIFFE ID, its leaf certificate's SHA-256 and the TLS parameters
	// (see proxyHeader). Off, the app gets the peer's bytes and nothing else:
	// an app that does not parse the header would take it for data.
	ProxyProtocol bool
	// FederatesWith lists the foreign trust domains whose peers this
	// listener accepts besides the local one (default none). Each peer is
	// verified against the federated bundle of the trust domain its own ID
	// names; Allow still decides which of those IDs may connect.
	FederatesWith []spiffeid.TrustDomain
	// Timeouts and limits; zero means the package default.
	HandshakeTimeout time.Duration
	IdleTimeout      time.Duration
	ConnectTimeout   time.Duration
	MaxConnections   int
}

// Outbound accepts plain TCP from the local app on loopback and originates
// mTLS to an upstream that must prove ServerID.
type Outbound struct {
	Name string
	// Listen must be a loopback address: an outbound listener reachable from
	// the network would be an open relay into the mesh.
	Listen string
	// Upstreams are host:port endpoints, tried in order until one connects.
	Upstreams []string
	// ServerID is the SPIFFE ID the upstream must present.
	ServerID spiffeid.ID
	// FederatesWith lists the foreign trust domains whose servers this
	// listener accepts besides the local one (default none): ServerID may
	// name an ID in one of them, and is then verified against that trust
	// domain's federated bundle.
	FederatesWith []spiffeid.TrustDomain
	// DisableSessionResumption makes every connection of the listener a
	// full handshake: no TLS session is kept for the upstream and none is
	// offered. Resumption is on by default; a resumed session is held to the
	// current bundle, clock and server ID like a full handshake, and saves
	// the upstream's certificate verification, not the key exchange.
	DisableSessionResumption bool
	HandshakeTimeout         time.Duration
	IdleTimeout              time.Duration
	ConnectTimeout           time.Duration
	MaxConnections           int
}

// Defaults applied where a listener leaves a field zero.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultIdleTimeout      = time.Hour
	DefaultConnectTimeout   = 5 * time.Second
	DefaultMaxConnections   = 10000
)
