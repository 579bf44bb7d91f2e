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
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
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
	// always sends them together, and in order (clusters, endpoints,
	// listeners). Over delta xDS a type that did not change is not sent at
	// all, so the wait there is a tenth of this: the types of one change
	// arrive back to back.
	SettleTimeout time.Duration
	// Protocol is the xDS variant spoken; the zero value, Incremental, is
	// delta xDS with a fallback to state of the world.
	Protocol Protocol
}

// Protocol is a variant of the xDS protocol.
type Protocol int

const (
	// Incremental is delta xDS: the control plane sends only the
	// resources that changed and the names of those removed, and a
	// reconnecting client says which versions it holds, so a restarted or
	// another replica of the control plane sends it nothing it already has.
	// A control plane that answers Unimplemented is spoken to in state of
	// the world on the same connection.
	Incremental Protocol = iota
	// StateOfTheWorld is state-of-the-world xDS only: every response
	// carries every resource of its type.
	StateOfTheWorld
)

// String is the protocol's name in the status: "delta" or "sotw".
func (p Protocol) String() string {
	if p == StateOfTheWorld {
		return "sotw"
	}
	return "delta"
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
	Connected bool `json:"connected"`
	// Protocol is the xDS variant of the current or last stream: "delta"
	// or "sotw" ("" before the first).
	Protocol       string `json:"protocol"`
	AppliedVersion string `json:"applied_version"`
	LastError      string `json:"last_error"` // last NACK or connection error
}

// resources holds, per type URL, the raw resources (for the state file) and
// their validated form.
type resources struct {
	raw      map[string]map[string]*anypb.Any
	versions map[string]string // by type URL; present once the type was received
	set      Set
	// resVersions are the delta versions of the resources in raw, by type
	// URL and name: what a reconnecting delta stream says it holds. Empty
	// for resources received over state of the world.
	resVersions map[string]map[string]string
	// latest is, over delta xDS, the system version of the latest
	// response: the version of the whole, since a type that did not change
	// is not sent again and keeps an older one.
	latest string
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
		raw:         map[string]map[string]*anypb.Any{ListenerType: {}, ClusterType: {}, EndpointType: {}},
		versions:    map[string]string{},
		set:         Set{Listeners: map[string]Listener{}, Clusters: map[string]Cluster{}, Endpoints: map[string]Endpoints{}},
		resVersions: map[string]map[string]string{ListenerType: {}, ClusterType: {}, EndpointType: {}},
	}
}

func (r resources) clone() resources {
	out := resources{raw: map[string]map[string]*anypb.Any{}, versions: maps.Clone(r.versions), set: Set{
		Listeners: maps.Clone(r.set.Listeners), Clusters: maps.Clone(r.set.Clusters), Endpoints: maps.Clone(r.set.Endpoints),
	}, resVersions: map[string]map[string]string{}, latest: r.latest}
	for t, m := range r.raw {
		out.raw[t] = maps.Clone(m)
	}
	for t, m := range r.resVersions {
		out.resVersions[t] = maps.Clone(m)
	}
	return out
}

// version names the combination: one version when every type agrees (as
// with latch's control plane, whose snapshots are consistent), else each;
// over delta xDS, the latest response's.
func (r resources) version() string {
	if r.latest != "" {
		return r.latest
	}
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

// session is one connection to the control plane: delta xDS first, unless
// the options say otherwise, and state of the world on the same connection
// when the control plane does not implement delta.
func (c *Client) session(ctx context.Context) (gotResponse bool, err error) {
	conn, err := grpc.NewClient(c.opts.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(c.tlsConfig())),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		// No read buffer of gRPC's own (32 KiB by default, for the life of
		// the connection): the TLS connection under it already holds a
		// whole record. (gRPC's write buffer is released after each flush.)
		grpc.WithReadBufferSize(0),
	)
	if err != nil {
		return false, fmt.Errorf("dialing control plane: %w", err)
	}
	defer conn.Close()
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	if c.opts.Protocol == Incremental {
		got, err := c.deltaSession(ctx, ads)
		if status.Code(err) != codes.Unimplemented || got {
			return got, err
		}
		c.log.Info("the control plane does not serve delta xDS; using state of the world", "reason", err)
	}
	return c.sotwSession(ctx, ads)
}

// streamLoop is the loop of one stream, of either protocol: responses are
// received on their own goroutine (Recv blocks), handled one at a time, and
// interleaved with the settle timer (an update held back for the types that
// should follow it) and the deferred NACKs' timer.
type streamLoop[R any] struct {
	recv   func() (R, error)
	handle func(R) (waiting bool, err error)
	// due sends the deferred NACKs whose time has come and returns when
	// the next is due (zero if none); nil if the protocol defers none.
	due    func(now time.Time) (time.Time, error)
	settle time.Duration
}

func runLoop[R any](ctx context.Context, c *Client, l streamLoop[R]) (gotResponse bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	resps := make(chan R)
	recvErr := make(chan error, 1)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			resp, err := l.recv()
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
		if l.due == nil {
			return nil
		}
		next, err := l.due(time.Now())
		nackTimer.Stop()
		if !next.IsZero() {
			nackTimer.Reset(time.Until(next))
		}
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return gotResponse, ctx.Err()
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
			waiting, err := l.handle(resp)
			if err != nil {
				return gotResponse, err
			}
			if waiting {
				settle.Reset(l.settle)
			}
			if err := armNACKs(); err != nil {
				return gotResponse, err
			}
		}
	}
}

// refused reports a refused update: logged, counted, in the status.
func (c *Client) refused(typ, version string, err error) {
	c.log.Warn("xds update refused", "type", shortType(typ), "version", version, "reason", err)
	c.opts.Metrics.update("nacked")
	c.setStatus(func(st *Status) { st.LastError = err.Error() })
}

// errWaiting holds an update back until the types that follow it arrive.
var errWaiting = errors.New("waiting for the rest of the update")

// commit builds the configuration of r and applies it when it differs from
// what runs. An incomplete set is accepted and waits for the rest.
//
// Types arrive one response at a time. When their versions disagree the
// update is still on its way — clusters and endpoints come before the
// listeners that use them — so a cluster or endpoint update returns
// errWaiting, and only a listener update (or the settle timer, for a
// control plane that changed clusters alone; arrived "") applies; otherwise
// a mix of old listeners and new clusters, which no declaration ever said,
// could run for a moment. A set that does not build is refused at once,
// though: what is held back has been acknowledged, and over delta xDS the
// listeners that would have shown the refusal may never be sent again.
func (c *Client) commit(r resources, arrived string) error {
	if !r.complete() {
		return nil
	}
	cfg, err := c.v.Build(r.set, r.version())
	if errors.Is(err, ErrIncomplete) {
		c.log.Debug("xds update incomplete; waiting for the rest", "reason", err)
		return nil
	}
	if err != nil {
		return err
	}
	l := r.versions[ListenerType]
	agree := r.versions[ClusterType] == l && (len(c.edsNames(r.set)) == 0 || r.versions[EndpointType] == l)
	if !agree && arrived != ListenerType && arrived != "" {
		return errWaiting
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

// node is how this client names itself to the control plane, on the first
// request of every stream, delta or state of the world.
func (c *Client) node() *core.Node {
	return &core.Node{Id: c.opts.NodeID.String(), UserAgentName: "latch"}
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
