package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/inject"
)

// runInject serves the sidecar-injecting admission webhook (see package
// inject and docs/kubernetes.md).
func runInject(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch inject", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath = fs.String("config", "/etc/latch-inject/config/config.yaml", "injector config: the sidecar's image, resources, Workload API volume and control plane (rendered by the chart)")
		listen     = fs.String("listen", ":9443", "HTTPS address the API server calls")
		certFile   = fs.String("tls-cert", "/etc/latch-inject/tls/tls.crt", "PEM serving certificate; re-read when it changes")
		keyFile    = fs.String("tls-key", "/etc/latch-inject/tls/tls.key", "PEM serving key; re-read when it changes")
		reload     = fs.Duration("cert-reload-interval", 10*time.Second, "how often the serving certificate files are checked for a change")
		profile    = fs.String("tls-profile", identity.ProfileModern, "TLS profile of the HTTPS server: modern or intermediate")
		level      = fs.String("log-level", "info", "debug, info, warn or error")
	)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: latch inject [flags]\n\nServes the Kubernetes mutating admission webhook that adds latch as a native sidecar.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	p, err := identity.ProfileByName(*profile)
	if err != nil {
		return fmt.Errorf("--tls-profile: %w", err)
	}
	if *reload <= 0 {
		return errors.New("--cert-reload-interval: must be positive")
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
	log.Info("injector serving", "listen", ln.Addr().String(), "image", cfg.Image, "version", version)
	return inject.Serve(ctx, inject.NewServer(wh, certs, p, log), ln)
}
