package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"k8s.io/klog/v2"

	"latch.dev/latch/admin"
	"latch.dev/latch/identity"
	"latch.dev/latch/kube"
	"latch.dev/latch/xds/policy"
	"latch.dev/latch/xds/server"
	"latch.dev/latch/xds/translate"
)

// controlPlaneFlags are the flags of `latch control-plane`.
type controlPlaneFlags struct {
	declarations string
	listen       string
	adminAddr    string
	socket       string
	trustDomains []spiffeid.TrustDomain // nil: the control plane's own
	inboundHost  string
	profile      string
	debounce     time.Duration
	logs         logFlags
	peerStreams  int
	// The Kubernetes source: ServicePolicy objects read from the API server.
	kubernetes bool
	kubeconfig string
	namespaces []string // nil: every namespace
	idTemplate *policy.IDTemplate
	leaseName  string
	// oldSocketFlag is set when the socket was given under the flag's
	// former name, --workload-api-socket.
	oldSocketFlag bool
}

func parseControlPlaneFlags(args []string, stdout io.Writer) (controlPlaneFlags, error) {
	var f controlPlaneFlags
	fs := flag.NewFlagSet("latch control-plane", flag.ContinueOnError)
	fs.StringVar(&f.declarations, "declarations", "", "`directory` of ServicePolicy declarations (YAML, watched); this or --kubernetes, or both")
	fs.BoolVar(&f.kubernetes, "kubernetes", false, "read ServicePolicy objects from the Kubernetes API server (in-cluster, or --kubeconfig) and write their status")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "`file` to reach the API server with from outside the cluster (with --kubernetes)")
	namespaces := fs.String("namespaces", "", "comma-separated namespaces to read ServicePolicy objects from (default: all)")
	idTemplate := fs.String("id-template", policy.DefaultIDTemplate, "the SPIFFE IDs a ServicePolicy in a namespace may declare: {namespace} is its namespace, {trustDomain} any configured trust domain, {serviceAccount} any one path segment")
	fs.StringVar(&f.leaseName, "lease-name", "latch-control-plane", "Lease the replicas elect their status writer with, in their own namespace; it also prefixes their ACK-report ConfigMaps")
	fs.StringVar(&f.listen, "listen", ":15010", "`host:port` of the xDS (ADS) gRPC server; mTLS only")
	fs.StringVar(&f.adminAddr, "admin-address", "127.0.0.1:15011", "`host:port` of the admin HTTP server (/healthz, /readyz, /metrics, /status)")
	socket := workloadAPIFlag(fs)
	// The flag's name before every subcommand used --workload-api.
	oldSocket := fs.String("workload-api-socket", "", "deprecated: use --workload-api")
	trustDomains := fs.String("trust-domains", "", "comma-separated trust domains declarations may name (default: the control plane's own)")
	fs.StringVar(&f.inboundHost, "inbound-host", translate.DefaultInboundHost, "IP address sidecars bind inbound listeners on; the default, like 0.0.0.0, is every address of the pod, IPv4 and IPv6")
	fs.StringVar(&f.profile, "tls-profile", identity.ProfileModern, "TLS profile of the xDS server: modern or intermediate")
	fs.DurationVar(&f.debounce, "debounce", policy.DefaultDebounce, "wait this long after the last change in the declarations directory before reloading")
	fs.IntVar(&f.peerStreams, "max-streams-per-peer", server.DefaultStreamsPerPeer, "xDS streams, and connections, one workload instance (a SPIFFE ID from one IP address) may hold at once")
	f.logs = defineLogFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: latch control-plane {--declarations DIR | --kubernetes} [flags]\n\nServes each sidecar, over mTLS ADS, the Envoy resources of the declaration for the SPIFFE ID it proves.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stdout); err != nil {
		return f, err
	}
	if err := noArgs(fs); err != nil {
		return f, err
	}
	f.socket = *socket
	if *oldSocket != "" {
		if f.socket != "" && f.socket != *oldSocket {
			return f, usagef("--workload-api %q and its deprecated name --workload-api-socket %q disagree", f.socket, *oldSocket)
		}
		f.socket, f.oldSocketFlag = *oldSocket, true
	}
	if f.declarations == "" && !f.kubernetes {
		return f, usagef("give --declarations DIR, --kubernetes, or both: the control plane needs somewhere to read policy from")
	}
	if !f.kubernetes && (f.kubeconfig != "" || *namespaces != "") {
		return f, usagef("--kubeconfig and --namespaces need --kubernetes")
	}
	for _, ns := range strings.Split(*namespaces, ",") {
		if ns = strings.TrimSpace(ns); ns != "" {
			f.namespaces = append(f.namespaces, ns)
		}
	}
	var err error
	if f.idTemplate, err = policy.ParseIDTemplate(*idTemplate); err != nil {
		return f, usagef("--id-template: %w", err)
	}
	if f.trustDomains, err = parseTrustDomains(*trustDomains); err != nil {
		return f, usageError{err}
	}
	if f.debounce < 0 {
		return f, usagef("--debounce %s: must not be negative", f.debounce)
	}
	if f.peerStreams < 1 {
		return f, usagef("--max-streams-per-peer %d: want at least 1", f.peerStreams)
	}
	if err := checkHostPort("listen", f.listen, false); err != nil {
		return f, err
	}
	if err := checkHostPort("admin-address", f.adminAddr, false); err != nil {
		return f, err
	}
	// Sidecars NACK a listener address that is not an IP: refuse it here,
	// before every sidecar does.
	if _, err := netip.ParseAddr(f.inboundHost); err != nil {
		return f, usagef("--inbound-host %q: want an IP address (:: for every address of the pod)", f.inboundHost)
	}
	return f, nil
}

func runControlPlane(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f, err := parseControlPlaneFlags(args, stdout)
	if err != nil {
		return err
	}
	log, err := f.logs.logger(stderr)
	if err != nil {
		return err
	}
	if f.oldSocketFlag {
		log.Warn("--workload-api-socket is deprecated and will be removed: use --workload-api, as every latch command does")
	}
	profile, err := identity.ProfileByName(f.profile)
	if err != nil {
		return usagef("--tls-profile: %w", err)
	}

	wait, err := newIdentityWait(f.socket, log)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := admin.RegisterBuildInfo(reg, buildVersion()); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 4)
	var (
		wg  sync.WaitGroup
		src *identity.WorkloadSource
	)
	defer func() {
		cancel()
		wg.Wait()
		// Last: the identity monitor reads the source until it stops.
		if src != nil {
			src.Close()
		}
	}()
	spawn := func(run func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(); err != nil && ctx.Err() == nil {
				errc <- err
			}
		}()
	}

	// The admin endpoint comes first, so probes are answered (and /readyz
	// says what is missing) while the Workload API is still silent.
	var parts atomic.Pointer[controlPlaneParts]
	adm, err := admin.New(admin.Options{
		Addr:     f.adminAddr,
		Gatherer: reg,
		Logger:   log.With("component", "admin"),
		Ready: admin.Readiness(
			admin.ReadyCheck{Name: "svid", Check: func() error {
				if p := parts.Load(); p != nil {
					return p.mon.SVIDReady()
				}
				return wait.Problem()
			}},
			admin.ReadyCheck{Name: "declarations", Check: func() error {
				if p := parts.Load(); p == nil || !p.srv.Ready() {
					return errors.New("not loaded yet")
				}
				return nil
			}}),
		Status: func() any { return controlPlaneStatus(parts.Load(), wait, f.declarations) },
	})
	if err != nil {
		return err
	}
	spawn(func() error { return adm.Serve(ctx) })

	src, err = wait.run(ctx)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("shutting down before the first X.509-SVID arrived")
			return nil
		}
		return fmt.Errorf("getting the control plane's SVID from the Workload API: %w", err)
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("reading the control plane's SVID: %w", err)
	}
	tds := f.trustDomains
	if len(tds) == 0 {
		tds = []spiffeid.TrustDomain{svid.ID.TrustDomain()}
	}
	// The control plane's own identity is watched like a sidecar's: expiry
	// and bundle metrics, rotation and near-expiry logs, /status.
	mon := admin.NewIdentityMonitor(src, admin.MonitorOptions{TrustDomain: svid.ID.TrustDomain(), Logger: log})
	if err := reg.Register(mon); err != nil {
		return fmt.Errorf("registering identity metrics: %w", err)
	}
	spawn(func() error { return mon.Run(ctx) })

	store, err := policy.NewStore(policy.Options{TrustDomains: tds, Owners: f.idTemplate}, log.With("component", "declarations"))
	if err != nil {
		return err
	}
	srv := server.New(ctx, server.Options{
		Logger:    log.With("component", "xds-server"),
		Metrics:   server.NewMetrics(reg),
		Translate: translate.Options{InboundHost: f.inboundHost},

		StreamsPerPeer: f.peerStreams,
	})
	cp := &controlPlaneParts{tds: tds, mon: mon, srv: srv, store: store, stale: true}
	if err := reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: metricUndeclaredNodes,
		Help: "Connected sidecars whose SPIFFE ID no declaration names: they are served an empty policy and admit nobody.",
	}, func() float64 { return float64(len(srv.Undeclared())) })); err != nil {
		return fmt.Errorf("registering %s: %w", metricUndeclaredNodes, err)
	}

	// Load before serving: a sidecar connecting to a control plane that has
	// not read its declarations must wait, not be told it has no policy.
	// Files first: they are the operator's, and incumbents of any ID an
	// object also claims.
	var files *policy.Files
	if f.declarations != "" {
		files = policy.NewFiles(store, f.declarations)
		if _, _, err := files.Reload(); err != nil {
			return fmt.Errorf("reading declarations: %w", err)
		}
	}
	if f.kubernetes {
		// client-go (informers, the REST client) logs through klog: into
		// our log, in its format.
		klog.SetSlogLogger(log.With("library", "client-go"))
		cfg, err := kube.RESTConfig(f.kubeconfig)
		if err != nil {
			return err
		}
		pod, podNS, err := kube.PodIdentity()
		if err != nil {
			return err
		}
		cp.kube, err = kube.New(kube.Options{
			Config: cfg, Store: store, Namespaces: f.namespaces, XDS: srv,
			OnChange: func(ch policy.Change) { cp.publish(&ch) },
			Identity: pod, Namespace: podNS, LeaseName: f.leaseName,
			Logger: log.With("component", "kubernetes"), Metrics: kube.NewMetrics(reg),
		})
		if err != nil {
			return err
		}
		if err := reg.Register(cp.kube.Collector()); err != nil {
			return fmt.Errorf("registering ServicePolicy metrics: %w", err)
		}
		spawn(func() error { return cp.kube.Run(ctx) })
	}
	// Without the Kubernetes source this serves the files now; with it,
	// once the informers have synced (the controller's first OnChange).
	snap := cp.publish(nil)
	log.Info("declarations loaded", "dir", f.declarations, "kubernetes", f.kubernetes, "declarations", len(snap.Declarations), "errors", len(snap.Errors))
	parts.Store(cp)

	// Any workload of the configured trust domains may connect; which policy
	// it gets is decided per stream from the ID it proved.
	tlsConfig := identity.NewTLS(src).ServerConfig(profile, func(peer spiffeid.ID) error {
		for _, td := range tds {
			if peer.MemberOf(td) {
				return nil
			}
		}
		return fmt.Errorf("%s is not in a served trust domain", peer)
	})
	grpcServer := srv.NewGRPCServer(tlsConfig)
	lis, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("xDS listener: %w", err)
	}
	spawn(func() error {
		if err := grpcServer.Serve(lis); err != nil {
			return fmt.Errorf("xDS server: %w", err)
		}
		return nil
	})
	if files != nil {
		spawn(func() error {
			return files.Watch(ctx, f.debounce, func(_ policy.Snapshot, ch policy.Change) { cp.publish(&ch) })
		})
	}
	log.Info("control plane serving", "xds_address", lis.Addr().String(), "admin_address", adm.Addr().String(),
		"spiffe_id", svid.ID.String(), "trust_domains", fmt.Sprint(tds))

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	cancel()
	// Streams are long-lived; give them a moment to end cleanly, then cut.
	stopped := make(chan struct{})
	go func() { grpcServer.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(2 * time.Second):
		grpcServer.Stop()
	}
	wg.Wait()
	log.Info("control plane stopped")
	return runErr
}

// metricUndeclaredNodes counts connected sidecars without a declaration.
const metricUndeclaredNodes = "latch_xds_undeclared_nodes"

// controlPlaneParts are the parts of a running control plane that /readyz
// and /status read; they exist once the first SVID has arrived and the
// declarations have been read.
type controlPlaneParts struct {
	tds   []spiffeid.TrustDomain
	mon   *admin.IdentityMonitor
	srv   *server.Server
	store *policy.Store
	kube  *kube.Controller // nil without --kubernetes

	mu sync.Mutex
	// stale is set while changes are held back, and until the first
	// snapshot is served.
	stale bool
}

// publish serves what the store holds now. Every
// source calls it after a change, with what it changed (nil: anything may
// have); the lock keeps an older snapshot from being served after a newer
// one. Until the Kubernetes source has read every object it serves nothing:
// a sidecar must wait rather than be told that its policy is gone.
//
// Only the workloads a change names are translated again, so an edit costs
// the same with ten workloads or ten thousand; the first snapshot served,
// and the first after changes were held back, is compared whole.
func (p *controlPlaneParts) publish(ch *policy.Change) policy.Snapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.store.Snapshot()
	switch {
	case p.kube != nil && !p.kube.Synced():
		p.stale = true
	case ch == nil || p.stale:
		p.srv.Update(s)
		p.stale = false
	default:
		p.srv.UpdateChanged(s, *ch)
	}
	return s
}

// parseTrustDomains reads --trust-domains; "" is nil (the control plane's
// own trust domain, known once it holds its SVID).
func parseTrustDomains(list string) ([]spiffeid.TrustDomain, error) {
	if strings.TrimSpace(list) == "" {
		return nil, nil
	}
	var out []spiffeid.TrustDomain
	for _, s := range strings.Split(list, ",") {
		td, err := spiffeid.TrustDomainFromString(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("--trust-domains: %q: %w", s, err)
		}
		out = append(out, td)
	}
	return out, nil
}

type declarationStatus struct {
	Name      string `json:"name"`
	SPIFFEID  string `json:"spiffe_id"`
	File      string `json:"file"`
	Version   string `json:"version"`
	LastNACK  string `json:"last_nack,omitempty"`
	Inbound   int    `json:"inbound"`
	Outbound  int    `json:"outbound"`
	Namespace string `json:"namespace,omitempty"`
}

// controlPlaneDoc is what the control plane's /status serves.
type controlPlaneDoc struct {
	Version           string               `json:"version"`
	Identity          admin.IdentityStatus `json:"identity"`
	TrustDomains      []string             `json:"trust_domains"`
	DeclarationsDir   string               `json:"declarations_dir"`
	Declarations      []declarationStatus  `json:"declarations"`
	DeclarationErrors []string             `json:"declaration_errors"`
	ConnectedStreams  int                  `json:"connected_streams"`
	// UndeclaredNodes are connected sidecars no declaration names.
	UndeclaredNodes []string `json:"undeclared_nodes"`
	// Kubernetes is there with --kubernetes.
	Kubernetes *kubernetesStatus `json:"kubernetes,omitempty"`
}

type kubernetesStatus struct {
	// Synced: every ServicePolicy the API server listed has been read.
	Synced bool `json:"synced"`
	// Leading: this replica holds the Lease and writes status.
	Leading bool `json:"leading"`
}

func controlPlaneStatus(p *controlPlaneParts, wait *identityWait, dir string) controlPlaneDoc {
	doc := controlPlaneDoc{Version: buildVersion(), DeclarationsDir: dir,
		TrustDomains: []string{}, Declarations: []declarationStatus{}, DeclarationErrors: []string{}, UndeclaredNodes: []string{}}
	if p == nil {
		problem := "starting"
		if err := wait.Problem(); err != nil {
			problem = err.Error()
		}
		doc.Identity = admin.IdentityStatus{SVIDError: problem, Bundles: []admin.BundleStatus{}}
		return doc
	}
	doc.Identity = p.mon.Status()
	// The store's snapshot, not one kept from the last publish: that would
	// be a second copy of every declaration, for a page seldom read. Taken
	// under the publish lock, it is what was last published unless a
	// source changed since, and its publish is on its way.
	p.mu.Lock()
	snap := p.store.Snapshot()
	p.mu.Unlock()
	for _, d := range snap.Declarations {
		doc.Declarations = append(doc.Declarations, declarationStatus{
			Name: d.Name, Namespace: d.Namespace, SPIFFEID: d.ID.String(), File: d.File,
			Version: p.srv.Version(d.ID.String()), LastNACK: p.srv.LastNACK(d.ID.String()),
			Inbound: len(d.Inbound), Outbound: len(d.Outbound),
		})
	}
	for _, e := range snap.Errors {
		doc.DeclarationErrors = append(doc.DeclarationErrors, e.Error())
	}
	for _, td := range p.tds {
		doc.TrustDomains = append(doc.TrustDomains, td.Name())
	}
	doc.ConnectedStreams = p.srv.Connected()
	if p.kube != nil {
		doc.Kubernetes = &kubernetesStatus{Synced: p.kube.Synced(), Leading: p.kube.Leading()}
	}
	doc.UndeclaredNodes = append(doc.UndeclaredNodes, p.srv.Undeclared()...)
	return doc
}
