package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	delta "github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	sotw "github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/translate"
)

// Options configure a Server. The zero value works.
type Options struct {
	Logger    *slog.Logger
	Metrics   *Metrics
	Translate translate.Options
}

// Server serves each sidecar the resources of the declaration for the SPIFFE
// ID it proved. It holds no state of its own beyond what the declarations
// give, so replicas fed the same declarations serve the same versions.
type Server struct {
	log     *slog.Logger
	metrics *Metrics
	topts   translate.Options
	cache   cache.SnapshotCache
	xds     serverv3.Server

	// snapMu serialises snapshot changes; it is never held while waiting
	// for mu, and mu is never held while calling into the cache.
	snapMu   sync.Mutex
	served   map[string]string             // node ID → snapshot version, for every node with a declaration now or before
	lastDecl map[string]policy.Declaration // node ID → declaration last translated
	ready    bool

	mu       sync.Mutex
	streams  map[streamKey]*streamState
	lastNACK map[string]map[string]string // node ID → type URL → last error_detail
}

type streamKey struct {
	delta bool // SotW and delta streams are numbered independently
	id    int64
}

type streamState struct {
	peer   spiffeid.ID
	node   string // node ID once proved equal to peer
	opened time.Time
	sent   map[string]string // SotW: response nonce → version sent with it
}

// New returns a Server whose streams end when ctx is done.
func New(ctx context.Context, opts Options) *Server {
	s := &Server{
		log:      opts.Logger,
		metrics:  opts.Metrics,
		topts:    opts.Translate,
		streams:  map[streamKey]*streamState{},
		served:   map[string]string{},
		lastDecl: map[string]policy.Declaration{},
		lastNACK: map[string]map[string]string{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.cache = cache.NewSnapshotCache(true, cache.IDHash{}, cacheLogger{s.log})
	// Ordered ADS sends a snapshot's types in dependency order (clusters,
	// endpoints, listeners), which lets sidecars apply one change once, when
	// the listeners arrive, instead of a mix of old and new.
	s.xds = serverv3.NewServer(ctx, s.cache, s.callbacks(), sotw.WithOrderedADS(), sotw.WithLogger(cacheLogger{s.log}), delta.WithLogger(cacheLogger{s.log}))
	return s
}

// Update serves snap: every declared workload gets a snapshot of its
// resources, versioned by their content hash, and every workload that lost
// its declaration gets an empty one, so its sidecar stops serving it.
func (s *Server) Update(snap policy.Snapshot) {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	s.ready = true
	s.metrics.declarationErrors(len(snap.Errors))
	declared := map[string]bool{}
	var todo []policy.Declaration
	for _, d := range snap.Declarations {
		node := d.ID.String()
		declared[node] = true
		// An unchanged declaration translates to the same snapshot; skip
		// the work (with many workloads, most are unchanged by an edit).
		if prev, ok := s.lastDecl[node]; ok && reflect.DeepEqual(prev, d) {
			continue
		}
		todo = append(todo, d)
	}
	// Translation is pure and per node, so it runs on every core; snapshots
	// are installed as they come, so the first sidecars get theirs while
	// the rest are still being built.
	jobs := make(chan policy.Declaration)
	results := make(chan built)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), max(len(todo), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range jobs {
				results <- build(d.ID.String(), translate.Translate(d, s.topts))
			}
		}()
	}
	go func() {
		for _, d := range todo {
			jobs <- d
		}
		close(jobs)
		wg.Wait()
		close(results)
	}()
	changed := 0
	installed := map[string]bool{}
	for b := range results {
		if s.served[b.node] != b.version {
			changed++
		}
		installed[b.node] = s.install(b)
	}
	for _, d := range todo {
		if installed[d.ID.String()] {
			s.lastDecl[d.ID.String()] = d
		}
	}
	removed := 0
	for node := range s.served {
		if !declared[node] && s.lastDecl[node].Name != "" {
			removed++
		}
		if !declared[node] {
			delete(s.lastDecl, node)
			_ = s.install(build(node, translate.Resources{}))
		}
	}
	s.metrics.nodes(len(declared))
	s.log.Info("declarations served", "declared", len(declared), "changed", changed, "removed", removed, "declaration_errors", len(snap.Errors))
}

// built is one node's snapshot, ready to install.
type built struct {
	node, version string
	r             translate.Resources
	snap          *cache.Snapshot
	err           error
}

// build makes a consistent snapshot of r, versioned by its content hash.
func build(node string, r translate.Resources) built {
	b := built{node: node, version: r.Hash(), r: r}
	res := map[resource.Type][]types.Resource{
		resource.ListenerType: {},
		resource.ClusterType:  {},
		resource.EndpointType: {},
	}
	for _, l := range r.Listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
	}
	for _, c := range r.Clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], c)
	}
	for _, e := range r.Endpoints {
		res[resource.EndpointType] = append(res[resource.EndpointType], e)
	}
	b.snap, b.err = cache.NewSnapshot(b.version, res)
	if b.err == nil {
		b.err = b.snap.Consistent()
	}
	return b
}

// setSnapshot is called with s.snapMu held.
func (s *Server) setSnapshot(node string, r translate.Resources) { _ = s.install(build(node, r)) }

// install serves b to its node unless the node already has that version,
// and reports whether the node now has it. It is called with s.snapMu held.
func (s *Server) install(b built) bool {
	node, version, r, err := b.node, b.version, b.r, b.err
	if s.served[node] == version {
		return true
	}
	if err == nil {
		err = s.cache.SetSnapshot(context.Background(), node, b.snap)
	}
	if err != nil {
		// Translation only builds consistent snapshots; this is a bug, and
		// the node keeps what it had rather than something half-made.
		s.log.Error("snapshot refused", "node", node, "version", version, "reason", err)
		return false
	}
	s.served[node] = version
	s.log.Debug("snapshot updated", "node", node, "version", version,
		"listeners", len(r.Listeners), "clusters", len(r.Clusters), "endpoints", len(r.Endpoints))
	return true
}

// Ready reports whether declarations have been loaded at least once.
func (s *Server) Ready() bool {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	return s.ready
}

// Version returns the snapshot version served to node ("" if none).
func (s *Server) Version(node string) string {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	return s.served[node]
}

// LastNACK returns the error details of the updates node refused and has
// not ACKed a later version of since (one per resource type), "" if none.
func (s *Server) LastNACK(node string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var msgs []string
	for _, m := range s.lastNACK[node] {
		msgs = append(msgs, m)
	}
	slices.Sort(msgs)
	return strings.Join(msgs, "; ")
}

// Connected is the number of open xDS streams.
func (s *Server) Connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.streams)
}

// Register adds the ADS service to g.
func (s *Server) Register(g *grpc.Server) {
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
}

// NewGRPCServer returns a gRPC server with ADS registered, speaking mTLS with
// tlsConfig. tlsConfig must require and verify client certificates as SVIDs
// (identity's ServerConfig does, in VerifyConnection): the node check reads
// the peer certificate the handshake accepted.
func (s *Server) NewGRPCServer(tlsConfig *tls.Config) *grpc.Server {
	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConfig)),
		// Sidecars ping to notice a dead control plane quickly; allow it.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	)
	s.Register(g)
	return g
}

// ErrNodeMismatch is returned (as PermissionDenied) to a sidecar asking for a
// node ID other than the SPIFFE ID its certificate proves.
var ErrNodeMismatch = errors.New("node ID does not match the peer certificate's SPIFFE ID")

// peerID returns the SPIFFE ID of the verified client certificate on ctx.
func peerID(ctx context.Context) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, errors.New("no peer on the stream")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return spiffeid.ID{}, errors.New("stream is not over TLS")
	}
	if !info.State.HandshakeComplete || len(info.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	return x509svid.IDFromCert(info.State.PeerCertificates[0])
}

func (s *Server) callbacks() serverv3.CallbackFuncs {
	open := func(delta bool) func(context.Context, int64, string) error {
		return func(ctx context.Context, id int64, _ string) error {
			pid, err := peerID(ctx)
			if err != nil {
				s.metrics.refused("no_peer_id")
				s.log.Warn("xds stream refused", "reason", err)
				return status.Errorf(codes.Unauthenticated, "latch control plane: %v", err)
			}
			s.mu.Lock()
			s.streams[streamKey{delta, id}] = &streamState{peer: pid, opened: time.Now(), sent: map[string]string{}}
			n := len(s.streams)
			s.mu.Unlock()
			s.metrics.connected(n)
			s.log.Info("xds stream opened", "peer_id", pid.String(), "delta", delta)
			return nil
		}
	}
	closed := func(delta bool) func(int64, *core.Node) {
		return func(id int64, _ *core.Node) {
			s.mu.Lock()
			st := s.streams[streamKey{delta, id}]
			delete(s.streams, streamKey{delta, id})
			n := len(s.streams)
			s.mu.Unlock()
			s.metrics.connected(n)
			if st != nil {
				s.log.Info("xds stream closed", "peer_id", st.peer.String(), "delta", delta, "duration", time.Since(st.opened).Round(time.Millisecond).String())
			}
		}
	}
	return serverv3.CallbackFuncs{
		StreamOpenFunc:        open(false),
		StreamClosedFunc:      closed(false),
		DeltaStreamOpenFunc:   open(true),
		DeltaStreamClosedFunc: closed(true),
		StreamRequestFunc: func(id int64, req *discovery.DiscoveryRequest) error {
			if err := s.checkNode(streamKey{false, id}, req.GetNode()); err != nil {
				return err
			}
			s.noteAck(req.GetNode().GetId(), req.GetTypeUrl(), req.GetVersionInfo(), req.GetErrorDetail())
			if req.GetErrorDetail() != nil {
				s.holdNACKed(streamKey{false, id}, req)
			}
			return nil
		},
		StreamDeltaRequestFunc: func(id int64, req *discovery.DeltaDiscoveryRequest) error {
			if err := s.checkNode(streamKey{true, id}, req.GetNode()); err != nil {
				return err
			}
			s.noteAck(s.streamNode(streamKey{true, id}), req.GetTypeUrl(), "", req.GetErrorDetail())
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
			s.metrics.pushed(resp.GetTypeUrl())
			s.mu.Lock()
			if st := s.streams[streamKey{false, id}]; st != nil {
				if len(st.sent) > 64 {
					clear(st.sent) // only the latest nonces matter
				}
				st.sent[resp.GetNonce()] = resp.GetVersionInfo()
			}
			s.mu.Unlock()
		},
		StreamDeltaResponseFunc: func(_ int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
			s.metrics.pushed(resp.GetTypeUrl())
		},
		FetchRequestFunc: func(context.Context, *discovery.DiscoveryRequest) error {
			// REST fetches carry no stream to bind a node to a peer.
			return status.Error(codes.Unimplemented, "latch control plane serves ADS streams only")
		},
	}
}

// checkNode binds a stream to its node ID on the first request and holds it
// there: the node must be the peer's SPIFFE ID, and may not change later. A
// node the control plane has no declaration for gets an empty snapshot, so
// it learns it should serve nothing rather than wait.
func (s *Server) checkNode(key streamKey, node *core.Node) error {
	s.mu.Lock()
	st := s.streams[key]
	if st == nil {
		s.mu.Unlock()
		return status.Error(codes.Internal, "latch control plane: request on an unknown stream")
	}
	if node == nil || node.GetId() == "" {
		bound := st.node != ""
		s.mu.Unlock()
		if bound {
			return nil // later requests may omit the node
		}
		s.metrics.refused("no_node_id")
		s.log.Warn("xds stream refused", "peer_id", st.peer.String(), "reason", "first request carries no node ID")
		return status.Error(codes.InvalidArgument, "latch control plane: the first request must carry the node ID")
	}
	if node.GetId() != st.peer.String() {
		s.mu.Unlock()
		s.metrics.refused("node_mismatch")
		s.log.Warn("xds stream refused", "peer_id", st.peer.String(), "node", node.GetId(), "reason", ErrNodeMismatch.Error())
		return status.Errorf(codes.PermissionDenied, "latch control plane: node ID %q: %v (%s)", node.GetId(), ErrNodeMismatch, st.peer)
	}
	st.node = node.GetId()
	s.mu.Unlock()
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	// Before the first declarations load, "no declaration" means "not read
	// yet": the node waits rather than being told to serve nothing.
	if _, known := s.served[node.GetId()]; !known && s.ready {
		s.log.Info("no declaration for node: serving it nothing", "node", node.GetId())
		s.setSnapshot(node.GetId(), translate.Resources{})
	}
	return nil
}

// holdNACKed stops a refused version from being sent again at once. A SotW
// NACK carries the last version the sidecar accepted; the snapshot cache
// sees that it differs from the current one and would resend the refused
// update immediately, forever. Marking the request as having seen the
// version it refused makes the cache wait for the next change instead.
func (s *Server) holdNACKed(key streamKey, req *discovery.DiscoveryRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[key]; st != nil {
		if v, ok := st.sent[req.GetResponseNonce()]; ok {
			req.VersionInfo = v
		}
	}
}

func (s *Server) streamNode(key streamKey) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[key]; st != nil {
		return st.node
	}
	return ""
}

func (s *Server) noteAck(node, typeURL, version string, detail interface{ GetMessage() string }) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if msg := detail.GetMessage(); msg != "" {
		if s.lastNACK[node] == nil {
			s.lastNACK[node] = map[string]string{}
		}
		s.lastNACK[node][typeURL] = msg
		s.metrics.nack(node)
		s.log.Warn("update refused by sidecar", "node", node, "type", typeURL, "version", version, "reason", msg)
		return
	}
	if version != "" {
		delete(s.lastNACK[node], typeURL)
	}
}

// cacheLogger routes go-control-plane's logs to slog at debug level; the
// server logs what matters itself with stable keys. Its lines say where they
// come from with "library": the logger already carries the server's
// "component", and a second one would repeat the key in the line.
type cacheLogger struct{ l *slog.Logger }

func (c cacheLogger) Debugf(f string, a ...any) {
	c.l.Debug(fmt.Sprintf(f, a...), "library", "go-control-plane")
}
func (c cacheLogger) Infof(f string, a ...any) {
	c.l.Debug(fmt.Sprintf(f, a...), "library", "go-control-plane")
}
func (c cacheLogger) Warnf(f string, a ...any) {
	c.l.Warn(fmt.Sprintf(f, a...), "library", "go-control-plane")
}
func (c cacheLogger) Errorf(f string, a ...any) {
	c.l.Error(fmt.Sprintf(f, a...), "library", "go-control-plane")
}
