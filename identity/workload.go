package identity

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
)

// SocketEnv is the environment variable naming the Workload API socket when
// no socket is configured, by SPIFFE convention.
const SocketEnv = workloadapi.SocketEnv

// BundleLister is the optional half of a Source that can say which bundles
// it holds: the local trust domain's and every federated one. WorkloadSource
// and identitytest.Source have it; /status and the metrics list federated
// bundles through it.
type BundleLister interface {
	X509Bundles() []*x509bundle.Bundle
}

// WorkloadSource is the workload's identity as the SPIFFE Workload API hands
// it out: the X.509-SVID and every X.509 bundle of the X.509 context, the
// local trust domain's and those of the trust domains it federates with. It
// follows the Workload API's updates until Close.
//
// It does what go-spiffe's workloadapi.X509Source does, and also lists the
// bundles (X509Bundles), which X509Source keeps to itself: federated bundles
// must be visible in /status and the metrics, and their removal must reach
// the proxy (Changed).
type WorkloadSource struct {
	client *workloadapi.Client
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool

	x509 atomic.Pointer[workloadapi.X509Context]
	// updated has one slot, for one receiver: Updated's (the identity
	// monitor's). changed is closed and replaced on every update, for any
	// number of receivers.
	updated chan struct{}
	mu      sync.Mutex
	changed chan struct{}
	first   chan struct{}
	once    sync.Once
}

var (
	_ Source       = (*WorkloadSource)(nil)
	_ BundleLister = (*WorkloadSource)(nil)
)

// NewWorkloadSource connects to the SPIFFE Workload API at socket ("" means
// $SPIFFE_ENDPOINT_SOCKET) and waits, up to ctx's deadline, for the first
// X.509-SVID and bundle. A bare path is taken as a unix socket. The source
// follows rotations until Close; log receives the Workload API client's
// messages (nil discards them).
func NewWorkloadSource(ctx context.Context, socket string, log *slog.Logger) (*WorkloadSource, error) {
	if socket == "" {
		socket = os.Getenv(SocketEnv)
	}
	if socket == "" {
		return nil, errors.New("no SPIFFE Workload API socket: pass the socket address (e.g. unix:///run/spire/agent.sock) or set " + SocketEnv)
	}
	if strings.HasPrefix(socket, "/") {
		socket = "unix://" + socket
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	waiting := func(err error) error {
		return fmt.Errorf("waiting for the first X.509-SVID from the Workload API at %s: %w", socket, err)
	}
	screen := func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return screenedStream{cs, log, socket}, nil
	}
	client, err := workloadapi.New(ctx,
		workloadapi.WithAddr(socket),
		workloadapi.WithLogger(spiffeLogger{log.With("component", "workloadapi", "socket", socket)}),
		workloadapi.WithDialOptions(grpc.WithChainStreamInterceptor(screen)))
	if err != nil {
		return nil, waiting(err)
	}
	watchCtx, cancel := context.WithCancel(context.Background())
	s := &WorkloadSource{
		client:  client,
		cancel:  cancel,
		updated: make(chan struct{}, 1),
		changed: make(chan struct{}),
		first:   make(chan struct{}),
	}
	watchErr := make(chan error, 1)
	s.wg.Go(func() { watchErr <- client.WatchX509Context(watchCtx, s) })
	select {
	case <-s.first:
		// Like X509Source: the first context is no update to tell anyone of.
		select {
		case <-s.updated:
		default:
		}
		return s, nil
	case err := <-watchErr:
		s.Close()
		return nil, waiting(err)
	case <-ctx.Done():
		s.Close()
		return nil, waiting(ctx.Err())
	}
}

// OnX509ContextUpdate implements workloadapi.X509ContextWatcher. A context
// without an SVID is ignored, as X509Source would fail on it: the previous
// one keeps serving.
func (s *WorkloadSource) OnX509ContextUpdate(c *workloadapi.X509Context) {
	if c == nil || len(c.SVIDs) == 0 || c.Bundles == nil {
		return
	}
	s.x509.Store(c)
	select {
	case s.updated <- struct{}{}:
	default:
	}
	s.mu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	s.once.Do(func() { close(s.first) })
}

// OnX509ContextWatchError implements workloadapi.X509ContextWatcher; the
// client logs the error and retries on its own.
func (s *WorkloadSource) OnX509ContextWatchError(error) {}

func (s *WorkloadSource) current() (*workloadapi.X509Context, error) {
	if s.closed.Load() {
		return nil, errors.New("workload source: closed")
	}
	c := s.x509.Load()
	if c == nil {
		return nil, errors.New("workload source: no X.509 context from the Workload API yet")
	}
	return c, nil
}

// GetX509SVID returns the current X.509-SVID (the Workload API's default,
// the first it lists).
func (s *WorkloadSource) GetX509SVID() (*x509svid.SVID, error) {
	c, err := s.current()
	if err != nil {
		return nil, err
	}
	return c.DefaultSVID(), nil
}

// GetX509BundleForTrustDomain returns the current bundle of td: the local
// trust domain's or a federated one's.
func (s *WorkloadSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	c, err := s.current()
	if err != nil {
		return nil, err
	}
	return c.Bundles.GetX509BundleForTrustDomain(td)
}

// X509Bundles returns every bundle of the current context, local and
// federated, ordered by trust domain name.
func (s *WorkloadSource) X509Bundles() []*x509bundle.Bundle {
	c, err := s.current()
	if err != nil {
		return nil
	}
	return sortedBundles(c.Bundles.Bundles())
}

func sortedBundles(bs []*x509bundle.Bundle) []*x509bundle.Bundle {
	bs = slices.Clone(bs)
	slices.SortFunc(bs, func(a, b *x509bundle.Bundle) int { return cmp.Compare(a.TrustDomain().Name(), b.TrustDomain().Name()) })
	return bs
}

// Updated returns a channel with one slot that receives after every update
// of the SVID or the bundles: for one receiver (go-spiffe's X509Source does
// the same). Several receivers use Changed.
func (s *WorkloadSource) Updated() <-chan struct{} { return s.updated }

// WaitUntilUpdated waits for the next update, or until ctx is done.
func (s *WorkloadSource) WaitUntilUpdated(ctx context.Context) error {
	select {
	case <-s.updated:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Changed returns a channel that is closed at the next update of the SVID
// or the bundles. Any number of goroutines may wait on it; each calls
// Changed again for the update after.
func (s *WorkloadSource) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// Close stops following the Workload API and waits for the watch to end.
// The getters fail from then on.
func (s *WorkloadSource) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.cancel()
	s.wg.Wait()
	return s.client.Close()
}

// screenedStream is a Workload API stream whose X.509-SVID responses are
// screened (screenFederated) before go-spiffe parses them.
type screenedStream struct {
	grpc.ClientStream
	log    *slog.Logger
	socket string
}

func (c screenedStream) RecvMsg(m any) error {
	if err := c.ClientStream.RecvMsg(m); err != nil {
		return err
	}
	if resp, ok := m.(*workloadpb.X509SVIDResponse); ok {
		for _, d := range screenFederated(resp) {
			c.log.Warn("Workload API: federated bundle ignored", "socket", c.socket, "key", d.key, "reason", d.reason)
		}
	}
	return nil
}

// ignoredBundle is a federated bundle entry screenFederated took out.
type ignoredBundle struct{ key, reason string }

// screenFederated takes out of an X.509-SVID response the federated bundle
// entries that could change which CAs vouch for a trust domain other than
// the way federation means. go-spiffe (parseX509Bundles) puts the bundles
// of the SVIDs and then every federated_bundles entry into one set keyed by
// trust domain, the last one of a trust domain winning, so:
//   - an entry named as the trust domain of one of the response's SVIDs (the
//     local one, in either spelling) would replace the local bundle: the CAs
//     it lists would vouch for local identities, and the local CA for none.
//     It is ignored; the SVID's own bundle stands.
//   - a trust domain named by two entries (two spellings, "spiffe://td" and
//     "td") with different CAs would get one of them, a different one from
//     update to update (map order). Both are ignored, so the trust domain's
//     peers are refused (unknown_ca) rather than verified by a coin toss.
//
// A SPIRE agent sends neither; the local trust domain's bundle must come
// from the local SPIRE server and nowhere else. An entry whose name does not
// parse is left for go-spiffe to refuse with the whole response.
func screenFederated(resp *workloadpb.X509SVIDResponse) []ignoredBundle {
	if len(resp.GetFederatedBundles()) == 0 {
		return nil
	}
	local := map[spiffeid.TrustDomain]bool{}
	for _, svid := range resp.GetSvids() {
		if td, err := spiffeid.TrustDomainFromString(svid.GetSpiffeId()); err == nil {
			local[td] = true
		}
	}
	var ignored []ignoredBundle
	keys := map[spiffeid.TrustDomain][]string{}
	for _, key := range slices.Sorted(maps.Keys(resp.FederatedBundles)) {
		td, err := spiffeid.TrustDomainFromString(key)
		if err != nil {
			continue
		}
		if local[td] {
			delete(resp.FederatedBundles, key)
			ignored = append(ignored, ignoredBundle{key, fmt.Sprintf("names the local trust domain %q, whose bundle comes with the SVID only", td.Name())})
			continue
		}
		keys[td] = append(keys[td], key)
	}
	for td, ks := range keys {
		if len(ks) < 2 {
			continue
		}
		first := resp.FederatedBundles[ks[0]]
		same := true
		for _, k := range ks[1:] {
			same = same && bytes.Equal(resp.FederatedBundles[k], first)
		}
		for _, k := range ks {
			if same && k == ks[0] {
				continue // the same bundle twice: one is enough
			}
			delete(resp.FederatedBundles, k)
			if !same {
				ignored = append(ignored, ignoredBundle{k, fmt.Sprintf("trust domain %q is listed %d times with different CAs", td.Name(), len(ks))})
			}
		}
	}
	return ignored
}

// spiffeLogger adapts slog to go-spiffe's printf-style logger.
type spiffeLogger struct{ l *slog.Logger }

func (s spiffeLogger) Debugf(format string, args ...any) { s.l.Debug(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Infof(format string, args ...any)  { s.l.Info(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Warnf(format string, args ...any)  { s.l.Warn(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Errorf(format string, args ...any) { s.l.Error(fmt.Sprintf(format, args...)) }
