package server

import (
	"fmt"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/translate"
)

// built is one node's snapshot, ready to install.
type built struct {
	node, version string
	r             translate.Resources
	snap          *nodeSnapshot
	err           error
	// decl is the declaration r was translated from; nil for an empty
	// snapshot given to a node without one.
	decl *policy.Declaration
}

// build makes a consistent snapshot of r, versioned by its content hash,
// holding each resource encoded (see nodeSnapshot).
func build(node string, r translate.Resources) built {
	b := built{node: node, r: r}
	// Consistency reads the clusters' references to endpoints, which the
	// encoded clusters no longer show: it is checked on r.
	full, err := cache.NewSnapshot("", byType(r))
	if err == nil {
		err = full.Consistent()
	}
	if err == nil {
		b.snap, err = encodeSnapshot(r)
	}
	if err != nil {
		b.err = err
		return b
	}
	b.version = b.snap.version
	return b
}

// byType lists r's resources by type, as go-control-plane's snapshot takes
// them.
func byType(r translate.Resources) map[resource.Type][]types.Resource {
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
	return res
}

// nodeSnapshot is what the cache holds for one node, for as long as the node
// has a declaration: its resources, each marshalled once, under one version.
// It implements go-control-plane's cache.ResourceSnapshot. Its own Snapshot
// holds every resource as a message of its type (a Cluster is a 552-byte
// struct before any of its fields) and indexes them in a map per type; with
// ten thousand nodes those were half of what the control plane held for its
// declarations. Here a node's resources are one buffer of their bytes and
// one array of small holders, and the maps the cache asks for are made when
// it asks (when a stream is answered), from a handful of resources.
type nodeSnapshot struct {
	version string
	// byType holds the resources of each of servedTypeURLs, in the
	// translation's order; the three slices share one array.
	byType [len(servedTypeURLs)][]encodedResource
}

// encodedResource is one resource, marshalled. It is a message whose
// unknown fields are the resource's bytes, which marshalling copies as they
// are: it marshals to exactly those bytes, and a sidecar decodes them as
// the resource's type (a response names the type, not the message).
type encodedResource struct {
	emptypb.Empty
	name string
}

// GetName is the resource's name, as go-control-plane reads it
// (cache.GetResourceName).
func (r *encodedResource) GetName() string { return r.name }

func (r *encodedResource) bytes() []byte { return r.ProtoReflect().GetUnknown() }

var _ cache.ResourceSnapshot = (*nodeSnapshot)(nil)

// encodeSnapshot marshals r's resources into a nodeSnapshot, versioned by
// the hash translate.Resources.Hash gives r.
func encodeSnapshot(r translate.Resources) (*nodeSnapshot, error) {
	var lists [len(servedTypeURLs)][]types.Resource
	for _, l := range r.Listeners {
		lists[typeIndex(resource.ListenerType)] = append(lists[typeIndex(resource.ListenerType)], l)
	}
	for _, c := range r.Clusters {
		lists[typeIndex(resource.ClusterType)] = append(lists[typeIndex(resource.ClusterType)], c)
	}
	for _, e := range r.Endpoints {
		lists[typeIndex(resource.EndpointType)] = append(lists[typeIndex(resource.EndpointType)], e)
	}
	det := proto.MarshalOptions{Deterministic: true}
	size, n := 0, 0
	for _, list := range lists {
		for _, m := range list {
			size += det.Size(m)
			n++
		}
	}
	// One buffer for every resource's bytes and one array for their
	// holders: a node holds a few resources, and one allocation each would
	// add its rounding and header to each.
	buf := make([]byte, 0, size)
	held := make([]encodedResource, n)
	s := &nodeSnapshot{}
	var enc [len(servedTypeURLs)][][]byte
	for i, list := range lists {
		s.byType[i], held = held[:len(list):len(list)], held[len(list):]
		seen := make(map[string]bool, len(list))
		for j, m := range list {
			name := cache.GetResourceName(m)
			if name == "" || seen[name] {
				return nil, fmt.Errorf("encoding %s %q: a resource needs a name of its own in its node's snapshot", servedTypeURLs[i], name)
			}
			seen[name] = true
			start := len(buf)
			var err error
			buf, err = det.MarshalAppend(buf, m)
			if err != nil {
				return nil, fmt.Errorf("encoding %s %q: %w", servedTypeURLs[i], name, err)
			}
			raw := buf[start:len(buf):len(buf)]
			h := &s.byType[i][j]
			h.name = name
			h.ProtoReflect().SetUnknown(raw)
			enc[i] = append(enc[i], raw)
		}
	}
	s.version = translate.Encoded{
		Listeners: enc[typeIndex(resource.ListenerType)],
		Clusters:  enc[typeIndex(resource.ClusterType)],
		Endpoints: enc[typeIndex(resource.EndpointType)],
	}.Hash()
	return s, nil
}

// GetVersion is the node's version for every type served ("" for others).
func (s *nodeSnapshot) GetVersion(typeURL string) string {
	if typeIndex(typeURL) < 0 {
		return ""
	}
	return s.version
}

// GetResourcesAndTTL indexes the resources of typeURL by name, for one use.
func (s *nodeSnapshot) GetResourcesAndTTL(typeURL string) map[string]types.ResourceWithTTL {
	i := typeIndex(typeURL)
	if i < 0 {
		return nil
	}
	out := make(map[string]types.ResourceWithTTL, len(s.byType[i]))
	for j := range s.byType[i] {
		r := &s.byType[i][j]
		out[r.name] = types.ResourceWithTTL{Resource: r}
	}
	return out
}

// GetResources indexes the resources of typeURL by name, for one use.
func (s *nodeSnapshot) GetResources(typeURL string) map[string]types.Resource {
	i := typeIndex(typeURL)
	if i < 0 {
		return nil
	}
	out := make(map[string]types.Resource, len(s.byType[i]))
	for j := range s.byType[i] {
		r := &s.byType[i][j]
		out[r.name] = r
	}
	return out
}

// ConstructVersionMap does nothing: GetVersionMap hashes the few resources
// of a type when a delta stream asks, instead of every node keeping a map
// of hashes for every type the cache knows.
func (s *nodeSnapshot) ConstructVersionMap() error { return nil }

// GetVersionMap is each resource of typeURL's version for delta streams:
// the hash of its bytes, as go-control-plane's own snapshot gives it, so
// replicas and releases agree.
func (s *nodeSnapshot) GetVersionMap(typeURL string) map[string]string {
	i := typeIndex(typeURL)
	if i < 0 {
		return nil
	}
	out := make(map[string]string, len(s.byType[i]))
	for j := range s.byType[i] {
		r := &s.byType[i][j]
		out[r.name] = cache.HashResource(r.bytes())
	}
	return out
}
