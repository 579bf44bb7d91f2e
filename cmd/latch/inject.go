package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/inject"
)

// runInject serves the sidecar-injecting admission webhook (see package
// inject and docs/kubernetes.md).
func runInject(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch inject", flag.ContinueOnError)
	var (
		configPath = fs.String("config", "/etc/latch-inject/config/config.yaml", "injector config `file`: the sidecar's image, resources, Workload API volume and control plane (rendered by the chart)")
		listen     = fs.String("listen", ":9443", "HTTPS `host:port` the API server calls")
		certFile   = fs.String("tls-cert", "/etc/latch-inject/tls/tls.crt", "PEM serving certificate `file`; re-read when it changes")
		keyFile    = fs.String("tls-key", "/etc/latch-inject/tls/tls.key", "PEM serving key `file`; re-read when it changes")
		reload     = fs.Duration("cert-reload-interval", 10*time.Second, "how often the serving certificate files are checked for a change")
		profile    = fs.String("tls-profile", identity.ProfileModern, "TLS profile of the HTTPS server: modern or intermediate")
		logs       = defineLogFlags(fs)
	)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: latch inject [flags]\n\nServes the Kubernetes mutating admission webhook that adds latch as a native sidecar.\n\nflags:")
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
	p, err := identity.ProfileByName(*profile)
	if err != nil {
		return usagef("--tls-profile: %w", err)
	}
	if *reload <= 0 {
		return usagef("--cert-reload-interval %s: must be positive", *reload)
	}
	if err := checkHostPort("listen", *listen, false); err != nil {
		return err
	}

	cfg, err := inject.LoadConfig(*configPath)
	if err != nil {
		return err
	}
	wh, err := inject.NewWebhook(*cfg, log)
	if err != nil {
		return err
	}
	certs, err := inject.NewCertReloader(*certFile, *keyFile, *reload, log)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listening for the API server: %w", err)
	}
	log.Info("injector serving", "listen", ln.Addr().String(), "image", cfg.Image, "version", buildVersion())
	return inject.Serve(ctx, inject.NewServer(wh, certs, p, log), ln)
}
