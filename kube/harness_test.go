package kube_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
	"latch.dev/latch/internal/freeport"
	"latch.dev/latch/internal/kubetest"
	"latch.dev/latch/kube"
	"latch.dev/latch/proxy"
	"latch.dev/latch/xds/client"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// controlPlaneNS is where the replicas' Lease and ACK reports live.
const controlPlaneNS = "latch-system"

var cpID = spiffeid.RequireFromString("spiffe://mesh.test/ns/latch-system/sa/latch-control-plane")

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() && os.Getenv("LATCH_TEST_LOGS") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// mesh is one test's world: the shared API server, a dev CA handing out
// SVIDs over the Workload API, and the namespace its ServicePolicies live in.
type mesh struct {
	t   testing.TB
	c   *kubetest.Cluster
	ca  *devca.CA
	ns  string
	sp  dynamic.ResourceInterface
	log *slog.Logger

	mu      sync.Mutex
	sources map[spiffeid.ID]*identity.WorkloadSource
}

func newMesh(t testing.TB, c *kubetest.Cluster, ns string) *mesh {
	t.Helper()
	namespace(t, c, ns)
	namespace(t, c, controlPlaneNS)
	ca, err := devca.New("mesh.test", devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ca.Close() })
	return &mesh{t: t, c: c, ca: ca, ns: ns, log: testLogger(t),
		sp:      dynamic.NewForConfigOrDie(c.Config).Resource(kube.GVR).Namespace(ns),
		sources: map[spiffeid.ID]*identity.WorkloadSource{}}
}

// source is id's SVID source, from the dev CA's Workload API.
func (m *mesh) source(id spiffeid.ID) *identity.WorkloadSource {
	m.t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if s := m.sources[id]; s != nil {
		return s
	}
	sock, err := m.ca.AddWorkload(id.String())
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := identity.NewWorkloadSource(ctx, sock, m.log)
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { _ = src.Close() })
	m.sources[id] = src
	return src
}

// replica is one control-plane replica, composed as `latch control-plane
// --kubernetes` composes it.
type replica struct {
	name  string
	store *policy.Store
	srv   *server.Server
	ctl   *kube.Controller
	addr  string

	stopOnce sync.Once
	stopFn   func()
}

func (r *replica) stop() { r.stopOnce.Do(r.stopFn) }

type replicaOptions struct {
	lease string
	cfg   *rest.Config // default: the admin's
	// files, if set, is a declaration directory read before the objects.
	files string
	// trustDomains are those declarations may name; default mesh.test.
	trustDomains []spiffeid.TrustDomain
}

func (m *mesh) replica(name string, o replicaOptions) *replica {
	m.t.Helper()
	owners, err := policy.ParseIDTemplate(policy.DefaultIDTemplate)
	if err != nil {
		m.t.Fatal(err)
	}
	tds := o.trustDomains
	if tds == nil {
		tds = []spiffeid.TrustDomain{meshTD}
	}
	store, err := policy.NewStore(policy.Options{TrustDomains: tds, Owners: owners}, m.log.With("replica", name))
	if err != nil {
		m.t.Fatal(err)
	}
	if o.files != "" {
		if _, _, err := policy.NewFiles(store, o.files).Reload(); err != nil {
			m.t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := server.New(ctx, server.Options{Logger: m.log.With("replica", name), Translate: translate.Options{InboundHost: "127.0.0.1"}})
	r := &replica{name: name, store: store, srv: srv}
	var pub sync.Mutex
	cfg := o.cfg
	if cfg == nil {
		cfg = m.c.Config
	}
	r.ctl, err = kube.New(kube.Options{
		Config: cfg, Store: store, Namespaces: []string{m.ns}, XDS: srv,
		OnChange: func(policy.Change) {
			pub.Lock()
			defer pub.Unlock()
			if r.ctl.Synced() {
				srv.Update(store.Snapshot())
			}
		},
		Identity: name, Namespace: controlPlaneNS, LeaseName: o.lease,
		LeaseDuration: 3 * time.Second, RenewDeadline: 2 * time.Second, RetryPeriod: 200 * time.Millisecond,
		ReportInterval: 100 * time.Millisecond, ReportHeartbeat: 2 * time.Second,
		Logger: m.log.With("replica", name),
	})
	if err != nil {
		cancel()
		m.t.Fatal(err)
	}
	g := srv.NewGRPCServer(identity.NewTLS(m.source(cpID)).ServerConfig(identity.Modern(), func(peer spiffeid.ID) error {
		if !peer.MemberOf(meshTD) {
			return fmt.Errorf("%s is not in mesh.test", peer)
		}
		return nil
	}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		m.t.Fatal(err)
	}
	r.addr = lis.Addr().String()
	var wg sync.WaitGroup
	wg.Go(func() { _ = g.Serve(lis) })
	wg.Go(func() {
		if err := r.ctl.Run(ctx); err != nil {
			m.t.Errorf("replica %s: %v", name, err)
		}
	})
	r.stopFn = func() { cancel(); g.Stop(); wg.Wait() }
	m.t.Cleanup(r.stop)
	waitFor(m.t, "replica "+name+" to sync", r.ctl.Synced)
	return r
}

// sidecar is a latch sidecar — ADS client and data plane — for id, whose
// inbound listeners forward to app.
type sidecar struct {
	applied chan string // versions, as applied
	stop    func()
}

func (m *mesh) sidecar(id spiffeid.ID, cpAddr string) *sidecar {
	m.t.Helper()
	src := m.source(id)
	dp := proxy.NewServer(identity.NewTLS(src), proxy.Options{Logger: m.log.With("sidecar", id.String()), DrainTimeout: time.Second})
	s := &sidecar{applied: make(chan string, 64)}
	c, err := client.New(client.Options{
		Address: cpAddr, ControlPlaneID: cpID, NodeID: id,
		TLS:        identity.NewTLS(src).ClientConfig(identity.Modern(), cpID),
		Logger:     m.log.With("sidecar", id.String()),
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
	}, func(cfg *proxy.Config) error {
		if err := dp.Apply(cfg); err != nil {
			return err
		}
		select {
		case s.applied <- cfg.Version:
		default:
		}
		return nil
	})
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	var once sync.Once
	s.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer scancel()
			_ = dp.Shutdown(sctx)
		})
	}
	m.t.Cleanup(s.stop)
	return s
}

// peer is a workload calling a sidecar directly with its own SVID.
func (m *mesh) peer(id, server spiffeid.ID) *tls.Config {
	return identity.NewTLS(m.source(id)).ClientConfig(identity.Modern(), server)
}

// call opens a connection and does one echo round trip; the connection is
// returned open on success.
func call(addr string, cfg *tls.Config) (net.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping")); err != nil {
		c.Close()
		return nil, err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// closedByPeer waits for c to be closed from the other end.
func closedByPeer(c net.Conn, within time.Duration) error {
	_ = c.SetReadDeadline(time.Now().Add(within))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		return fmt.Errorf("still open after %v (%v)", within, err)
	}
	return nil
}

// echoApp is the application behind a sidecar.
func echoApp(t testing.TB) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { lis.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer c.Close(); _, _ = io.Copy(c, c) })
		}
	})
	return lis.Addr().String()
}

func freePort(t testing.TB) int {
	t.Helper()
	p, err := freeport.Port()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// inboundSpec is a spec for id with one inbound port forwarding to app,
// allowing peers.
func inboundSpec(id spiffeid.ID, port int, app string, peers ...spiffeid.ID) string {
	var b strings.Builder
	fmt.Fprintf(&b, "spiffeID: %s\ninbound:\n  - port: %d\n    appAddress: %s\n    allow:\n", id, port, app)
	for _, p := range peers {
		fmt.Fprintf(&b, "      - id: %s\n", p)
	}
	if len(peers) == 0 {
		b.WriteString("      []\n")
		return strings.Replace(b.String(), "    allow:\n      []\n", "    allow: []\n", 1)
	}
	return b.String()
}

// apply creates or replaces the object name with spec, as kubectl apply
// does (server-side apply, strict field validation).
func (m *mesh) apply(name, spec string) *unstructured.Unstructured {
	m.t.Helper()
	u := servicePolicy(m.t, m.ns, name, spec)
	got, err := m.sp.Apply(context.Background(), name, u, metav1.ApplyOptions{FieldManager: "kubectl", Force: true})
	if err != nil {
		m.t.Fatalf("applying %s: %v", name, err)
	}
	return got
}

// applyYAML applies a whole object written in YAML, as kubectl apply -f.
func (m *mesh) applyYAML(doc string) {
	m.t.Helper()
	var obj map[string]any
	if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
		m.t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: obj}
	if u.GetNamespace() != m.ns {
		m.t.Fatalf("object in namespace %q, the test's is %q", u.GetNamespace(), m.ns)
	}
	if _, err := m.sp.Apply(context.Background(), u.GetName(), u, metav1.ApplyOptions{FieldManager: "kubectl", Force: true}); err != nil {
		m.t.Fatalf("applying %s: %v", u.GetName(), err)
	}
}

func (m *mesh) delete(name string) {
	m.t.Helper()
	if err := m.sp.Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		m.t.Fatal(err)
	}
}

// cond is one condition of an object's status.
type cond struct {
	Status, Reason, Message string
	Generation              int64
}

func conditionOf(u *unstructured.Unstructured, typ string) (cond, bool) {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, x := range conds {
		m, _ := x.(map[string]any)
		if m["type"] != typ {
			continue
		}
		g, _, _ := unstructured.NestedInt64(m, "observedGeneration")
		s, _ := m["status"].(string)
		r, _ := m["reason"].(string)
		msg, _ := m["message"].(string)
		return cond{s, r, msg, g}, true
	}
	return cond{}, false
}

// waitStatus waits until name's status satisfies ok, and returns the object.
func (m *mesh) waitStatus(name, what string, ok func(u *unstructured.Unstructured, accepted, programmed cond) bool) *unstructured.Unstructured {
	m.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last *unstructured.Unstructured
	for time.Now().Before(deadline) {
		u, err := m.sp.Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			last = u
			a, _ := conditionOf(u, "Accepted")
			p, _ := conditionOf(u, "Programmed")
			if ok(u, a, p) {
				return u
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	var st any
	if last != nil {
		st = last.Object["status"]
	}
	m.t.Fatalf("%s/%s: timed out waiting for %s; status: %v", m.ns, name, what, st)
	return nil
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
