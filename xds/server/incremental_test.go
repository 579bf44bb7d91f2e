package server

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/xds/policy"
)

// TestUpdateChangedMatchesUpdate: fed the store's changes, UpdateChanged
// serves every node exactly what Update, comparing every declaration, does:
// random edits, new and removed files, broken files and conflicting ones
// over a directory of workloads, compared after each reload.
func TestUpdateChangedMatchesUpdate(t *testing.T) {
	dir := t.TempDir()
	store, err := policy.NewStore(opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	files := policy.NewFiles(store, dir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	full, incremental := New(ctx, Options{}), New(ctx, Options{})
	const workloads = 12
	id := func(i int) string { return fmt.Sprintf("spiffe://mesh.test/w%d", i) }
	decl := func(name string, i, port int) string {
		return fmt.Sprintf("apiVersion: latch.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: %s}\nspec:\n  spiffeID: %s\n  inbound: [{port: %d, appAddress: \"127.0.0.1:1\"}]\n", name, id(i), port)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for step := range 300 {
		name := fmt.Sprintf("f%d.yaml", rng.IntN(workloads+3))
		path := filepath.Join(dir, name)
		switch op := rng.IntN(10); {
		case op < 6: // write a declaration, sometimes of another file's ID
			w := rng.IntN(workloads)
			if err := os.WriteFile(path, []byte(decl(strings.TrimSuffix(name, ".yaml"), w, 1000+rng.IntN(3))), 0o644); err != nil {
				t.Fatal(err)
			}
		case op < 8:
			_ = os.Remove(path)
		default: // broken: keeps its last good version
			if err := os.WriteFile(path, []byte("kind: ["), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		// Edits within one clock tick keep the file time; the store reads a
		// recently modified file again anyway, which this moves past.
		old := time.Now().Add(-time.Duration(rng.IntN(1000)+10) * time.Second)
		_ = os.Chtimes(path, old, old)
		snap, ch, err := files.Reload()
		if err != nil {
			t.Fatal(err)
		}
		full.Update(snap)
		incremental.UpdateChanged(snap, ch)
		for i := range workloads {
			if f, inc := full.Version(id(i)), incremental.Version(id(i)); f != inc {
				t.Fatalf("step %d: %s served %q by Update, %q by UpdateChanged (change %v)", step, id(i), f, inc, ch.IDs)
			}
		}
	}
}

// TestUnaffectedSidecarsReceiveNothing: a change to one workload's
// declaration reaches its sidecar and no other, over SotW and delta, through
// Update and UpdateChanged alike.
func TestUnaffectedSidecarsReceiveNothing(t *testing.T) {
	for _, incremental := range []bool{false, true} {
		for _, delta := range []bool{false, true} {
			t.Run(fmt.Sprintf("incremental=%v/delta=%v", incremental, delta), func(t *testing.T) {
				cp := startLiveCP(t, Options{})
				sa, sb := openWatcher(t, cp, idA, delta), openWatcher(t, cp, idB, delta)
				sa.initial(t)
				sb.initial(t)
				changed := decls(t, strings.Replace(a, "{id: spiffe://mesh.test/b}", "{id: spiffe://mesh.test/c}", 1)+"---\n"+b)
				if incremental {
					cp.s.UpdateChanged(changed, policy.Change{IDs: []spiffeid.ID{spiffeid.RequireFromString(idA)}})
				} else {
					cp.s.Update(changed)
				}
				// SotW sends every type again (clusters first), delta only
				// the listeners, which changed.
				for got := ""; got != resource.ListenerType; {
					if got = sa.next(t, 5*time.Second); got == "" {
						t.Fatal("the changed workload's sidecar got no new listeners")
					}
				}
				if got := sb.next(t, 300*time.Millisecond); got != "" {
					t.Errorf("an unaffected sidecar received %s", got)
				}
			})
		}
	}
}

// watcher is a sidecar's stream that subscribes to listeners and clusters
// (wildcard), acknowledges everything and reports what it receives.
type watcher struct {
	got  chan string // type URL of each response
	send func(typeURL, version, nonce string) error
}

func openWatcher(t *testing.T, cp *liveCP, id string, delta bool) *watcher {
	t.Helper()
	conn := cp.dial(t, id, "")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w := &watcher{got: make(chan string, 16)}
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	node := &core.Node{Id: id}
	var recv func() (typeURL, version, nonce string, err error)
	if delta {
		st, err := ads.DeltaAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		first := true
		w.send = func(typeURL, _, nonce string) error {
			req := &discovery.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: nonce}
			if nonce == "" {
				req.ResourceNamesSubscribe = []string{"*"}
			}
			if first {
				req.Node, first = node, false
			}
			return st.Send(req)
		}
		recv = func() (string, string, string, error) {
			r, err := st.Recv()
			return r.GetTypeUrl(), r.GetSystemVersionInfo(), r.GetNonce(), err
		}
	} else {
		st, err := ads.StreamAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		first := true
		w.send = func(typeURL, version, nonce string) error {
			req := &discovery.DiscoveryRequest{TypeUrl: typeURL, VersionInfo: version, ResponseNonce: nonce}
			if first {
				req.Node, first = node, false
			}
			return st.Send(req)
		}
		recv = func() (string, string, string, error) {
			r, err := st.Recv()
			return r.GetTypeUrl(), r.GetVersionInfo(), r.GetNonce(), err
		}
	}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType} {
		if err := w.send(typ, "", ""); err != nil {
			t.Fatal(err)
		}
	}
	go func() {
		defer close(w.got)
		for {
			typ, version, nonce, err := recv()
			if err != nil {
				return
			}
			_ = w.send(typ, version, nonce)
			w.got <- typ
		}
	}()
	return w
}

// initial waits for the first listeners and clusters.
func (w *watcher) initial(t *testing.T) {
	t.Helper()
	seen := map[string]bool{}
	for !seen[resource.ListenerType] || !seen[resource.ClusterType] {
		typ := w.next(t, 5*time.Second)
		if typ == "" {
			t.Fatal("no initial response")
		}
		seen[typ] = true
	}
}

// next returns the type of the next response, or "" if none comes within d.
func (w *watcher) next(t *testing.T, d time.Duration) string {
	t.Helper()
	select {
	case typ, ok := <-w.got:
		if !ok {
			t.Fatal("stream ended")
		}
		return typ
	case <-time.After(d):
		return ""
	}
}
