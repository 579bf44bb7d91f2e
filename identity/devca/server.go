package devca

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// maxSocketPath is the portable limit on a unix socket path (sun_path is 104
// bytes on the BSDs and macOS, 108 on Linux, both counting the NUL).
const maxSocketPath = 103

// securityHeader is the metadata every Workload API call must carry; its
// absence means the caller is not a Workload API client (for instance a
// browser tricked into talking to the socket), and SPIRE refuses it.
const securityHeader = "workload.spiffe.io"

// AddWorkload registers id (a SPIFFE ID in the CA's trust domain), issues its
// first SVID, and starts a Workload API server for it alone on a fresh unix
// socket. It returns the socket's address, "unix:///abs/path.sock", usable as
// workloadapi.WithAddr(addr) or as SPIFFE_ENDPOINT_SOCKET. Registering the same
// ID twice is an error.
func (ca *CA) AddWorkload(id string) (string, error) {
	sid, err := ca.parseID(id)
	if err != nil {
		return "", err
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return "", ErrClosed
	}
	if w, ok := ca.workloads[sid]; ok {
		return "", fmt.Errorf("devca: workload %s already registered at %s", sid, w.addr)
	}

	path := filepath.Join(ca.socketDir, socketName(len(ca.order), sid))
	if len(path) > maxSocketPath {
		return "", fmt.Errorf("devca: socket path %q is %d bytes, longer than the %d a unix socket allows; choose a shorter SocketDir", path, len(path), maxSocketPath)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return "", fmt.Errorf("devca: listening for workload %s: %w", sid, err)
	}
	w := &workload{id: sid, addr: "unix://" + path, path: path}
	if err := ca.rotateLocked(w, time.Now(), "registered"); err != nil {
		lis.Close()
		return "", err
	}
	w.server = grpc.NewServer(
		grpc.UnaryInterceptor(requireSecurityHeaderUnary),
		grpc.StreamInterceptor(requireSecurityHeaderStream),
		// Close relies on Stop returning only after every handler has.
		grpc.WaitForHandlers(true),
	)
	workloadpb.RegisterSpiffeWorkloadAPIServer(w.server, &workloadAPI{ca: ca, id: sid})
	ca.workloads[sid] = w
	ca.order = append(ca.order, sid)

	ca.wg.Add(1)
	go func() {
		defer ca.wg.Done()
		if err := w.server.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			ca.log.Error("workload API server failed", "spiffe_id", sid.String(), "socket", path, "error", err, "warning", Warning)
		}
	}()
	ca.log.Info("serving workload API", "spiffe_id", sid.String(), "socket", path)
	ca.notifyLocked()
	ca.wakeScheduler()
	return w.addr, nil
}

// socketName makes a short, readable, unique file name: the registration index
// keeps it unique, the sanitized ID path makes `ls` informative.
func socketName(index int, id spiffeid.ID) string {
	var b strings.Builder
	for _, r := range strings.Trim(id.Path(), "/") {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '.':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
		if b.Len() >= 24 {
			break
		}
	}
	if b.Len() == 0 {
		return fmt.Sprintf("%02d.sock", index)
	}
	return fmt.Sprintf("%02d-%s.sock", index, b.String())
}

func checkSecurityHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(securityHeader); len(v) != 1 || v[0] != "true" {
		// Same code and message as SPIRE's agent.
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

func requireSecurityHeaderUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := checkSecurityHeader(ctx); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func requireSecurityHeaderStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := checkSecurityHeader(ss.Context()); err != nil {
		return err
	}
	return handler(srv, ss)
}

// workloadAPI serves one workload's identity. The JWT and WIT methods are left
// to the embedded Unimplemented server: latch only uses X.509.
type workloadAPI struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer
	ca *CA
	id spiffeid.ID
}

// x509State is what a FetchX509SVID stream last sent, or should send next.
type x509State struct {
	svidDER   []byte
	bundleGen uint64
}

// FetchX509SVID sends the workload's SVID and bundle at once and again after
// every change of either, until the client goes away or the CA closes.
func (s *workloadAPI) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream grpc.ServerStreamingServer[workloadpb.X509SVIDResponse]) error {
	ctx := stream.Context()
	s.ca.streamOpened(s.id, +1)
	defer s.ca.streamOpened(s.id, -1)

	var sent x509State
	for {
		resp, cur, changed, err := s.ca.x509SVIDResponse(s.id)
		if err != nil {
			return err
		}
		if sent.svidDER == nil || !bytes.Equal(cur.svidDER, sent.svidDER) || cur.bundleGen != sent.bundleGen {
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = cur
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		case <-s.ca.done:
			return status.Error(codes.Unavailable, "development CA closed")
		}
	}
}

// FetchX509Bundles sends the trust domain's bundle at once and again after
// every change.
func (s *workloadAPI) FetchX509Bundles(_ *workloadpb.X509BundlesRequest, stream grpc.ServerStreamingServer[workloadpb.X509BundlesResponse]) error {
	ctx := stream.Context()
	var sentGen uint64
	for {
		resp, gen, changed, err := s.ca.x509BundlesResponse()
		if err != nil {
			return err
		}
		if gen != sentGen {
			if err := stream.Send(resp); err != nil {
				return err
			}
			sentGen = gen
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		case <-s.ca.done:
			return status.Error(codes.Unavailable, "development CA closed")
		}
	}
}

func (ca *CA) streamOpened(id spiffeid.ID, delta int) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if w, ok := ca.workloads[id]; ok {
		w.streams += delta
	}
}

// x509SVIDResponse returns the current response for id, what it is made of,
// and the channel that is closed at the next change.
func (ca *CA) x509SVIDResponse(id spiffeid.ID) (*workloadpb.X509SVIDResponse, x509State, <-chan struct{}, error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return nil, x509State{}, nil, status.Error(codes.Unavailable, "development CA closed")
	}
	w, ok := ca.workloads[id]
	if !ok {
		// Cannot happen while sockets map one-to-one to workloads; answer like
		// SPIRE does for a caller it has no identity for.
		return nil, x509State{}, nil, status.Error(codes.PermissionDenied, "no identity issued")
	}
	resp := &workloadpb.X509SVIDResponse{
		Svids: []*workloadpb.X509SVID{{
			SpiffeId:    w.id.String(),
			X509Svid:    w.certDER,
			X509SvidKey: w.keyDER,
			Bundle:      ca.bundleDERLocked(),
		}},
		FederatedBundles: ca.federatedDERLocked(),
	}
	return resp, x509State{svidDER: w.certDER, bundleGen: ca.bundleGen}, ca.changed, nil
}

func (ca *CA) x509BundlesResponse() (*workloadpb.X509BundlesResponse, uint64, <-chan struct{}, error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if ca.closed {
		return nil, 0, nil, status.Error(codes.Unavailable, "development CA closed")
	}
	bundles := map[string][]byte{ca.td.IDString(): ca.bundleDERLocked()}
	for td, der := range ca.federatedDERLocked() {
		bundles[td] = der
	}
	resp := &workloadpb.X509BundlesResponse{Bundles: bundles}
	return resp, ca.bundleGen, ca.changed, nil
}

// bundleDERLocked is the bundle as the Workload API carries it: the
// authorities' DER certificates, concatenated.
func (ca *CA) bundleDERLocked() []byte {
	var b []byte
	for _, c := range ca.authorityCertsLocked() {
		b = append(b, c.Raw...)
	}
	return b
}
