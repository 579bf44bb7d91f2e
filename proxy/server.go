package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/identity"
)

// TLSConfigs builds the tls.Configs of the data plane. *identity.TLS satisfies
// it: the configurations verify peers (and call authorize on the verified ID)
// inside the handshake, and pick the current SVID per handshake.
//
// LocalTrustDomain and TrustDomainUsable tell the Server which peers a
// federation change or a bundle's removal leaves without trust, so that it
// can cut their live connections.
type TLSConfigs interface {
	ServerConfig(p identity.Profile, authorize func(peer spiffeid.ID) error, opts ...identity.PeerOption) *tls.Config
	ClientConfig(p identity.Profile, serverID spiffeid.ID, opts ...identity.PeerOption) *tls.Config
	LocalTrustDomain() (spiffeid.TrustDomain, error)
	TrustDomainUsable(td spiffeid.TrustDomain) error
}

var _ TLSConfigs = (*identity.TLS)(nil)

// Direction says which way a listener carries traffic.
type Direction string

// Directions, also the "direction" label and log field.
const (
	DirectionInbound  Direction = "inbound"
	DirectionOutbound Direction = "outbound"
)

// DefaultDrainTimeout is how long connections of a listener removed by Apply
// may go on before they are closed, when Options.DrainTimeout is zero.
const DefaultDrainTimeout = 30 * time.Second

// ErrServerClosed is returned by Apply after Shutdown.
var ErrServerClosed = errors.New("proxy: server shut down")

// Options configures a Server. The zero value works: logs are discarded,
// metrics are off, removed listeners drain for DefaultDrainTimeout.
type Options struct {
	Logger  *slog.Logger
	Metrics *Metrics
	// DrainTimeout bounds how long the live connections of a listener that
	// Apply removed may go on. Shutdown has its own deadline, its context.
	DrainTimeout time.Duration
	// DisableSessionResumption turns client session resumption off for
	// every outbound listener, whatever the configuration says (see
	// Outbound.DisableSessionResumption).
	DisableSessionResumption bool
	// OwnListeners are the sidecar's listeners outside the Config (the
	// admin endpoint, the TLS test endpoint), listen address by name. An
	// inbound listener's app may be none of them, as it may be none of the
	// Config's own listeners: a peer admitted there would reach it through
	// the sidecar, from loopback.
	OwnListeners map[string]string
}

// ListenerStatus describes one running listener. Its JSON keys follow the
// snake_case of every latch JSON document (admin /status).
type ListenerStatus struct {
	Name      string    `json:"name"`
	Direction Direction `json:"direction"`
	// Addr is the bound address (with the real port when Listen asked for 0).
	Addr string `json:"addr"`
	// Active counts open connections, handshaking ones included.
	Active int `json:"active"`
	// FederatesWith are the foreign trust domains the listener accepts
	// peers (inbound) or servers (outbound) of.
	FederatesWith []string `json:"federates_with,omitempty"`
	// PeersByTrustDomain counts the open connections whose peer is
	// verified, by the trust domain whose bundle verified it (that of the
	// peer's own ID).
	PeersByTrustDomain map[string]int `json:"peers_by_trust_domain,omitempty"`
}

// Server runs the listeners of the Config it was last given. It starts empty:
// nothing is served until the first successful Apply. All methods are safe
// for concurrent use.
type Server struct {
	tlsc         TLSConfigs
	log          *slog.Logger
	metrics      *Metrics
	drainTimeout time.Duration
	noResumption bool
	ownListeners map[string]string

	// snap is what every connection consults: its listener's settings at
	// accept time, and its allow-list or server ID at every handshake and
	// after every Apply.
	snap atomic.Pointer[snapshot]

	mu        sync.Mutex // serializes Apply, Shutdown and Listeners
	listeners []*listener
	draining  map[*listener]struct{}
	closed    bool

	// wg counts every goroutine the Server starts: accept loops, connections
	// (including the slot reserved before each Accept), drains.
	wg sync.WaitGroup

	// parker holds the idle directions of every connection of the Server,
	// and grace ends the waits that lasted long enough to park.
	parker parker
	grace  graceSweeper
}

// NewServer returns a Server that builds its TLS configurations with tlsc.
func NewServer(tlsc TLSConfigs, opts Options) *Server {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		tlsc:         tlsc,
		log:          log,
		parker:       parker{log: log},
		metrics:      opts.Metrics,
		drainTimeout: orDuration(opts.DrainTimeout, DefaultDrainTimeout),
		noResumption: opts.DisableSessionResumption,
		ownListeners: maps.Clone(opts.OwnListeners),
		draining:     make(map[*listener]struct{}),
	}
}

// snapshot is a Config made ready to serve: per listener, the settings with
// defaults filled in and the tls.Config built for them.
type snapshot struct {
	cfg    *Config
	routes map[string]*route
	// local is the trust domain of the SVID when the snapshot was applied:
	// peers of it need no federation.
	local spiffeid.TrustDomain
}

// routeOf is snap's route named name; nil for a nil snapshot.
func (snap *snapshot) routeOf(name string) *route {
	if snap == nil {
		return nil
	}
	return snap.routes[name]
}

// accepts reports whether an inbound listener of snap takes peers of td.
func (snap *snapshot) accepts(in *Inbound, td spiffeid.TrustDomain) bool {
	return td == snap.local || slices.Contains(in.FederatesWith, td)
}

// route is one listener's settings within a snapshot.
type route struct {
	name             string
	dir              Direction
	listen           string
	in               *Inbound  // inbound only
	out              *Outbound // outbound only
	tls              *tls.Config
	handshakeTimeout time.Duration
	idleTimeout      time.Duration
	connectTimeout   time.Duration
	maxConns         int
}

// key identifies the socket a route needs: a listener keeps its socket across
// snapshots while direction, name and address stay the same.
func (r *route) key() string { return string(r.dir) + "|" + r.name + "|" + r.listen }

func (s *Server) newSnapshot(cfg *Config) *snapshot {
	snap := &snapshot{cfg: cfg, routes: make(map[string]*route, len(cfg.Inbound)+len(cfg.Outbound))}
	for i := range cfg.Inbound {
		in := &cfg.Inbound[i]
		hs := orDuration(in.HandshakeTimeout, DefaultHandshakeTimeout)
		snap.routes[in.Name] = &route{
			name: in.Name, dir: DirectionInbound, listen: in.Listen, in: in,
			tls:              guardResumption(s.tlsc.ServerConfig(cfg.TLS, s.authorizer(in.Name), identity.FederatesWithFunc(s.federated(in.Name))), hs),
			handshakeTimeout: hs,
			idleTimeout:      orDuration(in.IdleTimeout, DefaultIdleTimeout),
			connectTimeout:   orDuration(in.ConnectTimeout, DefaultConnectTimeout),
			maxConns:         orInt(in.MaxConnections, DefaultMaxConnections),
		}
	}
	for i := range cfg.Outbound {
		out := &cfg.Outbound[i]
		hs := orDuration(out.HandshakeTimeout, DefaultHandshakeTimeout)
		tc := guardResumption(s.tlsc.ClientConfig(cfg.TLS, out.ServerID, identity.FederatesWith(out.FederatesWith...)), hs)
		if out.DisableSessionResumption || s.noResumption {
			// guardResumption returned a clone: the shared cache stays.
			tc.ClientSessionCache = nil
		}
		snap.routes[out.Name] = &route{
			name: out.Name, dir: DirectionOutbound, listen: out.Listen, out: out,
			tls:              tc,
			handshakeTimeout: hs,
			idleTimeout:      orDuration(out.IdleTimeout, DefaultIdleTimeout),
			connectTimeout:   orDuration(out.ConnectTimeout, DefaultConnectTimeout),
			maxConns:         orInt(out.MaxConnections, DefaultMaxConnections),
		}
	}
	return snap
}

// route returns the current settings of the named listener, nil when the
// running config has no such listener in direction dir.
func (s *Server) route(name string, dir Direction) *route {
	snap := s.snap.Load()
	if snap == nil {
		return nil
	}
	r := snap.routes[name]
	if r == nil || r.dir != dir {
		return nil
	}
	return r
}

// authorizer is the authorize function of an inbound listener's tls.Config.
// It reads the allow-list of the snapshot current at that handshake, not of
// the one the tls.Config was built for, so a policy change applies to the
// next handshake at once.
func (s *Server) authorizer(name string) func(spiffeid.ID) error {
	return func(id spiffeid.ID) error {
		r := s.route(name, DirectionInbound)
		if r == nil {
			return fmt.Errorf("listener %q: peer %s: %w (listener removed)", name, id, identity.ErrNotAllowed)
		}
		return r.in.Allow.Authorize(id)
	}
}

// federated is the federation list of an inbound listener's tls.Config: like
// the authorizer, it reads the snapshot current at each handshake.
func (s *Server) federated(name string) func() []spiffeid.TrustDomain {
	return func() []spiffeid.TrustDomain {
		if r := s.route(name, DirectionInbound); r != nil {
			return r.in.FederatesWith
		}
		return nil
	}
}

// Current returns the running Config, nil before the first Apply.
func (s *Server) Current() *Config {
	if snap := s.snap.Load(); snap != nil {
		return snap.cfg
	}
	return nil
}

// Apply makes cfg the running configuration, all or nothing. It validates
// cfg, binds the sockets of new listeners (if one fails, the ones just bound
// are closed, the error is returned, and the old configuration keeps
// serving), then swaps the snapshot in. Listeners whose direction, name and
// address are unchanged keep their socket and their connections; removed
// listeners stop accepting and their connections drain for up to the drain
// timeout. Finally every live connection that the new policy would refuse is
// closed: inbound ones whose peer the listener's new allow-list does not
// allow ("policy_revoked"), outbound ones whose listener now expects another
// server ID ("server_id_changed").
func (s *Server) Apply(cfg *Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("applying proxy config: %w", err)
	}
	local, err := s.tlsc.LocalTrustDomain()
	if err != nil {
		return fmt.Errorf("applying proxy config %s: %w", cfg.Version, err)
	}
	if err := validateFederation(cfg, local); err != nil {
		return fmt.Errorf("applying proxy config %s: %w", cfg.Version, err)
	}
	if err := validateApps(cfg, s.ownListeners); err != nil {
		return fmt.Errorf("applying proxy config %s: %w", cfg.Version, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrServerClosed
	}
	snap := s.newSnapshot(cfg)
	snap.local = local

	old := make(map[string]*listener, len(s.listeners))
	for _, l := range s.listeners {
		old[l.key] = l
	}
	var next, fresh []*listener
	for _, r := range orderedRoutes(cfg, snap) {
		if l, ok := old[r.key()]; ok {
			delete(old, r.key())
			next = append(next, l)
			continue
		}
		ln, err := net.Listen("tcp", r.listen)
		if err != nil {
			for _, l := range fresh {
				l.ln.Close()
			}
			return fmt.Errorf("applying proxy config %s: %s listener %q: %w", cfg.Version, r.dir, r.name, err)
		}
		l := s.newListener(r, ln)
		next = append(next, l)
		fresh = append(fresh, l)
	}

	s.snap.Store(snap)
	s.listeners = next
	s.metrics.setConfig(cfg.Version, cfg.Source)

	kept := make(map[string]bool, len(next)) // name/direction still listening
	for _, l := range next {
		l.limit.setMax(snap.routes[l.name].maxConns)
		l.metrics.setLimit(snap.routes[l.name].maxConns)
		kept[l.name+"/"+string(l.dir)] = true
	}
	for _, l := range fresh {
		s.log.Info("listening", "listener", l.name, "direction", string(l.dir), "addr", l.addr)
		s.wg.Add(1)
		go l.acceptLoop()
	}
	for _, l := range old {
		s.log.Info("listener removed, draining", "listener", l.name, "direction", string(l.dir), "addr", l.addr, "drain_timeout", s.drainTimeout)
		l.stopAccepting()
		if !kept[l.name+"/"+string(l.dir)] {
			l.metrics.forgetLimit()
		}
		s.draining[l] = struct{}{}
		s.wg.Add(1)
		go s.drain(l)
	}
	for _, in := range cfg.Inbound {
		if in.Allow.Len() == 0 {
			s.log.Warn("inbound listener has an empty allow-list: every peer is refused", "listener", in.Name)
		}
	}
	revoked := s.revoke(next, snap)
	s.log.Info("proxy config applied", "version", cfg.Version, "source", cfg.Source,
		"inbound", len(cfg.Inbound), "outbound", len(cfg.Outbound),
		"bound", len(fresh), "removed", len(old), "revoked", revoked)
	return nil
}

func orderedRoutes(cfg *Config, snap *snapshot) []*route {
	out := make([]*route, 0, len(snap.routes))
	for _, in := range cfg.Inbound {
		out = append(out, snap.routes[in.Name])
	}
	for _, o := range cfg.Outbound {
		out = append(out, snap.routes[o.Name])
	}
	return out
}

// revoke closes the live connections of ls that snap no longer allows and
// returns how many. Connections still handshaking are not missed: each one
// re-checks the current snapshot after its handshake (see conn.authorized).
func (s *Server) revoke(ls []*listener, snap *snapshot) int {
	n := 0
	for _, l := range ls {
		r := snap.routes[l.name]
		for _, c := range l.connections() {
			switch {
			case r.in != nil:
				if p := c.peer.Load(); p != nil && (!snap.accepts(r.in, p.TrustDomain()) || !r.in.Allow.Allows(*p)) {
					c.kill(reasonPolicyRevoked)
					n++
				}
			case r.out != nil:
				if id := c.serverID.Load(); id != nil && *id != r.out.ServerID {
					c.kill(reasonServerIDChanged)
					n++
				}
			}
		}
	}
	return n
}

// RecheckTrust closes the live connections whose peer (inbound) or server
// (outbound) is of a foreign trust domain whose bundle can no longer verify
// anybody: it was removed from the Workload API's federated bundles, or is
// now refused (identity.CheckFederatedBundle). New handshakes of such peers
// already fail; this is the same decision for the connections they made
// before, taken the way a policy revocation is: reset, reason
// "trust_revoked". Call it whenever the bundles change. It returns how many
// connections it closed.
func (s *Server) RecheckTrust() int {
	snap := s.snap.Load()
	if snap == nil {
		return 0
	}
	s.mu.Lock()
	ls := append([]*listener(nil), s.listeners...)
	for l := range s.draining {
		ls = append(ls, l)
	}
	s.mu.Unlock()
	usable := make(map[spiffeid.TrustDomain]error)
	n := 0
	for _, l := range ls {
		for _, c := range l.connections() {
			p := c.peer.Load()
			if p == nil || p.TrustDomain() == snap.local {
				continue
			}
			td := p.TrustDomain()
			err, seen := usable[td]
			if !seen {
				err = s.tlsc.TrustDomainUsable(td)
				usable[td] = err
			}
			if err == nil {
				continue
			}
			s.log.Warn("closing a connection whose peer's trust domain is no longer trusted", "listener", l.name, "direction", string(l.dir),
				"peer_id", p.String(), "remote_addr", c.remoteAddr, "reason", err.Error())
			c.kill(reasonTrustRevoked)
			n++
		}
	}
	return n
}

// drain waits for a removed listener's connections to finish, and closes
// those still open after the drain timeout.
func (s *Server) drain(l *listener) {
	defer s.wg.Done()
	t := time.NewTimer(s.drainTimeout)
	defer t.Stop()
	select {
	case <-l.idle:
	case <-t.C:
		l.killAll(reasonDrain)
		<-l.idle
	}
	s.mu.Lock()
	delete(s.draining, l)
	s.mu.Unlock()
}

// Listeners reports the running listeners in configuration order.
func (s *Server) Listeners() []ListenerStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ListenerStatus, 0, len(s.listeners))
	snap := s.snap.Load()
	for _, l := range s.listeners {
		st := ListenerStatus{Name: l.name, Direction: l.dir, Addr: l.addr, Active: l.active()}
		if r := snap.routeOf(l.name); r != nil {
			var fed []spiffeid.TrustDomain
			if r.in != nil {
				fed = r.in.FederatesWith
			} else if r.out != nil {
				fed = r.out.FederatesWith
			}
			for _, td := range fed {
				st.FederatesWith = append(st.FederatesWith, td.Name())
			}
		}
		for _, c := range l.connections() {
			if p := c.peer.Load(); p != nil {
				if st.PeersByTrustDomain == nil {
					st.PeersByTrustDomain = make(map[string]int)
				}
				st.PeersByTrustDomain[p.TrustDomain().Name()]++
			}
		}
		out = append(out, st)
	}
	return out
}

// Shutdown stops every listener from accepting, lets the live connections
// finish until ctx is done, then closes the rest (reason "drain"). It returns
// once every goroutine of the Server has exited: nil if all connections
// finished on their own, ctx's error otherwise. Apply fails after Shutdown.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	all := append([]*listener(nil), s.listeners...)
	for l := range s.draining {
		all = append(all, l)
	}
	s.listeners = nil
	s.mu.Unlock()

	for _, l := range all {
		l.stopAccepting()
	}
	var err error
wait:
	for _, l := range all {
		select {
		case <-l.idle:
		case <-ctx.Done():
			err = ctx.Err()
			break wait
		}
	}
	if err != nil {
		for _, l := range all {
			l.killAll(reasonDrain)
		}
	}
	s.wg.Wait()
	s.grace.close()
	s.parker.close()
	s.log.Info("proxy stopped", "forced", err != nil)
	return err
}

// ApplyFile loads the static configuration at path and applies it. On any
// error (unreadable file, bad YAML, invalid settings, a bind failure) the
// running configuration is left as it was and keeps serving; the error
// carries the file and line. It is what SIGHUP does in latch proxy.
func (s *Server) ApplyFile(path string) (*Config, error) {
	cfg, err := LoadFile(path)
	if err != nil {
		return nil, err
	}
	if err := s.Apply(cfg); err != nil {
		return nil, err
	}
	return cfg, nil
}
