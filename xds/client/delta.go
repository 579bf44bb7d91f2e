package client

import (
	"context"
	"fmt"
	"maps"
	"slices"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
)

// Delta (incremental) ADS: a response carries the resources of its type that
// changed and the names of those removed. Listeners and clusters are
// wildcard subscriptions, endpoints are asked for by the names the clusters
// give, as over state of the world.
//
// The control plane takes every resource it sent as held by the client,
// NACKed or not, and sends later changes relative to that: after a refused
// response it does not send the refused resources again, and a fix may
// change only some of them. So the client keeps the same view — every
// resource last sent, valid or not (deltaView) — and applies it whenever the
// whole of it is valid and complete: a response is applied all or nothing,
// and what runs is always something the control plane meant as a whole,
// never a mix of the refused response and the previous state. A refusal
// names the invalid resource, which may be one an earlier response brought.

// viewEntry is one resource as the control plane last sent it.
type viewEntry struct {
	version string
	raw     *anypb.Any
	err     error // why it was refused; nil when valid
	// The validated resource, of the entry's type.
	listener  Listener
	cluster   Cluster
	endpoints Endpoints
}

// deltaStream is one delta ADS stream.
type deltaStream struct {
	c      *Client
	stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	// view is, by type URL and name, every resource the control plane
	// takes this client to hold; versions the system version of each
	// type's last response.
	view     map[string]map[string]*viewEntry
	versions map[string]string
	latest   string   // system version of the latest response
	eds      []string // endpoint names subscribed to, sorted
}

// deltaSession runs a delta ADS stream. A control plane that does not
// implement delta answers the first receive with Unimplemented.
func (c *Client) deltaSession(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient) (gotResponse bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := ads.DeltaAggregatedResources(sctx, grpc.WaitForReady(false))
	if err != nil {
		return false, fmt.Errorf("opening delta ADS stream: %w", err)
	}
	c.setStatus(func(st *Status) { st.Protocol = Incremental.String() })
	d := &deltaStream{c: c, stream: stream, view: map[string]map[string]*viewEntry{}, versions: maps.Clone(c.pending.versions), latest: c.pending.latest}
	// A new stream starts from what the client holds: the last valid
	// resources, with the versions they came with (none for resources from
	// state of the world or the state file, which are then sent again).
	for _, typ := range []string{ListenerType, ClusterType, EndpointType} {
		d.view[typ] = map[string]*viewEntry{}
		for name, a := range c.pending.raw[typ] {
			e := &viewEntry{version: c.pending.resVersions[typ][name], raw: a}
			switch typ {
			case ListenerType:
				e.listener = c.pending.set.Listeners[name]
			case ClusterType:
				e.cluster = c.pending.set.Clusters[name]
			case EndpointType:
				e.endpoints = c.pending.set.Endpoints[name]
			}
			d.view[typ][name] = e
		}
	}
	node := c.node()
	// Clusters first, then listeners, as Envoy does: listeners refer to
	// clusters, and the client waits until references resolve.
	first := []*discovery.DeltaDiscoveryRequest{
		{Node: node, TypeUrl: ClusterType, ResourceNamesSubscribe: []string{"*"}, InitialResourceVersions: d.held(ClusterType)},
		{TypeUrl: ListenerType, ResourceNamesSubscribe: []string{"*"}, InitialResourceVersions: d.held(ListenerType)},
	}
	if names := c.edsNames(c.pending.set); len(names) > 0 {
		d.eds = names
		first = append(first, &discovery.DeltaDiscoveryRequest{TypeUrl: EndpointType, ResourceNamesSubscribe: names, InitialResourceVersions: d.held(EndpointType)})
	}
	for _, req := range first {
		if err := d.send(req); err != nil {
			// The stream's own error (Unimplemented, say) says more than
			// the send's io.EOF.
			if _, rerr := stream.Recv(); rerr != nil {
				return false, fmt.Errorf("receiving from control plane: %w", rerr)
			}
			return false, err
		}
	}
	return runLoop(sctx, c, streamLoop[*discovery.DeltaDiscoveryResponse]{
		recv:   stream.Recv,
		handle: d.handle,
		settle: c.opts.SettleTimeout / 10,
	})
}

// held is the versions of the resources of typ the stream starts with.
func (d *deltaStream) held(typ string) map[string]string {
	out := map[string]string{}
	for name, e := range d.view[typ] {
		if e.version != "" {
			out[name] = e.version
		}
	}
	return out
}

func (d *deltaStream) send(req *discovery.DeltaDiscoveryRequest) error {
	if err := d.stream.Send(req); err != nil {
		return fmt.Errorf("sending %s request: %w", shortType(req.GetTypeUrl()), err)
	}
	return nil
}

// handle takes one response into the view, applies the view if it is
// valid and completes an update, and ACKs or NACKs the response.
func (d *deltaStream) handle(resp *discovery.DeltaDiscoveryResponse) (waiting bool, _ error) {
	c := d.c
	typ := resp.GetTypeUrl()
	view, ok := d.view[typ]
	if !ok {
		c.log.Warn("ignoring response of a type latch did not ask for", "type", typ)
		return false, nil
	}
	// Every resource is validated as it arrives, valid or not, so the view
	// knows why each refused one was refused.
	var refusal error
	seen := make(map[string]bool, len(resp.GetResources()))
	for _, r := range resp.GetResources() {
		name := r.GetName()
		e := &viewEntry{version: r.GetVersion(), raw: r.GetResource()}
		if seen[name] {
			e.err = &ValidationError{Type: shortType(typ), Resource: name, Reason: "sent twice"}
		} else {
			e.validate(c.v, typ, name)
		}
		seen[name] = true
		if e.err != nil && refusal == nil {
			refusal = e.err
		}
		view[name] = e
	}
	for _, name := range resp.GetRemovedResources() {
		delete(view, name)
	}
	d.versions[typ] = resp.GetSystemVersionInfo()
	d.latest = resp.GetSystemVersionInfo()

	next, err := d.candidate()
	if refusal != nil {
		err = refusal // this response's own refusal says more than an older one
	}
	if err == nil {
		err = c.commit(next, typ)
	}
	if err == errWaiting {
		waiting, err = true, nil
	}
	ack := &discovery.DeltaDiscoveryRequest{TypeUrl: typ, ResponseNonce: resp.GetNonce()}
	if err != nil {
		// Refuse the whole response; what was running keeps running.
		c.refused(typ, resp.GetSystemVersionInfo(), err)
		ack.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
	} else {
		c.pending = next
	}
	if err := d.send(ack); err != nil {
		return false, err
	}
	if typ == ClusterType {
		return waiting, d.followClusters()
	}
	return waiting, nil
}

// validate checks the resource of an entry, named name in the response.
func (e *viewEntry) validate(v Validator, typ, name string) {
	var got string
	switch typ {
	case ListenerType:
		e.listener, e.err = v.Listener(e.raw)
		got = e.listener.Name
	case ClusterType:
		e.cluster, e.err = v.Cluster(e.raw)
		got = e.cluster.Name
	case EndpointType:
		e.endpoints, e.err = v.Endpoints(e.raw)
		got = e.endpoints.Name
	}
	if e.err == nil && got != name {
		e.err = &ValidationError{Type: shortType(typ), Resource: name, Field: "name", Reason: fmt.Sprintf("the resource is named %q", got)}
	}
}

// candidate is the view as resources, or the refusal of its first invalid
// resource (in type and name order).
func (d *deltaStream) candidate() (resources, error) {
	r := newResources()
	r.versions = maps.Clone(d.versions)
	r.latest = d.latest
	for _, typ := range []string{ClusterType, EndpointType, ListenerType} {
		names := slices.Sorted(maps.Keys(d.view[typ]))
		for _, name := range names {
			e := d.view[typ][name]
			if e.err != nil {
				return resources{}, e.err
			}
			r.raw[typ][name] = e.raw
			if e.version != "" {
				r.resVersions[typ][name] = e.version
			}
			switch typ {
			case ListenerType:
				r.set.Listeners[name] = e.listener
			case ClusterType:
				r.set.Clusters[name] = e.cluster
			case EndpointType:
				r.set.Endpoints[name] = e.endpoints
			}
		}
	}
	return r, nil
}

// followClusters subscribes to the endpoints the valid clusters of the view
// name, and unsubscribes from those none names any more. The view, not the
// applied set: the control plane takes the clusters it sent as held, and a
// later fix makes them apply, endpoints included. While a cluster of the
// view is refused nothing is unsubscribed: what it needs is unknown, and the
// fix may need what it needed before.
func (d *deltaStream) followClusters() error {
	var clusters Set
	clusters.Clusters = map[string]Cluster{}
	refused := false
	for name, e := range d.view[ClusterType] {
		if e.err == nil {
			clusters.Clusters[name] = e.cluster
		} else {
			refused = true
		}
	}
	names := d.c.edsNames(clusters)
	var add, drop []string
	for _, n := range names {
		if _, ok := slices.BinarySearch(d.eds, n); !ok {
			add = append(add, n)
		}
	}
	for _, n := range d.eds {
		if _, ok := slices.BinarySearch(names, n); !ok {
			drop = append(drop, n)
		}
	}
	if refused {
		names = slices.Concat(names, drop)
		slices.Sort(names)
		drop = nil
	}
	if len(add) == 0 && len(drop) == 0 {
		return nil
	}
	d.eds = names
	for _, n := range drop {
		delete(d.view[EndpointType], n)
	}
	return d.send(&discovery.DeltaDiscoveryRequest{TypeUrl: EndpointType, ResourceNamesSubscribe: add, ResourceNamesUnsubscribe: drop})
}
