package admin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// TestEndpointKind marks a document as written by a latch TLS test endpoint,
// so latch check can tell it from whatever else a server may send.
const TestEndpointKind = "latch.dev/tls-test-endpoint/v1"

// TestEndpointReply is the one JSON document the test endpoint writes on
// every connection it accepts: what the server negotiated and presented, and
// whom it saw as the client.
type TestEndpointReply struct {
	Kind       string                  `json:"kind"`
	Connection identity.ConnectionInfo `json:"connection"`
}

// ServerTLS builds the server side of an mTLS connection; *identity.TLS
// implements it.
type ServerTLS interface {
	ServerConfig(p identity.Profile, authorize func(peer spiffeid.ID) error, opts ...identity.PeerOption) *tls.Config
}

// TestEndpointOptions configure a TestEndpoint.
type TestEndpointOptions struct {
	// Addr is the host:port to listen on. Required: the endpoint is for
	// peers, so it usually listens where they can reach it.
	Addr string
	// TLS builds the server configuration (certificate per handshake, peer
	// verification against the local trust bundle).
	TLS ServerTLS
	// Profile is the TLS profile to offer; the zero Profile means modern.
	// Offer the profile the real listeners use, so the test is honest.
	Profile identity.Profile
	// TrustDomain is the local trust domain.
	TrustDomain spiffeid.TrustDomain
	// FederatesWith, when set, returns the foreign trust domains whose
	// workloads are answered too, each verified against its own federated
	// bundle (a sidecar passes those of its inbound listeners). It is asked
	// at every handshake.
	FederatesWith func() []spiffeid.TrustDomain
	// Allow decides which clients get an answer. nil means every workload
	// of TrustDomain and of FederatesWith: the answer says nothing secret,
	// and a peer should be able to test before it is allowed on the real
	// listeners. An explicit empty list denies everyone, as everywhere in
	// latch.
	Allow *identity.AllowList
	// HandshakeTimeout bounds the handshake and the write; zero means 10s.
	HandshakeTimeout time.Duration
	// MaxConnections bounds concurrent connections; zero means 64.
	MaxConnections int
	// Registerer, when set, receives latch_test_endpoint_connections_total.
	Registerer prometheus.Registerer
	// Logger gets one line per connection; nil means slog.Default().
	Logger *slog.Logger
}

// MetricTestEndpointConnections counts test endpoint connections by result.
const MetricTestEndpointConnections = "latch_test_endpoint_connections_total"

// TestEndpoint is the TLS test endpoint: an mTLS listener that answers every
// accepted connection with a TestEndpointReply and closes it. It never
// forwards anything anywhere.
type TestEndpoint struct {
	opts      TestEndpointOptions
	ln        net.Listener
	log       *slog.Logger
	authorize func(spiffeid.ID) error
	results   *prometheus.CounterVec
}

// ListenTestEndpoint binds the test endpoint; Serve answers connections.
func ListenTestEndpoint(opts TestEndpointOptions) (*TestEndpoint, error) {
	if opts.Addr == "" {
		return nil, errors.New("tls test endpoint: no listen address")
	}
	if opts.TLS == nil {
		return nil, errors.New("tls test endpoint: no TLS configuration")
	}
	if opts.TrustDomain.IsZero() && opts.Allow == nil {
		return nil, errors.New("tls test endpoint: no trust domain and no allow-list")
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = 64
	}
	authorize := func(id spiffeid.ID) error {
		if id.TrustDomain() == opts.TrustDomain || opts.FederatesWith != nil && slices.Contains(opts.FederatesWith(), id.TrustDomain()) {
			return nil
		}
		return fmt.Errorf("peer %s: %w (the test endpoint answers workloads of %s and of the trust domains it federates with)", id, identity.ErrNotAllowed, opts.TrustDomain.Name())
	}
	if opts.Allow != nil {
		authorize = opts.Allow.Authorize
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	e := &TestEndpoint{
		opts:      opts,
		log:       log.With("listener", "tls-test-endpoint"),
		authorize: authorize,
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricTestEndpointConnections,
			Help: "Connections to the TLS test endpoint, by result (ok or the handshake failure class).",
		}, []string{"result"}),
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(e.results); err != nil {
			return nil, fmt.Errorf("tls test endpoint: register metrics: %w", err)
		}
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("tls test endpoint: listen on %s: %w", opts.Addr, err)
	}
	e.ln = ln
	return e, nil
}

// Addr is the bound address.
func (e *TestEndpoint) Addr() net.Addr { return e.ln.Addr() }

// Serve answers connections until ctx is done, then closes the listener and
// waits for the connections in progress (each bounded by HandshakeTimeout).
func (e *TestEndpoint) Serve(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { e.ln.Close() })
	defer stop()
	defer e.ln.Close()
	e.log.Info("tls test endpoint listening", "addr", e.ln.Addr().String())

	// The slot is taken before Accept, so a flood waits in the kernel's
	// backlog instead of in goroutines.
	slots := make(chan struct{}, e.opts.MaxConnections)
	backoff := 5 * time.Millisecond
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		conn, err := e.ln.Accept()
		if err != nil {
			<-slots
			if ctx.Err() != nil {
				return nil
			}
			if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				e.log.Warn("accept failed; backing off", "reason", err.Error(), "backoff", backoff.String())
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
					return nil
				}
				backoff = min(2*backoff, time.Second)
				continue
			}
			return fmt.Errorf("tls test endpoint: accept on %s: %w", e.ln.Addr(), err)
		}
		backoff = 5 * time.Millisecond
		wg.Go(func() {
			defer func() { <-slots }()
			e.answer(ctx, conn)
		})
	}
}

// answer completes the handshake on conn, writes the reply and closes it.
func (e *TestEndpoint) answer(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	remote := conn.RemoteAddr().String()
	deadline := time.Now().Add(e.opts.HandshakeTimeout)
	_ = conn.SetDeadline(deadline)

	// A per-connection clone records the certificate actually served, so
	// the reply describes this handshake even if the SVID rotates meanwhile.
	var fed []identity.PeerOption
	if e.opts.FederatesWith != nil {
		fed = append(fed, identity.FederatesWithFunc(e.opts.FederatesWith))
	}
	cfg := e.opts.TLS.ServerConfig(e.opts.Profile, e.authorize, fed...).Clone()
	var served *x509.Certificate
	getCert := cfg.GetCertificate
	cfg.GetCertificate = func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
		c, err := getCert(hi)
		if err == nil && c != nil {
			served = c.Leaf
			if served == nil && len(c.Certificate) > 0 {
				served, _ = x509.ParseCertificate(c.Certificate[0])
			}
		}
		return c, err
	}
	tc := tls.Server(conn, cfg)
	hctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		class := identity.ClassOf(err)
		e.results.WithLabelValues(string(class)).Inc()
		e.log.Info("tls test endpoint: handshake failed", "remote_addr", remote, "class", string(class), "reason", err.Error())
		return
	}
	cs := tc.ConnectionState()
	reply := TestEndpointReply{Kind: TestEndpointKind, Connection: identity.DescribeConnectionLocal(cs, true, served)}
	b, err := json.Marshal(reply)
	if err != nil {
		e.log.Error("tls test endpoint: encode reply", "reason", err.Error())
		return
	}
	if _, err := tc.Write(append(b, '\n')); err != nil {
		e.results.WithLabelValues("write_failed").Inc()
		e.log.Info("tls test endpoint: write failed", "remote_addr", remote, "peer_id", reply.Connection.ClientSPIFFEID, "reason", err.Error())
		return
	}
	e.results.WithLabelValues("ok").Inc()
	e.log.Info("tls test endpoint: answered", "remote_addr", remote, "peer_id", reply.Connection.ClientSPIFFEID, "peer_bundle", reply.Connection.ClientBundle,
		"version", reply.Connection.Version, "cipher_suite", reply.Connection.CipherSuite, "group", reply.Connection.KeyExchangeGroup)
	// close_notify, so the client reads the reply to its end.
	_ = tc.CloseWrite()
}
