package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/admin"
	"latch.dev/latch/identity"
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
	trustDomains string
	inboundHost  string
	profile      string
	debounce     time.Duration
	logFormat    string
	logLevel     string
}

func parseControlPlaneFlags(args []string, stderr io.Writer) (controlPlaneFlags, error) {
	var f controlPlaneFlags
	fs := flag.NewFlagSet("latch control-plane", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.declarations, "declarations", "", "directory of ServicePolicy declarations (YAML, watched); required")
	fs.StringVar(&f.listen, "listen", ":15010", "host:port of the xDS (ADS) gRPC server; mTLS only")
	fs.StringVar(&f.adminAddr, "admin-address", "127.0.0.1:15011", "host:port of the admin HTTP server (/healthz, /readyz, /metrics, /status)")
	fs.StringVar(&f.socket, "workload-api-socket", "", "SPIFFE Workload API address (default $SPIFFE_ENDPOINT_SOCKET)")
	fs.StringVar(&f.trustDomains, "trust-domains", "", "comma-separated trust domains declarations may name (default: the control plane's own)")
	fs.StringVar(&f.inboundHost, "inbound-host", "0.0.0.0", "address sidecars bind inbound listeners on")
	fs.StringVar(&f.profile, "tls-profile", identity.ProfileModern, "TLS profile of the xDS server: modern or intermediate")
	fs.DurationVar(&f.debounce, "debounce", policy.DefaultDebounce, "wait this long after the last change in the declarations directory before reloading")
	fs.StringVar(&f.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: latch control-plane --declarations DIR [flags]\n\nServes each sidecar, over mTLS ADS, the Envoy resources of the declaration for the SPIFFE ID it proves.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if fs.NArg() > 0 {
		return f, usageError{fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))}
	}
	if f.declarations == "" {
		return f, usageError{errors.New("--declarations is required")}
	}
	return f, nil
}

func runControlPlane(ctx context.Context, args []string, _, stderr io.Writer) error {
	f, err := parseControlPlaneFlags(args, stderr)
	if err != nil {
		return err
	}
	log, err := controlPlaneLogger(stderr, f.logFormat, f.logLevel)
	if err != nil {
		return usageError{err}
	}
	profile, err := identity.ProfileByName(f.profile)
	if err != nil {
		return usageError{err}
	}

	src, err := identity.NewWorkloadSource(ctx, f.socket, log)
	if err != nil {
		return fmt.Errorf("getting the control plane's SVID from the Workload API: %w", err)
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		return fmt.Errorf("reading the control plane's SVID: %w", err)
	}
	tds, err := parseTrustDomains(f.trustDomains, svid.ID.TrustDomain())
	if err != nil {
		return usageError{err}
	}

	store, err := policy.NewStore(f.declarations, policy.Options{TrustDomains: tds}, log.With("component", "declarations"))
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := admin.RegisterBuildInfo(reg, version); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	srv := server.New(ctx, server.Options{
		Logger:    log.With("component", "xds-server"),
		Metrics:   server.NewMetrics(reg),
		Translate: translate.Options{InboundHost: f.inboundHost},
	})

	// Load before serving: a sidecar connecting to a control plane that has
	// not read its declarations must wait, not be told it has no policy.
	var (
		mu   sync.Mutex
		last policy.Snapshot
	)
	update := func(s policy.Snapshot) {
		mu.Lock()
		last = s
		mu.Unlock()
		srv.Update(s)
	}
	snap, err := store.Reload()
	if err != nil {
		return fmt.Errorf("reading declarations: %w", err)
	}
	update(snap)
	log.Info("declarations loaded", "dir", f.declarations, "declarations", len(snap.Declarations), "errors", len(snap.Errors))

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
	adm, err := admin.New(admin.Options{
		Addr:     f.adminAddr,
		Gatherer: reg,
		Logger:   log.With("component", "admin"),
		Ready: admin.Readiness(admin.ReadyCheck{Name: "declarations", Check: func() error {
			if !srv.Ready() {
				return errors.New("not loaded yet")
			}
			return nil
		}}),
		Status: func() any {
			mu.Lock()
			defer mu.Unlock()
			return controlPlaneStatus(svid.ID, tds, f.declarations, last, srv)
		},
	})
	if err != nil {
		lis.Close()
		return err
	}

	errc := make(chan error, 3)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		if err := grpcServer.Serve(lis); err != nil {
			errc <- fmt.Errorf("xDS server: %w", err)
		}
	}()
	go func() {
		defer wg.Done()
		if err := store.Watch(ctx, f.debounce, update); err != nil {
			errc <- err
		}
	}()
	go func() {
		defer wg.Done()
		if err := adm.Serve(ctx); err != nil {
			errc <- err
		}
	}()
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

func parseTrustDomains(list string, own spiffeid.TrustDomain) ([]spiffeid.TrustDomain, error) {
	if strings.TrimSpace(list) == "" {
		return []spiffeid.TrustDomain{own}, nil
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

func controlPlaneStatus(id spiffeid.ID, tds []spiffeid.TrustDomain, dir string, snap policy.Snapshot, srv *server.Server) any {
	var decls []declarationStatus
	for _, d := range snap.Declarations {
		decls = append(decls, declarationStatus{
			Name: d.Name, Namespace: d.Namespace, SPIFFEID: d.ID.String(), File: d.File,
			Version: srv.Version(d.ID.String()), LastNACK: srv.LastNACK(d.ID.String()),
			Inbound: len(d.Inbound), Outbound: len(d.Outbound),
		})
	}
	var errs []string
	for _, e := range snap.Errors {
		errs = append(errs, e.Error())
	}
	names := make([]string, len(tds))
	for i, td := range tds {
		names[i] = td.Name()
	}
	return map[string]any{
		"spiffe_id":          id.String(),
		"trust_domains":      names,
		"declarations_dir":   dir,
		"declarations":       decls,
		"declaration_errors": errs,
		"connected_streams":  srv.Connected(),
	}
}

func controlPlaneLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want json or text", format)
}
