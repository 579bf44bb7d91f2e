package client_test

import (
	"crypto/tls"
	"errors"
	"net"
	"slices"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/translate"
)

var fuzzNode = spiffeid.RequireFromString("spiffe://mesh.test/ns/shop/sa/svc")

const fuzzDecl = `apiVersion: latch.dev/v1alpha1
kind: ServicePolicy
metadata: {name: svc}
spec:
  spiffeID: spiffe://mesh.test/ns/shop/sa/svc
  inbound:
    - port: 8443
      appAddress: 127.0.0.1:8080
      idleTimeout: 90s
      allow:
        - id: spiffe://mesh.test/ns/shop/sa/frontend
        - pathPrefix: spiffe://mesh.test/ns/ops
  outbound:
    - port: 9001
      endpoints: ["127.0.0.2:8443", "127.0.0.1:8443"]
      serverID: spiffe://mesh.test/ns/shop/sa/db
    - port: 9002
      target: db.local:8443
      serverID: spiffe://mesh.test/ns/shop/sa/db
`

// fuzzSet is the good update, each resource marshaled: [type][i].
func fuzzSet(t testing.TB) [3][][]byte {
	t.Helper()
	ds, err := policy.Parse("svc.yaml", []byte(fuzzDecl), policy.Options{TrustDomains: []spiffeid.TrustDomain{fuzzNode.TrustDomain()}})
	if err != nil {
		t.Fatal(err)
	}
	r := translate.Translate(ds[0], translate.Options{})
	var out [3][][]byte
	add := func(k int, m proto.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out[k] = append(out[k], b)
	}
	for _, l := range r.Listeners {
		add(0, l)
	}
	for _, c := range r.Clusters {
		add(1, c)
	}
	for _, e := range r.Endpoints {
		add(2, e)
	}
	return out
}

var fuzzTypes = [3]string{client.ListenerType, client.ClusterType, client.EndpointType}

// FuzzUpdate replaces one resource of a good update with fuzzed bytes (the
// resource's own encoding as seed, so the mutator mostly flips fields of a
// real resource) and runs the whole update through validation and Build, as
// the ADS client does. It never panics; a refusal is a *ValidationError or
// ErrIncomplete with a message; an accepted update builds a proxy.Config that
// proxy's Validate accepts, whose profile is no wider than the sidecar's,
// whose outbound listeners are on loopback and expect a server of the node's
// trust domain, and whose inbound allow-lists were not widened to a foreign
// peer the bundle could verify. This is the rogue-control-plane boundary.
func FuzzUpdate(f *testing.F) {
	good := fuzzSet(f)
	for k := range good {
		for i, b := range good[k] {
			f.Add(uint8(k), uint8(i), b)
		}
	}
	f.Add(uint8(0), uint8(0), []byte{})
	f.Add(uint8(1), uint8(0), []byte{0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, kind, index uint8, b []byte) {
		set := fuzzSet(t)
		k := int(kind) % 3
		if len(set[k]) == 0 {
			return
		}
		set[k][int(index)%len(set[k])] = b
		v := client.Validator{NodeID: fuzzNode, Profile: identity.Modern()}
		cfg, err := build(v, set)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			_, isVE := errors.AsType[*client.ValidationError](err)
			if !isVE && !errors.Is(err, client.ErrIncomplete) {
				t.Fatalf("refusal %T is neither a ValidationError nor ErrIncomplete: %v", err, err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("update accepted but the proxy config is invalid: %v", err)
		}
		p := cfg.TLS
		if p.MinVersion < tls.VersionTLS13 {
			t.Fatalf("modern sidecar narrowed to %x by xDS", p.MinVersion)
		}
		for _, c := range p.Curves {
			if !slices.Contains(identity.Modern().Curves, c) {
				t.Fatalf("curve %s added by xDS", c)
			}
		}
		for _, out := range cfg.Outbound {
			host, _, _ := net.SplitHostPort(out.Listen)
			if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
				t.Fatalf("outbound listener on %s", out.Listen)
			}
			if out.ServerID.TrustDomain() != fuzzNode.TrustDomain() {
				t.Fatalf("outbound expects %s outside the trust domain", out.ServerID)
			}
		}
	})
}

func build(v client.Validator, set [3][][]byte) (*proxy.Config, error) {
	s := client.Set{Listeners: map[string]client.Listener{}, Clusters: map[string]client.Cluster{}, Endpoints: map[string]client.Endpoints{}}
	for k, list := range set {
		for _, b := range list {
			a := &anypb.Any{TypeUrl: fuzzTypes[k], Value: b}
			var err error
			switch k {
			case 0:
				var l client.Listener
				if l, err = v.Listener(a); err == nil {
					s.Listeners[l.Name] = l
				}
			case 1:
				var c client.Cluster
				if c, err = v.Cluster(a); err == nil {
					s.Clusters[c.Name] = c
				}
			case 2:
				var e client.Endpoints
				if e, err = v.Endpoints(a); err == nil {
					s.Endpoints[e.Name] = e
				}
			}
			if err != nil {
				return nil, err
			}
		}
	}
	return v.Build(s, "fuzz")
}
