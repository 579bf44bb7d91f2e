package client

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/types/known/anypb"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
)

// Options configure the ADS client.
type Options struct {
	// Address is the control plane's host:port.
	Address string
	// ControlPlaneID is the SPIFFE ID the control plane must prove. TLS
	// should already demand it (identity's ClientConfig does); the client
	// checks it again on every handshake.
	ControlPlaneID spiffeid.ID
	// NodeID is this sidecar's SPIFFE ID: the node ID it asks for, which the
	// control plane holds it to, and the only SVID its resources may name.
	NodeID spiffeid.ID
	// TLS is the mTLS client configuration presenting the sidecar's SVID.
	TLS *tls.Config
	// Profile is the widest TLS profile; xDS may narrow it. Zero: modern.
	Profile identity.Profile
	// AllowNonLoopbackApp accepts inbound listeners whose app is not on
	// loopback (see Validator).
	AllowNonLoopbackApp bool
	// StateDir, when set, keeps the last applied resources, so a restarted
	// sidecar serves its last good policy before (or without) reaching the
	// control plane.
	StateDir string
	Logger   *slog.Logger
	Metrics  *Metrics
	// Reconnect backoff bounds; zero means 250ms and 30s.
	MinBackoff, MaxBackoff time.Duration
	// SettleTimeout is how long a cluster or endpoint update whose version
	// differs from the listeners' waits for the listeners to follow before
	// it is applied alone; zero means one second. latch's control plane
	// always sends them together.
	SettleTimeout time.Duration
}

// Client is the sidecar's ADS client. It keeps the last good configuration
// across reconnects: a failed or refused update never reaches apply.
type Client struct {
	opts  Options
	v     Validator
	log   *slog.Logger
	apply func(*proxy.Config) error

	// Owned by Run's goroutine.
	pending   resources // last resources received and found valid, by type
	appliedAt string    // key of the last applied configuration

	mu     sync.Mutex
	status Status
}

// Status is what the client reports about itself (in the sidecar's
// /status, with the snake_case keys of every latch JSON document).
type Status struct {
	Connected      bool   `json:"connected"`
	AppliedVersion string `json:"applied_version"`
	LastError      string `json:"last_error"` // last NACK or connection error
}

// resources holds, per type URL, the raw resources (for the state file) and
// their validated form.
type resources struct {
	raw      map[string]map[string]*anypb.Any
	versions map[string]string // by type URL; present once the type was received
	set      Set
}

// complete reports whether listeners and clusters have both been received:
// until then an empty list means "not yet", not "none".
func (r resources) complete() bool {
	_, l := r.versions[ListenerType]
	_, c := r.versions[ClusterType]
	return l && c
}

func newResources() resources {
	return resources{
		raw:      map[string]map[string]*anypb.Any{ListenerType: {}, ClusterType: {}, EndpointType: {}},
		versions: map[string]string{},
		set:      Set{Listeners: map[string]Listener{}, Clusters: map[string]Cluster{}, Endpoints: map[string]Endpoints{}},
	}
}

func (r resources) clone() resources {
	out := resources{raw: map[string]map[string]*anypb.Any{}, versions: maps.Clone(r.versions), set: Set{
		Listeners: maps.Clone(r.set.Listeners), Clusters: maps.Clone(r.set.Clusters), Endpoints: maps.Clone(r.set.Endpoints),
	}}
	for t, m := range r.raw {
		out.raw[t] = maps.Clone(m)
	}
	return out
}

// version names the combination: one version when every type agrees (as
// with latch's control plane, whose snapshots are consistent), else each.
func (r resources) version() string {
	l, c, e := r.versions[ListenerType], r.versions[ClusterType], r.versions[EndpointType]
	if l == c && (e == "" || e == l) {
		return l
	}
	return fmt.Sprintf("lds=%s,cds=%s,eds=%s", l, c, e)
}

// New returns a client that hands every validated configuration to apply.
// An error from apply refuses the update (NACK) like a validation error.
func New(opts Options, apply func(*proxy.Config) error) (*Client, error) {
	if opts.Address == "" {
		return nil, errors.New("xds client: no control plane address")
	}
	if opts.NodeID.IsZero() || opts.ControlPlaneID.IsZero() {
		return nil, errors.New("xds client: node ID and control plane ID are required")
	}
	if opts.TLS == nil {
		return nil, errors.New("xds client: no TLS configuration: the xDS channel is mTLS only")
	}
	if opts.Profile.Name == "" {
		opts.Profile = identity.Modern()
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 250 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 30 * time.Second
	}
	if opts.SettleTimeout <= 0 {
		opts.SettleTimeout = time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Client{
		opts:    opts,
		v:       Validator{NodeID: opts.NodeID, Profile: opts.Profile, AllowNonLoopbackApp: opts.AllowNonLoopbackApp},
		log:     opts.Logger.With("component", "xds-client", "control_plane", opts.Address),
		apply:   apply,
		pending: newResources(),
	}, nil
}

// Run is New followed by Client.Run.
func Run(ctx context.Context, opts Options, apply func(*proxy.Config) error) error {
	c, err := New(opts, apply)
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

// Status returns a copy of the client's status.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.status
}

func (c *Client) setStatus(f func(*Status)) {
	c.mu.Lock()
	f(&c.status)
	c.mu.Unlock()
}

// Run restores the state directory, then keeps an ADS stream to the control
// plane until ctx is done, reconnecting with jittered exponential backoff.
// It returns nil when ctx is done.
func (c *Client) Run(ctx context.Context) error {
	c.restore()
	backoff := c.opts.MinBackoff
	for {
		got, err := c.session(ctx)
		c.setStatus(func(s *Status) { s.Connected = false })
		if ctx.Err() != nil {
			return nil
		}
		if got {
			backoff = c.opts.MinBackoff // the control plane was healthy
		}
		// Full jitter in [backoff/2, backoff): replicas restarting together
		// must not be hit by every sidecar at the same instant.
		wait := backoff/2 + rand.N(backoff/2+1)
		c.log.Warn("xds stream ended; keeping the last good config", "reason", err, "retry_in", wait.Round(time.Millisecond).String())
		c.setStatus(func(s *Status) { s.LastError = err.Error() })
		c.opts.Metrics.reconnect()
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, c.opts.MaxBackoff)
	}
}

// tlsConfig checks the control plane's SPIFFE ID during the handshake, on
// top of whatever the given configuration verifies.
func (c *Client) tlsConfig() *tls.Config {
	cfg := c.opts.TLS.Clone()
	inner := cfg.VerifyConnection
	want := c.opts.ControlPlaneID
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if inner != nil {
			if err := inner(cs); err != nil {
				return err
			}
		}
		if len(cs.PeerCertificates) == 0 {
			return errors.New("control plane presented no certificate")
		}
		id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
		if err != nil {
			return fmt.Errorf("control plane certificate: %w", err)
		}
		if id != want {
			return fmt.Errorf("control plane is %s, want %s", id, want)
		}
		return nil
	}
	return cfg
}

// stream state of one type on one ADS stream.
type typeState struct {
	nonce string
	names []string // EDS only

	// A control plane may answer a NACK by resending the very update it
	// refused (go-control-plane's snapshot cache does, since the NACK names
	// an older version). Repeated refusals of one version are sent with a
	// growing delay, so the pair does not spin. The delay stays short: until
	// the NACK is sent, the control plane cannot send this type again, the
	// fix included.
	nackedVersion string
	nackDelay     time.Duration
	deferred      *discovery.DiscoveryRequest
	deferredAt    time.Time
}

type session struct {
	c      *Client
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *core.Node
	types  map[string]*typeState
	sent   bool // node sent
}

func (c *Client) session(ctx context.Context) (gotResponse bool, err error) {
	conn, err := grpc.NewClient(c.opts.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(c.tlsConfig())),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		return false, fmt.Errorf("dialing control plane: %w", err)
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx, grpc.WaitForReady(false))
	if err != nil {
		return false, fmt.Errorf("opening ADS stream: %w", err)
	}
	s := &session{
		c:      c,
		stream: stream,
		node:   &core.Node{Id: c.opts.NodeID.String(), UserAgentName: "latch"},
		types:  map[string]*typeState{ListenerType: {}, ClusterType: {}, EndpointType: {}},
	}
	// Clusters first, then listeners, as Envoy does: listeners refer to
	// clusters, and the client waits until references resolve.
	if err := s.request(ClusterType, "", nil); err != nil {
		return false, err
	}
	if err := s.request(ListenerType, "", nil); err != nil {
		return false, err
	}
	if names := c.edsNames(c.pending.set); len(names) > 0 {
		s.types[EndpointType].names = names
		if err := s.request(EndpointType, "", nil); err != nil {
			return false, err
		}
	}
	// Recv blocks, so it runs on its own goroutine; the loop below also
	// waits for the settle timer.
	resps := make(chan *discovery.DiscoveryResponse)
	recvErr := make(chan error, 1)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			resp, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case resps <- resp:
			case <-sctx.Done():
				return
			}
		}
	}()
	defer func() { cancel(); <-recvDone }()

	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	nackTimer := time.NewTimer(time.Hour)
	nackTimer.Stop()
	defer nackTimer.Stop()
	armNACKs := func() error {
		next, err := s.sendDue(time.Now())
		nackTimer.Stop()
		if !next.IsZero() {
			nackTimer.Reset(time.Until(next))
		}
		return err
	}
	for {
		select {
		case err := <-recvErr:
			return gotResponse, fmt.Errorf("receiving from control plane: %w", err)
		case <-nackTimer.C:
			if err := armNACKs(); err != nil {
				return gotResponse, err
			}
		case <-settle.C:
			// The other types did not follow: this control plane changed
			// only some of them. Apply what we have.
			if err := c.commit(c.pending, ""); err != nil {
				c.log.Error("xds update could not be applied; keeping the last good config", "version", c.pending.version(), "reason", err)
				c.opts.Metrics.update("failed")
				c.setStatus(func(st *Status) { st.LastError = err.Error() })
			}
		case resp := <-resps:
			settle.Stop()
			if !gotResponse {
				gotResponse = true
				c.setStatus(func(st *Status) { st.Connected = true })
				c.log.Info("xds stream established", "node", c.opts.NodeID.String())
			}
			waiting, err := s.handle(resp)
			if err != nil {
				return gotResponse, err
			}
			if waiting {
				settle.Reset(c.opts.SettleTimeout)
			}
			if err := armNACKs(); err != nil {
				return gotResponse, err
			}
		}
	}
}

func (s *session) request(typeURL, version string, nack error) error {
	return s.send(s.newRequest(typeURL, version, nack))
}

func (s *session) newRequest(typeURL, version string, nack error) *discovery.DiscoveryRequest {
	st := s.types[typeURL]
	req := &discovery.DiscoveryRequest{
		VersionInfo:   version,
		ResponseNonce: st.nonce,
		TypeUrl:       typeURL,
		ResourceNames: st.names,
	}
	if !s.sent {
		req.Node = s.node
		s.sent = true
	}
	if nack != nil {
		req.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: nack.Error()}
	}
	return req
}

func (s *session) send(req *discovery.DiscoveryRequest) error {
	if err := s.stream.Send(req); err != nil {
		return fmt.Errorf("sending %s request: %w", shortType(req.GetTypeUrl()), err)
	}
	return nil
}

// sendDue sends the deferred NACKs whose time has come and returns when the
// next one is due (zero if none).
func (s *session) sendDue(now time.Time) (time.Time, error) {
	var next time.Time
	for _, st := range s.types {
		if st.deferred == nil {
			continue
		}
		if !st.deferredAt.After(now) {
			req := st.deferred
			st.deferred = nil
			if err := s.send(req); err != nil {
				return time.Time{}, err
			}
			continue
		}
		if next.IsZero() || st.deferredAt.Before(next) {
			next = st.deferredAt
		}
	}
	return next, nil
}

// handle validates one response, applies it if it completes an update, and
// ACKs or NACKs it. waiting reports an update held back for the types that
// should follow it.
func (s *session) handle(resp *discovery.DiscoveryResponse) (waiting bool, _ error) {
	c := s.c
	typ := resp.GetTypeUrl()
	st, ok := s.types[typ]
	if !ok {
		c.log.Warn("ignoring response of a type latch did not ask for", "type", typ)
		return false, nil
	}
	st.nonce = resp.GetNonce()
	st.deferred = nil // this response supersedes the one a deferred NACK answered
	next := c.pending.clone()
	err := c.decode(&next, typ, resp.GetResources())
	if err == nil {
		next.versions[typ] = resp.GetVersionInfo()
		err = c.commit(next, typ)
	}
	if errors.Is(err, errWaiting) {
		waiting, err = true, nil
	}
	if err != nil {
		// Refuse the whole response; what was running keeps running.
		c.log.Warn("xds update refused", "type", shortType(typ), "version", resp.GetVersionInfo(), "reason", err)
		c.opts.Metrics.update("nacked")
		c.setStatus(func(st *Status) { st.LastError = err.Error() })
		req := s.newRequest(typ, c.pending.versions[typ], err)
		if resp.GetVersionInfo() == st.nackedVersion {
			st.nackDelay = min(max(2*st.nackDelay, 100*time.Millisecond), maxNACKDelay)
			st.deferred, st.deferredAt = req, time.Now().Add(st.nackDelay)
			return false, nil
		}
		st.nackedVersion, st.nackDelay = resp.GetVersionInfo(), 0
		return false, s.send(req)
	}
	st.nackedVersion, st.nackDelay = "", 0
	c.pending = next
	if err := s.request(typ, resp.GetVersionInfo(), nil); err != nil {
		return false, err
	}
	if typ == ClusterType {
		// Follow the clusters with the endpoints they need.
		names := c.edsNames(next.set)
		eds := s.types[EndpointType]
		if len(names) > 0 && !slices.Equal(names, eds.names) {
			eds.names = names
			return waiting, s.request(EndpointType, c.pending.versions[EndpointType], nil)
		}
	}
	return waiting, nil
}

// maxNACKDelay bounds the delay of repeated NACKs of one version.
const maxNACKDelay = 2 * time.Second

// errWaiting holds an update back until the types that follow it arrive.
var errWaiting = errors.New("waiting for the rest of the update")

// decode validates every resource of one response into r, replacing what r
// held for that type: state-of-the-world responses are complete.
func (c *Client) decode(r *resources, typ string, in []*anypb.Any) error {
	raw := map[string]*anypb.Any{}
	switch typ {
	case ListenerType:
		set := map[string]Listener{}
		for _, a := range in {
			l, err := c.v.Listener(a)
			if err != nil {
				return err
			}
			if _, dup := set[l.Name]; dup {
				return &ValidationError{Type: "listener", Resource: l.Name, Reason: "sent twice"}
			}
			set[l.Name], raw[l.Name] = l, a
		}
		r.set.Listeners = set
	case ClusterType:
		set := map[string]Cluster{}
		for _, a := range in {
			cl, err := c.v.Cluster(a)
			if err != nil {
				return err
			}
			if _, dup := set[cl.Name]; dup {
				return &ValidationError{Type: "cluster", Resource: cl.Name, Reason: "sent twice"}
			}
			set[cl.Name], raw[cl.Name] = cl, a
		}
		r.set.Clusters = set
	case EndpointType:
		set := map[string]Endpoints{}
		for _, a := range in {
			e, err := c.v.Endpoints(a)
			if err != nil {
				return err
			}
			if _, dup := set[e.Name]; dup {
				return &ValidationError{Type: "endpoints", Resource: e.Name, Reason: "sent twice"}
			}
			set[e.Name], raw[e.Name] = e, a
		}
		r.set.Endpoints = set
	}
	r.raw[typ] = raw
	return nil
}

// commit builds the configuration of r and applies it when it differs from
// what runs. An incomplete set is accepted and waits for the rest.
//
// Types arrive one response at a time. When their versions disagree the
// update is still on its way — clusters and endpoints come before the
// listeners that use them — so a cluster or endpoint update returns
// errWaiting, and only a listener update (or the settle timer, for a
// control plane that changed clusters alone; arrived "") applies; otherwise
// a mix of old listeners and new clusters, which no declaration ever said,
// could run for a moment.
func (c *Client) commit(r resources, arrived string) error {
	if !r.complete() {
		return nil
	}
	l := r.versions[ListenerType]
	agree := r.versions[ClusterType] == l && (len(c.edsNames(r.set)) == 0 || r.versions[EndpointType] == l)
	if !agree && arrived != ListenerType && arrived != "" {
		return errWaiting
	}
	cfg, err := c.v.Build(r.set, r.version())
	if errors.Is(err, ErrIncomplete) {
		c.log.Debug("xds update incomplete; waiting for the rest", "reason", err)
		return nil
	}
	if err != nil {
		return err
	}
	key := configKey(cfg)
	if key == c.appliedAt {
		// Same content under a new version: nothing to change in the data
		// plane, but the new version is what now runs.
		c.setStatus(func(st *Status) { st.AppliedVersion = cfg.Version })
		if err := c.save(r); err != nil {
			c.log.Error("saving xds state", "dir", c.opts.StateDir, "reason", err)
		}
		return nil
	}
	if err := c.apply(cfg); err != nil {
		return fmt.Errorf("applying version %s: %w", cfg.Version, err)
	}
	c.appliedAt = key
	c.opts.Metrics.update("applied")
	c.setStatus(func(st *Status) { st.AppliedVersion = cfg.Version; st.LastError = "" })
	c.log.Info("xds config applied", "version", cfg.Version, "inbound", len(cfg.Inbound), "outbound", len(cfg.Outbound))
	if err := c.save(r); err != nil {
		// The config runs; only the restart path lost its freshness.
		c.log.Error("saving xds state", "dir", c.opts.StateDir, "reason", err)
	}
	return nil
}

// configKey identifies a configuration by content, so an identical resend
// (after a reconnect, or under a new version) is not applied again.
func configKey(cfg *proxy.Config) string {
	cp := *cfg
	cp.Source, cp.Version = "", ""
	sum := sha256.Sum256([]byte(fmt.Sprintf("%+v", cp)))
	return hex.EncodeToString(sum[:])
}

func (c *Client) edsNames(s Set) []string {
	var names []string
	for _, cl := range s.Clusters {
		if cl.EDSName != "" {
			names = append(names, cl.EDSName)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

func shortType(typeURL string) string {
	switch typeURL {
	case ListenerType:
		return "listener"
	case ClusterType:
		return "cluster"
	case EndpointType:
		return "endpoints"
	}
	return strings.TrimPrefix(typeURL, "type.googleapis.com/")
}
