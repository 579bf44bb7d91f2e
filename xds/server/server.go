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
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	delta "github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	sotw "github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
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
	// StreamsPerPeer is how many ADS streams, and how many connections, one
	// workload instance (a SPIFFE ID connecting from one IP address) may
	// hold at once; DefaultStreamsPerPeer if zero. Past it, a stream is
	// refused with ResourceExhausted and a connection is closed after the
	// handshake, both logged with the peer's ID and address.
	StreamsPerPeer int
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

	// snapMu serialises snapshot changes. It is taken before mu, never
	// while mu is held (Update holds snapMu for long), and mu is never held
	// while calling into the cache.
	snapMu sync.Mutex
	// served is what each node is served, for every node with a
	// declaration now or before, or an open stream.
	served map[string]*servedNode
	ready  bool

	// Everything under mu belongs to an open stream or connection and goes
	// with it, so what a peer makes the server hold ends when it leaves.
	mu             sync.Mutex
	streamsPerPeer int
	streams        map[streamKey]*streamState
	// nodes lists each node's bound streams: one, as a rule, and a map
	// per node cost ten times the list.
	nodes map[string][]streamKey
	peers map[peerKey]*peerUse

	logLimit logLimiter

	handshakes *handshakeGate

	// acksChanged is signalled (without blocking; one pending signal is
	// enough) whenever what Acks returns may have changed.
	acksChanged chan struct{}
}

// servedNode is what a node is served. One record per node, not a map per
// field: with ten thousand nodes each map held its own copy of every node ID.
type servedNode struct {
	version string
	// decl is the declaration last translated for the node, if declared:
	// one equal to it translates to the same snapshot.
	decl     policy.Declaration
	declared bool
}

type streamKey struct {
	delta bool // SotW and delta streams are numbered independently
	id    int64
}

type streamState struct {
	// from is the peer: its SPIFFE ID, which is the node ID once the
	// stream is bound, and its address.
	from   peerKey
	bound  bool
	opened time.Time
	// types is what the stream was sent and answered, per served type (in
	// the order of typeIndex). Fixed, not maps: ten thousand streams hold
	// one each for their whole life.
	types [len(servedTypeURLs)]typeState
	// lastSent and lastSentVersion are the nonce and version of the latest
	// response; lastAcked is that nonce once acknowledged. Responses are
	// answered in order, so it means every response was.
	lastSent, lastSentVersion, lastAcked string

	// Delta: the names the stream is subscribed to, mirrored from
	// go-control-plane's subscription to bound it; nil until it names one.
	subscribed     map[subscription]struct{}
	subscribedSize int // bytes of those names
}

// subscription is a resource name a delta stream subscribed to, and the
// index of its type in servedTypeURLs.
type subscription struct {
	typ  int
	name string
}

// node is the node ID the stream is bound to, "" before its first request.
func (st *streamState) node() string {
	if !st.bound {
		return ""
	}
	return st.from.id
}

// typeState is what one stream was sent of one resource type and what its
// sidecar said of it.
type typeState struct {
	// nonce and version are those of the latest response of the type: an
	// acknowledgement or refusal names its nonce. One naming an earlier
	// response of the type is about a version already replaced (the sidecar
	// answers the latest next), so only the latest is kept, however many
	// changes the stream carries.
	nonce, version string
	// acked is the version the sidecar last acknowledged; nack the error
	// detail (clipped) of its last refusal not followed by an ACK.
	acked, nack string
}

// firstNACK is the refusal of the first type, in type URL order, whose last
// update the sidecar refused; "" if none.
func (st *streamState) firstNACK() string {
	for _, t := range st.types {
		if t.nack != "" {
			return t.nack
		}
	}
	return ""
}

// sentAny reports whether the stream was sent anything.
func (st *streamState) sentAny() bool {
	for _, t := range st.types {
		if t.nonce != "" {
			return true
		}
	}
	return false
}

// servedTypeURLs are the resource types of latch's snapshots, sorted. A
// request for any other is refused: go-control-plane would open a watch and
// keep the request for every type URL a peer makes up.
var servedTypeURLs = [...]string{resource.ClusterType, resource.EndpointType, resource.ListenerType}

// typeIndex is typeURL's index in servedTypeURLs, -1 if it is not served.
func typeIndex(typeURL string) int {
	for i, t := range servedTypeURLs {
		if t == typeURL {
			return i
		}
	}
	return -1
}

// New returns a Server whose streams end when ctx is done.
func New(ctx context.Context, opts Options) *Server {
	s := &Server{
		log:     opts.Logger,
		metrics: opts.Metrics,
		topts:   opts.Translate,
		streams: map[streamKey]*streamState{},
		nodes:   map[string][]streamKey{},
		peers:   map[peerKey]*peerUse{},
		served:  map[string]*servedNode{},

		streamsPerPeer: opts.StreamsPerPeer,
		handshakes:     newHandshakeGate(maxHandshakes, handshakeSlotHold, handshakeTimeout),
		acksChanged:    make(chan struct{}, 1),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.streamsPerPeer <= 0 {
		s.streamsPerPeer = DefaultStreamsPerPeer
	}
	s.cache = cache.NewSnapshotCache(true, cache.IDHash{}, cacheLogger{s})
	// Ordered ADS sends a snapshot's types in dependency order (clusters,
	// endpoints, listeners), which lets sidecars apply one change once, when
	// the listeners arrive, instead of a mix of old and new.
	s.xds = serverv3.NewServer(ctx, s.cache, s.callbacks(), sotw.WithOrderedADS(), sotw.WithLogger(cacheLogger{s}), delta.WithLogger(cacheLogger{s}))
	return s
}

// Update serves snap: every declared workload gets a snapshot of its
// resources, versioned by their content hash, and every workload that lost
// its declaration gets an empty one, so its sidecar stops serving it. Every
// declaration is compared with the one last served, and only those that
// differ are translated; UpdateChanged skips the comparison too.
func (s *Server) Update(snap policy.Snapshot) {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	declared := make(map[string]bool, len(snap.Declarations))
	for _, d := range snap.Declarations {
		declared[d.ID.String()] = true
	}
	var gone []string
	for node := range s.served {
		if !declared[node] {
			gone = append(gone, node)
		}
	}
	s.serve(snap.Declarations, gone, len(snap.Declarations), len(snap.Errors))
}

// UpdateChanged serves the change ch made to the declarations, snap being
// the declarations after it: the workloads ch names get snapshots of their
// declarations in snap, or empty ones if snap has none for them; every other
// workload keeps its snapshot and is not looked at, so the work of a change
// is that of the workloads it touches, however large the mesh. It serves
// what Update(snap) would, provided ch names every ID whose declaration
// changed since the last update.
func (s *Server) UpdateChanged(snap policy.Snapshot, ch policy.Change) {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	var declared []policy.Declaration
	var gone []string
	for _, id := range ch.IDs {
		if d, ok := snap.Lookup(id); ok {
			declared = append(declared, d)
		} else {
			gone = append(gone, id.String())
		}
	}
	s.serve(declared, gone, len(snap.Declarations), len(snap.Errors))
}

// serve gives each of declared a snapshot of its resources, unless it is
// the declaration last served, and each node of gone an empty snapshot (or
// nothing, once no stream is open for it). total and errs are the numbers
// of declarations and refusals now. It is called with s.snapMu held.
func (s *Server) serve(declared []policy.Declaration, gone []string, total, errs int) {
	s.ready = true
	s.metrics.declarationErrors(errs)
	var todo []policy.Declaration
	for _, d := range declared {
		// An unchanged declaration translates to the same snapshot; skip
		// the work (with many workloads, most are unchanged by an edit).
		if n := s.served[d.ID.String()]; n != nil && n.declared && reflect.DeepEqual(n.decl, d) {
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
				b := build(d.ID.String(), translate.Translate(d, s.topts))
				b.decl = &d
				results <- b
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
	for b := range results {
		if n := s.served[b.node]; n == nil || n.version != b.version {
			changed++
		}
		if s.install(b) {
			n := s.served[b.node]
			n.decl, n.declared = *b.decl, true
		}
	}
	removed := 0
	for _, node := range gone {
		n := s.served[node]
		if n == nil {
			continue
		}
		wasDeclared := n.declared
		if wasDeclared {
			removed++
		}
		n.decl, n.declared = policy.Declaration{}, false
		// A connected sidecar is told to serve nothing; one that is not
		// connected is forgotten, and told when it connects.
		if s.boundStreams(node) > 0 {
			if wasDeclared {
				// Its sidecar goes unready: say why here too.
				s.log.Warn("declaration removed: serving the node nothing", "node", node,
					"reason", "no declaration for this SPIFFE ID any more; its sidecar admits no peer and reaches no upstream")
			}
			_ = s.install(build(node, translate.Resources{}))
		} else {
			s.forget(node)
		}
	}
	s.metrics.nodes(total)
	s.log.Info("declarations served", "declared", total, "changed", changed, "removed", removed, "declaration_errors", errs)
}

// setSnapshot is called with s.snapMu held.
func (s *Server) setSnapshot(node string, r translate.Resources) { _ = s.install(build(node, r)) }

// forget drops what the server and the cache hold for a node. It is called
// with s.snapMu held, for a node with no declaration and no stream.
func (s *Server) forget(node string) {
	delete(s.served, node)
	s.cache.ClearSnapshot(node)
	s.metrics.forgetNode(node)
}

// forgetIfIdle forgets a node that has neither a declaration nor a stream:
// otherwise every workload that ever connected would keep a snapshot and the
// cache's status for its node.
func (s *Server) forgetIfIdle(node string) {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	if n := s.served[node]; (n != nil && n.declared) || s.boundStreams(node) > 0 {
		return
	}
	s.forget(node)
}

// boundStreams is the number of open streams bound to node.
func (s *Server) boundStreams(node string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.nodes[node])
}

// install serves b to its node unless the node already has that version,
// and reports whether the node now has it. It is called with s.snapMu held.
func (s *Server) install(b built) bool {
	node, version, r, err := b.node, b.version, b.r, b.err
	n := s.served[node]
	if n != nil && n.version == version && err == nil {
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
	if n == nil {
		n = &servedNode{}
		s.served[node] = n
	}
	n.version = version
	s.signalAcks()
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
	if n := s.served[node]; n != nil {
		return n.version
	}
	return ""
}

// LastNACK returns the error details of the updates node's open streams
// refused and have not ACKed a later version of since (one per resource type
// and stream, each cut to 1 KiB, the same text once), "" if none. A NACK is
// forgotten with its stream: a sidecar that reconnects refuses the update
// again if it still cannot take it.
func (s *Server) LastNACK(node string) string {
	s.mu.Lock()
	var msgs []string
	for _, k := range s.nodes[node] {
		for _, t := range s.streams[k].types {
			if t.nack != "" {
				msgs = append(msgs, t.nack)
			}
		}
	}
	s.mu.Unlock()
	slices.Sort(msgs)
	msgs = slices.Compact(msgs)
	if len(msgs) > maxListedNACKs {
		msgs = append(msgs[:maxListedNACKs], fmt.Sprintf("and %d more", len(msgs)-maxListedNACKs))
	}
	return strings.Join(msgs, "; ")
}

// Undeclared lists, sorted, the nodes with a bound stream that no
// declaration names: sidecars that are connected and serve nothing.
func (s *Server) Undeclared() []string {
	s.mu.Lock()
	nodes := make([]string, 0, len(s.nodes))
	for node, streams := range s.nodes {
		if len(streams) > 0 {
			nodes = append(nodes, node)
		}
	}
	s.mu.Unlock()
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	var out []string
	for _, node := range nodes {
		if n := s.served[node]; n == nil || !n.declared {
			out = append(out, node)
		}
	}
	slices.Sort(out)
	return out
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
// the peer certificate the handshake accepted. The server bounds what each
// peer can make it hold: connections per workload instance, message and
// header sizes, flow-control windows, streams per connection; see the
// constants in limits.go.
func (s *Server) NewGRPCServer(tlsConfig *tls.Config) *grpc.Server {
	g := grpc.NewServer(s.serverOptions(tlsConfig)...)
	s.Register(g)
	return g
}

func (s *Server) serverOptions(tlsConfig *tls.Config) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(peerCreds{credentials.NewTLS(tlsConfig), s}),
		grpc.ConnectionTimeout(handshakeTimeout),
		grpc.MaxRecvMsgSize(maxRequestBytes),
		grpc.MaxHeaderListSize(maxHeaderBytes),
		// Peers may not index request headers in HPACK's dynamic table
		// (4 KiB allowed by default), which gRPC keeps for the life of the
		// connection: a sidecar sends one header block per connection, so
		// indexing saves it nothing on the wire, and the table held about
		// 0.3 KiB per connection, 3 MiB with 10,000 sidecars
		// (BenchmarkFloor's heap profile). gRPC's own table, for the
		// headers it sends, is the peer's to size.
		grpc.HeaderTableSize(0),
		grpc.MaxConcurrentStreams(uint32(s.streamsPerPeer)),
		grpc.InitialWindowSize(windowBytes),
		grpc.InitialConnWindowSize(windowBytes),
		// No read buffer of gRPC's own: the TLS connection under it already
		// holds a whole record, and a second 32 KiB buffer per connection
		// was a quarter of the control plane's heap (320 MB with 10,000
		// sidecars). The 32 KiB write buffer is shared: a connection takes
		// one from a pool only while it writes (gRPC's default now:
		// SharedWriteBuffer is deprecated; the heap profile of 10,000
		// connections holds none).
		grpc.ReadBufferSize(0),
		// Sidecars ping every 20 s to notice a dead control plane quickly;
		// allow it, but no more often than every 10 s.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, MaxConnectionIdle: idleTimeout}),
	}
}

// ErrNodeMismatch is returned (as PermissionDenied) to a sidecar asking for a
// node ID other than the SPIFFE ID its certificate proves.
var ErrNodeMismatch = errors.New("node ID does not match the peer certificate's SPIFFE ID")

// peerOf returns the workload instance the verified client certificate on
// ctx names: its SPIFFE ID, and the peer's address.
func peerOf(ctx context.Context) (peerKey, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return peerKey{}, errors.New("no peer on the stream")
	}
	id, err := idFromAuth(p.AuthInfo)
	if err != nil {
		return peerKey{}, err
	}
	return peerKey{id: id.String(), addr: hostOf(p.Addr)}, nil
}

// logPeer logs a line a peer caused, unless peers have caused too many
// lately (logLimiter).
func (s *Server) logPeer(level slog.Level, msg string, args ...any) {
	ok, suppressed := s.logLimit.allow(time.Now())
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed_before", suppressed)
	}
	s.log.Log(context.Background(), level, msg, args...)
}

func (s *Server) callbacks() serverv3.CallbackFuncs {
	open := func(delta bool) func(context.Context, int64, string) error {
		return func(ctx context.Context, id int64, _ string) error {
			from, err := peerOf(ctx)
			if err != nil {
				s.metrics.refused("no_peer_id")
				s.logPeer(slog.LevelWarn, "xds stream refused", "reason", err)
				return status.Errorf(codes.Unauthenticated, "latch control plane: %v", err)
			}
			s.mu.Lock()
			if !s.acquire(from, true) {
				s.mu.Unlock()
				s.metrics.refused("stream_limit")
				s.logPeer(slog.LevelWarn, "xds stream refused", "peer_id", from.id, "remote_addr", from.addr,
					"reason", "stream limit", "limit", s.streamsPerPeer)
				return status.Errorf(codes.ResourceExhausted, "latch control plane: %s already holds %d xDS streams (the limit per workload instance)", from, s.streamsPerPeer)
			}
			from = s.peers[from].key
			s.streams[streamKey{delta, id}] = &streamState{from: from, opened: time.Now()}
			n := len(s.streams)
			s.mu.Unlock()
			s.metrics.connected(n)
			s.logPeer(slog.LevelInfo, "xds stream opened", "peer_id", from.id, "remote_addr", from.addr, "delta", delta)
			return nil
		}
	}
	closed := func(delta bool) func(int64, *core.Node) {
		return func(id int64, _ *core.Node) {
			key := streamKey{delta, id}
			s.mu.Lock()
			st := s.streams[key]
			if st != nil {
				delete(s.streams, key)
				s.release(st.from, true)
				if node := st.node(); node != "" {
					keys := s.nodes[node]
					if i := slices.Index(keys, key); i >= 0 {
						keys[i] = keys[len(keys)-1]
						keys = keys[:len(keys)-1]
					}
					if len(keys) == 0 {
						delete(s.nodes, node)
					} else {
						s.nodes[node] = keys
					}
				}
			}
			n := len(s.streams)
			s.mu.Unlock()
			if st == nil {
				return // refused when it opened
			}
			s.metrics.connected(n)
			if node := st.node(); node != "" {
				s.forgetIfIdle(node)
				s.signalAcks()
			}
			s.logPeer(slog.LevelInfo, "xds stream closed", "peer_id", st.from.id, "remote_addr", st.from.addr, "delta", delta,
				"duration", time.Since(st.opened).Round(time.Millisecond).String())
		}
	}
	return serverv3.CallbackFuncs{
		StreamOpenFunc:        open(false),
		StreamClosedFunc:      closed(false),
		DeltaStreamOpenFunc:   open(true),
		DeltaStreamClosedFunc: closed(true),
		StreamRequestFunc: func(id int64, req *discovery.DiscoveryRequest) error {
			key := streamKey{false, id}
			if err := s.checkNode(key, req.GetNode()); err != nil {
				return err
			}
			if err := s.checkType(key, req.GetTypeUrl()); err != nil {
				return err
			}
			slimNode(req.GetNode())
			s.share(key, &req.TypeUrl, &req.ResponseNonce, &req.VersionInfo)
			if req.GetErrorDetail() != nil {
				s.holdNACKed(key, req)
			}
			s.noteAck(key, req.GetTypeUrl(), req.GetVersionInfo(), req.GetVersionInfo() != "", req.GetErrorDetail())
			s.trackAck(key, req.GetTypeUrl(), req.GetResponseNonce(), req.GetErrorDetail() != nil)
			// go-control-plane keeps the request with its watch; it has no
			// use for the detail, which is noted (cut short) above.
			req.ErrorDetail = nil
			return nil
		},
		StreamDeltaRequestFunc: func(id int64, req *discovery.DeltaDiscoveryRequest) error {
			key := streamKey{true, id}
			if err := s.checkNode(key, req.GetNode()); err != nil {
				return err
			}
			if err := s.checkType(key, req.GetTypeUrl()); err != nil {
				return err
			}
			if err := s.checkSubscription(key, req); err != nil {
				return err
			}
			slimNode(req.GetNode())
			s.share(key, &req.TypeUrl, &req.ResponseNonce, nil)
			s.noteAck(key, req.GetTypeUrl(), "", req.GetResponseNonce() != "", req.GetErrorDetail())
			s.trackAck(key, req.GetTypeUrl(), req.GetResponseNonce(), req.GetErrorDetail() != nil)
			req.ErrorDetail = nil
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
			s.metrics.pushed(resp.GetTypeUrl())
			s.noteSent(streamKey{false, id}, resp.GetTypeUrl(), resp.GetNonce(), resp.GetVersionInfo())
		},
		StreamDeltaResponseFunc: func(id int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
			s.metrics.pushed(resp.GetTypeUrl())
			s.noteSent(streamKey{true, id}, resp.GetTypeUrl(), resp.GetNonce(), resp.GetSystemVersionInfo())
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
		bound := st.bound
		s.mu.Unlock()
		if bound {
			return nil // later requests may omit the node
		}
		s.metrics.refused("no_node_id")
		s.logPeer(slog.LevelWarn, "xds stream refused", "peer_id", st.from.id, "remote_addr", st.from.addr, "reason", "first request carries no node ID")
		return status.Error(codes.InvalidArgument, "latch control plane: the first request must carry the node ID")
	}
	if node.GetId() != st.from.id {
		s.mu.Unlock()
		s.metrics.refused("node_mismatch")
		nodeID := clip(node.GetId(), maxLoggedBytes)
		s.logPeer(slog.LevelWarn, "xds stream refused", "peer_id", st.from.id, "remote_addr", st.from.addr, "node", nodeID, "reason", ErrNodeMismatch.Error())
		return status.Errorf(codes.PermissionDenied, "latch control plane: node ID %q: %v (%s)", nodeID, ErrNodeMismatch, st.from.id)
	}
	if !st.bound {
		st.bound = true
		s.nodes[st.from.id] = append(s.nodes[st.from.id], key)
		// go-control-plane keeps the first request's node for the
		// stream's life: let it keep the server's copy of the ID rather
		// than the request's. (Later requests omit the node, or carry that
		// one, which go-control-plane may be reading: it is left alone.)
		node.Id = st.from.id
	}
	s.mu.Unlock()
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	// Before the first declarations load, "no declaration" means "not read
	// yet": the node waits rather than being told to serve nothing.
	if _, known := s.served[node.GetId()]; !known && s.ready {
		// The sidecar runs, is connected and will do nothing: a WARN, on
		// both sides (the sidecar's /readyz says it too).
		s.logPeer(slog.LevelWarn, "no declaration for node: serving it nothing", "node", node.GetId(),
			"reason", "no ServicePolicy declares this SPIFFE ID; its sidecar admits no peer and reaches no upstream until one does")
		s.setSnapshot(node.GetId(), translate.Resources{})
	}
	return nil
}

// checkType refuses a request for a type latch does not serve.
func (s *Server) checkType(key streamKey, typeURL string) error {
	if typeIndex(typeURL) >= 0 {
		return nil
	}
	s.mu.Lock()
	var from peerKey
	if st := s.streams[key]; st != nil {
		from = st.from
	}
	s.mu.Unlock()
	typeURL = clip(typeURL, maxLoggedBytes)
	s.metrics.refused("unknown_type")
	s.logPeer(slog.LevelWarn, "xds stream refused", "peer_id", from.id, "remote_addr", from.addr, "type", typeURL, "reason", "type not served")
	return status.Errorf(codes.InvalidArgument, "latch control plane: type %q is not served (only listeners, clusters and endpoints are)", typeURL)
}

// checkSubscription mirrors a delta stream's subscriptions and refuses the
// stream once they outgrow maxSubscriptionBytes: delta requests add names to
// what go-control-plane keeps for the stream, request after request.
func (s *Server) checkSubscription(key streamKey, req *discovery.DeltaDiscoveryRequest) error {
	s.mu.Lock()
	st := s.streams[key]
	if st == nil {
		s.mu.Unlock()
		return status.Error(codes.Internal, "latch control plane: request on an unknown stream")
	}
	typ := typeIndex(req.GetTypeUrl()) // served: checkType ran first
	for _, n := range req.GetResourceNamesSubscribe() {
		sub := subscription{typ, n}
		if _, had := st.subscribed[sub]; had {
			continue
		}
		if st.subscribedSize+len(n) > maxSubscriptionBytes {
			st.subscribedSize = maxSubscriptionBytes + 1
			break
		}
		if st.subscribed == nil {
			st.subscribed = map[subscription]struct{}{}
		}
		st.subscribed[sub] = struct{}{}
		st.subscribedSize += len(n)
	}
	for _, n := range req.GetResourceNamesUnsubscribe() {
		sub := subscription{typ, n}
		if _, had := st.subscribed[sub]; had {
			delete(st.subscribed, sub)
			st.subscribedSize -= len(n)
		}
	}
	over := st.subscribedSize > maxSubscriptionBytes
	from := st.from
	s.mu.Unlock()
	if !over {
		return nil
	}
	s.metrics.refused("subscription_limit")
	s.logPeer(slog.LevelWarn, "xds stream refused", "peer_id", from.id, "remote_addr", from.addr, "reason", "subscription limit", "limit_bytes", maxSubscriptionBytes)
	return status.Errorf(codes.ResourceExhausted, "latch control plane: the stream's subscriptions exceed %d bytes of resource names", maxSubscriptionBytes)
}

// slimNode drops what the server has no use for from a node that
// go-control-plane keeps for the life of the stream: only the ID, which
// checkNode proved equal to the peer's, matters (snapshots are keyed by it).
func slimNode(n *core.Node) {
	if n == nil {
		return
	}
	n.Cluster = ""
	n.Metadata = nil
	n.DynamicParameters = nil
	n.Locality = nil
	n.UserAgentName = ""
	n.UserAgentVersionType = nil
	n.Extensions = nil
	n.ClientFeatures = nil
	//lint:ignore SA1019 deprecated, but a peer can still fill it
	n.ListeningAddresses = nil
}

// share points a request's type URL, nonce and version (version may be nil)
// at equal strings the server holds already: the type URL it serves, the
// nonce and version of the stream's last response of the type. The
// request is kept by go-control-plane with the stream's watch of its type
// until the next one, so its own copies would be held once per stream and
// type. typeURL must be served (checkType).
func (s *Server) share(key streamKey, typeURL, nonce, version *string) {
	i := typeIndex(*typeURL)
	*typeURL = servedTypeURLs[i]
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[key]
	if st == nil {
		return
	}
	if t := &st.types[i]; *nonce == t.nonce {
		*nonce = t.nonce
	}
	if version != nil && *version == st.types[i].version {
		*version = st.types[i].version
	}
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
		if i := typeIndex(req.GetTypeUrl()); i >= 0 && req.GetResponseNonce() != "" && st.types[i].nonce == req.GetResponseNonce() {
			req.VersionInfo = st.types[i].version
		}
	}
}

// noteAck keeps the stream's last NACK of typeURL, cut to maxNACKBytes, and
// logs it; an ACK clears it. typeURL is one of servedTypeURLs, so a stream
// holds at most one NACK per served type.
func (s *Server) noteAck(key streamKey, typeURL, version string, ack bool, nack *rpcstatus.Status) {
	s.mu.Lock()
	st := s.streams[key]
	if st == nil {
		s.mu.Unlock()
		return
	}
	node := st.node()
	if nack == nil {
		switch {
		case ack && key.delta:
			// A delta stream's sidecar (latch's) applies the whole of what
			// it was sent, or nothing, and ACKs only the former: an ACK of
			// any type means every earlier refusal was made good, though
			// the refused type may not be sent again (only changes are).
			for i := range st.types {
				st.types[i].nack = ""
			}
		case ack:
			if i := typeIndex(typeURL); i >= 0 {
				st.types[i].nack = ""
			}
		}
		s.mu.Unlock()
		return
	}
	msg := clip(nack.GetMessage(), maxNACKBytes)
	if msg == "" {
		msg = fmt.Sprintf("(no message, code %d)", nack.GetCode())
	}
	if i := typeIndex(typeURL); i >= 0 {
		st.types[i].nack = msg
	}
	s.mu.Unlock()
	s.metrics.nack(node)
	s.logPeer(slog.LevelWarn, "update refused by sidecar", "node", node, "type", typeURL, "version", clip(version, maxLoggedBytes), "reason", msg)
}

// noteSent remembers which version went out with a response nonce, so that
// the acknowledgement naming the nonce says which version it accepted.
func (s *Server) noteSent(key streamKey, typeURL, nonce, version string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[key]; st != nil {
		if i := typeIndex(typeURL); i >= 0 { // always: only served types are sent
			st.types[i].nonce, st.types[i].version = nonce, version
		}
		st.lastSent, st.lastSentVersion = nonce, version
	}
}

// trackAck records the version a request acknowledges: the one sent with
// the response its nonce names (the first request of each type answers
// none). A refusal is kept by noteAck.
func (s *Server) trackAck(key streamKey, typeURL, nonce string, nacked bool) {
	if nonce == "" {
		return
	}
	s.mu.Lock()
	if st := s.streams[key]; st != nil && !nacked {
		if i := typeIndex(typeURL); i >= 0 && st.types[i].nonce == nonce {
			st.types[i].acked = st.types[i].version
		}
		if nonce == st.lastSent {
			st.lastAcked = nonce
		}
	}
	s.mu.Unlock()
	s.signalAcks()
}

func (s *Server) signalAcks() {
	select {
	case s.acksChanged <- struct{}{}:
	default:
	}
}

// NodeAcks is what the sidecars of one node connected to this server have
// done with the version it serves them.
type NodeAcks struct {
	Node string
	// Version is the snapshot version served to the node now.
	Version string
	// Connected counts the node's open streams; Acked those that have
	// acknowledged Version for every resource type sent to them; NACKed
	// those whose latest response of some type was refused, and NACK is
	// the refusal of one of them.
	Connected, Acked, NACKed int
	NACK                     string
}

// Acks returns, for every node with an open stream, what its sidecars have
// acknowledged, sorted by node.
func (s *Server) Acks() []NodeAcks {
	s.snapMu.Lock()
	served := make(map[string]string, len(s.served))
	for node, n := range s.served {
		served[node] = n.version
	}
	s.snapMu.Unlock()
	s.mu.Lock()
	out := make([]NodeAcks, 0, len(s.nodes))
	for node, keys := range s.nodes {
		na := NodeAcks{Node: node, Version: served[node]}
		for _, k := range keys {
			st := s.streams[k]
			na.Connected++
			if nack := st.firstNACK(); nack != "" {
				na.NACKed++
				if na.NACK == "" {
					na.NACK = nack
				}
				continue
			}
			applied := st.sentAny() && na.Version != ""
			if k.delta {
				// Delta sends only the types that changed, so a type's
				// last version may be older than the node's: the stream
				// is up to date when the last response carried the
				// node's version and was acknowledged.
				applied = applied && st.lastSentVersion == na.Version && st.lastAcked == st.lastSent
			} else {
				for _, t := range st.types {
					applied = applied && (t.nonce == "" || t.acked == na.Version)
				}
			}
			if applied {
				na.Acked++
			}
		}
		out = append(out, na)
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b NodeAcks) int { return strings.Compare(a.Node, b.Node) })
	return out
}

// AcksChanged is signalled when what Acks returns may have changed: a
// stream closed, a sidecar acknowledged or refused an update, or a node was
// given a new version.
func (s *Server) AcksChanged() <-chan struct{} { return s.acksChanged }

// VersionFor is the snapshot version a node serving d is given: a hash of
// the resources d translates to, equal across replicas.
func (s *Server) VersionFor(d policy.Declaration) string {
	return translate.Translate(d, s.topts).Hash()
}

// cacheLogger routes go-control-plane's logs to slog at debug level; the
// server logs what matters itself with stable keys. Its lines say where they
// come from with "library": the logger already carries the server's
// "component", and a second one would repeat the key in the line. They can
// carry what a peer sent (resource names, type URLs), so they are cut short,
// formatted only when logged, and warnings share the peers' log limit.
type cacheLogger struct{ s *Server }

func (c cacheLogger) logf(level slog.Level, f string, a ...any) {
	if !c.s.log.Enabled(context.Background(), level) {
		return
	}
	msg := clip(fmt.Sprintf(f, a...), maxNACKBytes)
	if level >= slog.LevelWarn {
		c.s.logPeer(level, msg, "library", "go-control-plane")
		return
	}
	c.s.log.Log(context.Background(), level, msg, "library", "go-control-plane")
}

func (c cacheLogger) Debugf(f string, a ...any) { c.logf(slog.LevelDebug, f, a...) }
func (c cacheLogger) Infof(f string, a ...any)  { c.logf(slog.LevelDebug, f, a...) }
func (c cacheLogger) Warnf(f string, a ...any)  { c.logf(slog.LevelWarn, f, a...) }
func (c cacheLogger) Errorf(f string, a ...any) { c.logf(slog.LevelError, f, a...) }
