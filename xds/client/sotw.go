package client

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
)

// State-of-the-world ADS: every response carries every resource of its type.

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

// session is a state-of-the-world stream.
type session struct {
	c      *Client
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *core.Node
	types  map[string]*typeState
	sent   bool // node sent
}

// sotwSession runs a state-of-the-world ADS stream on conn.
func (c *Client) sotwSession(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient) (gotResponse bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := ads.StreamAggregatedResources(sctx, grpc.WaitForReady(false))
	if err != nil {
		return false, fmt.Errorf("opening ADS stream: %w", err)
	}
	c.setStatus(func(st *Status) { st.Protocol = StateOfTheWorld.String() })
	s := &session{
		c:      c,
		stream: stream,
		node:   c.node(),
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
	return runLoop(sctx, c, streamLoop[*discovery.DiscoveryResponse]{
		recv:   stream.Recv,
		handle: s.handle,
		due:    s.sendDue,
		settle: c.opts.SettleTimeout,
	})
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
		c.refused(typ, resp.GetVersionInfo(), err)
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
	r.resVersions[typ] = map[string]string{} // state of the world has no resource versions
	return nil
}
