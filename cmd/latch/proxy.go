package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/admin"
	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
	xdsclient "latch.dev/latch/xds/client"
)

// runProxy is the sidecar: identity from the Workload API; listeners from a
// static config file (re-read on SIGHUP) and/or from the control plane over
// xDS; the admin endpoint and an optional TLS test endpoint; graceful drain
// on SIGTERM/SIGINT.
func runProxy(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch proxy", flag.ContinueOnError)
	configPath := fs.String("config", "", "static proxy configuration `file` (YAML); re-read on SIGHUP. With --xds-address it is the bootstrap served until the control plane answers")
	socket := workloadAPIFlag(fs)
	xdsAddr := fs.String("xds-address", "", "control plane `host:port`: take listeners and policy from it over ADS (mTLS)")
	xdsID := fs.String("xds-server-id", "", "SPIFFE `ID` the control plane must prove (required with --xds-address)")
	stateDir := fs.String("state-dir", "", "`directory` keeping the last good xDS resources across restarts")
	allowRemoteApp := fs.Bool("allow-non-loopback-app", false, "accept inbound listeners from xDS whose app is not on loopback (admitted peers reach the app in plain TCP; off, the control plane cannot send them elsewhere)")
	profileName := fs.String("tls-profile", identity.ProfileModern, "widest TLS profile xDS may use: modern or intermediate (a static file names its own)")
	adminAddr := fs.String("admin-address", admin.DefaultAddr, "admin endpoint `host:port` (/healthz, /readyz, /metrics, /status); \"off\" disables it")
	testEndpoint := fs.String("test-endpoint", "", "serve the TLS test endpoint (one JSON document about the negotiated connection) on `host:port`")
	pprof := fs.Bool("pprof", false, "expose /debug/pprof on the admin endpoint")
	drainTimeout := fs.Duration("drain-timeout", proxy.DefaultDrainTimeout, "how long live connections may finish after SIGTERM/SIGINT or the removal of their listener")
	resumption := fs.Bool("session-resumption", true, "resume TLS sessions with upstreams; false makes every outbound connection a full handshake, whatever the configuration says")
	logs := defineLogFlags(fs)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: latch proxy (--config FILE | --xds-address HOST:PORT --xds-server-id ID) [flags]\n\n"+
			"Runs the sidecar: terminates mTLS from peers for the local app (inbound) and originates mTLS\n"+
			"for it (outbound), with the identity from the SPIFFE Workload API.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	log, err := logs.logger(stderr)
	if err != nil {
		return err
	}
	if *configPath == "" && *xdsAddr == "" {
		return usagef("--config or --xds-address is required: the proxy serves nothing without a configuration")
	}
	profile, err := identity.ProfileByName(*profileName)
	if err != nil {
		return usagef("--tls-profile: %w", err)
	}
	var cpID spiffeid.ID
	if *xdsAddr != "" {
		if err := checkHostPort("xds-address", *xdsAddr, true); err != nil {
			return err
		}
		if cpID, err = spiffeid.FromString(*xdsID); err != nil {
			return usagef("--xds-server-id %q: %w", *xdsID, err)
		}
	}
	if *adminAddr != "off" {
		if err := checkHostPort("admin-address", *adminAddr, false); err != nil {
			return err
		}
	}
	if *testEndpoint != "" {
		if err := checkHostPort("test-endpoint", *testEndpoint, false); err != nil {
			return err
		}
	}
	if *drainTimeout < 0 {
		return usagef("--drain-timeout %s: must not be negative", *drainTimeout)
	}
	// Read the file before waiting on the Workload API, so a broken file
	// fails at once.
	var cfg *proxy.Config
	if *configPath != "" {
		if cfg, err = loadProxyConfig(*configPath); err != nil {
			return err
		}
	}

	wait, err := newIdentityWait(*socket, log)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	if err := admin.RegisterBuildInfo(reg, buildVersion()); err != nil {
		return err
	}
	// Registered before the first Apply, so that a SIGHUP sent as soon as
	// the listeners are up is never the default action (exit).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	// Everything below runs until ctx ends; the group waits for all of it
	// before the listeners are drained.
	runCtx, stop := context.WithCancel(ctx)
	var (
		wg  sync.WaitGroup
		src *identity.WorkloadSource
	)
	defer func() {
		stop()
		wg.Wait()
		// Last: the identity monitor reads the source until it stops.
		if src != nil {
			src.Close()
		}
	}()
	fail := make(chan error, 4)
	spawn := func(name string, run func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(runCtx); err != nil && runCtx.Err() == nil {
				fail <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}

	// The admin endpoint comes first: probes get answers while the
	// Workload API is still silent. Until then the parts are nil.
	var parts atomic.Pointer[proxyParts]
	// The sidecar's listeners outside its policy: no inbound app may be one.
	own := map[string]string{}
	if *testEndpoint != "" {
		own["TLS test endpoint"] = *testEndpoint
	}
	if *adminAddr != "off" {
		adm, err := admin.New(admin.Options{
			Addr: *adminAddr,
			Ready: admin.Readiness(
				admin.ReadyCheck{Name: "svid", Check: func() error {
					if p := parts.Load(); p != nil {
						return p.mon.SVIDReady()
					}
					return wait.Problem()
				}},
				admin.ReadyCheck{Name: "policy", Check: func() error {
					p := parts.Load()
					if p == nil || p.srv.Current() == nil {
						return errors.New("no policy applied yet (listeners not bound)")
					}
					// A sidecar that admits nobody and reaches nothing
					// should not get traffic; it turns ready once a
					// policy for it arrives (docs/operations.md).
					if cfg := p.srv.Current(); policyEmpty(cfg) {
						return errNoPolicy(cfg, p.self)
					}
					return nil
				}},
			),
			Status:      func() any { return newProxyStatus(parts.Load(), wait) },
			Gatherer:    reg,
			EnablePprof: *pprof,
			Logger:      log.With("component", "admin"),
		})
		if err != nil {
			return err
		}
		log.Info("admin endpoint listening", "addr", adm.Addr().String())
		own["admin endpoint"] = adm.Addr().String()
		spawn("admin endpoint", adm.Serve)
	}

	src, err = wait.run(runCtx)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("shutting down before the first X.509-SVID arrived")
			return nil
		}
		return err
	}
	// Taken before the first policy is applied: a bundle removed from then
	// on is rechecked (see the trust recheck below).
	bundlesChanged := src.Changed()
	svid, err := src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("reading the SVID: %w", err)
	}
	tlsc := identity.NewTLS(src)

	mon := admin.NewIdentityMonitor(src, admin.MonitorOptions{TrustDomain: svid.ID.TrustDomain(), Logger: log})
	if err := reg.Register(mon); err != nil {
		return fmt.Errorf("registering identity metrics: %w", err)
	}
	srv := proxy.NewServer(tlsc, proxy.Options{
		Logger:                   log,
		Metrics:                  proxy.NewMetrics(reg),
		DrainTimeout:             *drainTimeout,
		DisableSessionResumption: !*resumption,
		OwnListeners:             own,
	})
	if err := registerPolicyMetrics(reg, srv); err != nil {
		return err
	}
	// Every policy applied, whatever its source, is checked for doing
	// nothing.
	apply := func(c *proxy.Config) error {
		if err := srv.Apply(c); err != nil {
			return err
		}
		logPolicyWarnings(log, c, svid.ID)
		return nil
	}
	if cfg != nil {
		if err := apply(cfg); err != nil {
			shutdownProxy(srv, 0, log)
			return err
		}
	}
	spawn("identity monitor", mon.Run)
	// A federated bundle removed (or now refused) leaves its peers' live
	// connections without trust: cut them as a policy revocation would.
	spawn("trust recheck", func(ctx context.Context) error {
		onEveryChange(ctx, bundlesChanged, src.Changed, func() {
			if n := srv.RecheckTrust(); n > 0 {
				log.Warn("connections closed: their peers' trust domain is no longer trusted", "closed", n)
			}
		})
		return nil
	})
	spawn("memory release", func(ctx context.Context) error { return newReleaser().run(ctx, releaseTick) })

	var xds *xdsclient.Client
	if *xdsAddr != "" {
		xds, err = xdsclient.New(xdsclient.Options{
			Address:             *xdsAddr,
			ControlPlaneID:      cpID,
			NodeID:              svid.ID,
			TLS:                 tlsc.ClientConfig(profile, cpID),
			Profile:             profile,
			AllowNonLoopbackApp: *allowRemoteApp,
			StateDir:            *stateDir,
			Logger:              log, // the client names its component itself
			Metrics:             xdsclient.NewMetrics(reg),
		}, apply)
		if err != nil {
			shutdownProxy(srv, 0, log)
			return err
		}
		spawn("xds client", xds.Run)
	}

	if *testEndpoint != "" {
		te, err := admin.ListenTestEndpoint(admin.TestEndpointOptions{
			Addr: *testEndpoint, TLS: tlsc, Profile: profile, TrustDomain: svid.ID.TrustDomain(),
			FederatesWith: func() []spiffeid.TrustDomain { return srv.Current().InboundFederation() },
			Registerer:    reg, Logger: log.With("component", "test-endpoint"),
		})
		if err != nil {
			stop()
			wg.Wait()
			shutdownProxy(srv, 0, log)
			return err
		}
		spawn("TLS test endpoint", te.Serve)
	}
	parts.Store(&proxyParts{self: svid.ID, mon: mon, srv: srv, xds: xds})

	for {
		select {
		case <-hup:
			if *configPath == "" {
				log.Info("SIGHUP ignored: no --config file to re-read")
				continue
			}
			if next, err := applyProxyConfigFile(srv, *configPath); err != nil {
				log.Error("reload refused, the running config keeps serving", "config", *configPath, "running_version", versionOf(srv.Current()), "error", err.Error())
			} else {
				log.Info("reloaded", "config", *configPath, "version", next.Version)
				logPolicyWarnings(log, next, svid.ID)
			}
		case err := <-fail:
			log.Error("stopping", "error", err.Error())
			stop()
			shutdownProxy(srv, *drainTimeout, log)
			return err
		case <-ctx.Done():
			log.Info("shutting down: draining connections", "drain_timeout", *drainTimeout)
			stop()
			shutdownProxy(srv, *drainTimeout, log)
			return nil
		}
	}
}

// onEveryChange calls do after every change changed announces (a channel
// closed at the next change, as identity.WorkloadSource.Changed), starting
// with next, the one taken before anything the changes matter to was set up,
// until ctx ends. The channel for the next change is taken before do runs: a
// change that comes while do runs makes it run again, rather than going
// unseen until the change after.
func onEveryChange(ctx context.Context, next <-chan struct{}, changed func() <-chan struct{}, do func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-next:
			next = changed()
			do()
		}
	}
}

// proxyParts are the parts of a running sidecar that /readyz and /status
// read; they exist once the first SVID has arrived.
type proxyParts struct {
	self spiffeid.ID
	mon  *admin.IdentityMonitor
	srv  *proxy.Server
	xds  *xdsclient.Client
}

// proxyStatus is what /status serves.
type proxyStatus struct {
	Version      string                 `json:"version"`
	Identity     admin.IdentityStatus   `json:"identity"`
	Policy       *policyStatus          `json:"policy"`
	ControlPlane *xdsclient.Status      `json:"control_plane,omitempty"`
	Listeners    []proxy.ListenerStatus `json:"listeners"`
}

type policyStatus struct {
	Version  string `json:"version"`
	Source   string `json:"source"`
	Inbound  int    `json:"inbound"`
	Outbound int    `json:"outbound"`
	// Warnings say why the policy does less than it seems to: none for
	// this identity, or a listener that admits nobody.
	Warnings []string `json:"warnings,omitempty"`
}

func newProxyStatus(p *proxyParts, wait *identityWait) proxyStatus {
	st := proxyStatus{Version: buildVersion(), Listeners: []proxy.ListenerStatus{}}
	if p == nil {
		problem := "starting"
		if err := wait.Problem(); err != nil {
			problem = err.Error()
		}
		st.Identity = admin.IdentityStatus{SVIDError: problem, Bundles: []admin.BundleStatus{}}
		return st
	}
	st.Identity, st.Listeners = p.mon.Status(), p.srv.Listeners()
	if cfg := p.srv.Current(); cfg != nil {
		st.Policy = &policyStatus{Version: cfg.Version, Source: cfg.Source, Inbound: len(cfg.Inbound), Outbound: len(cfg.Outbound),
			Warnings: policyWarnings(cfg, p.self)}
	}
	if p.xds != nil {
		s := p.xds.Status()
		st.ControlPlane = &s
	}
	return st
}

func versionOf(cfg *proxy.Config) string {
	if cfg == nil {
		return ""
	}
	return cfg.Version
}

func shutdownProxy(srv *proxy.Server, drain time.Duration, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("drain deadline reached; remaining connections closed", "drain_timeout", drain)
	}
}
