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
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"latch.dev/latch/identity"
	"latch.dev/latch/proxy"
)

// runProxy is the sidecar: identity from the Workload API, listeners from a
// static config file re-read on SIGHUP, graceful drain on SIGTERM/SIGINT.
func runProxy(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "static proxy configuration `file` (YAML); re-read on SIGHUP")
	socket := fs.String("workload-api", os.Getenv(identity.SocketEnv), "SPIFFE Workload API socket `address` (default $"+identity.SocketEnv+")")
	drainTimeout := fs.Duration("drain-timeout", proxy.DefaultDrainTimeout, "how long live connections may finish after SIGTERM/SIGINT or the removal of their listener")
	logFormat := fs.String("log-format", "json", "log format: json or text")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	// --xds-address and --admin-address belong here.
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	log, err := newProxyLogger(stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}
	if *configPath == "" {
		return errors.New("--config is required: the proxy serves nothing without a configuration")
	}
	// Read the file before waiting on the Workload API, so a broken file
	// fails at once.
	cfg, err := proxy.LoadFile(*configPath)
	if err != nil {
		return err
	}

	src, err := identity.NewWorkloadSource(ctx, *socket, log)
	if err != nil {
		return err
	}
	defer src.Close()

	// The admin endpoint (--admin-address) will serve this registry.
	reg := prometheus.NewRegistry()
	srv := proxy.NewServer(identity.NewTLS(src), proxy.Options{
		Logger:       log,
		Metrics:      proxy.NewMetrics(reg),
		DrainTimeout: *drainTimeout,
	})
	// Registered before the first Apply, so that a SIGHUP sent as soon as
	// the listeners are up is never the default action (exit).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	if err := srv.Apply(cfg); err != nil {
		shutdownProxy(srv, 0, log)
		return err
	}
	for {
		select {
		case <-hup:
			if next, err := srv.ApplyFile(*configPath); err != nil {
				log.Error("reload refused, the running config keeps serving", "config", *configPath, "running_version", srv.Current().Version, "error", err.Error())
			} else {
				log.Info("reloaded", "config", *configPath, "version", next.Version)
			}
		case <-ctx.Done():
			log.Info("shutting down: draining connections", "drain_timeout", *drainTimeout)
			shutdownProxy(srv, *drainTimeout, log)
			return nil
		}
	}
}

func shutdownProxy(srv *proxy.Server, drain time.Duration, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("drain deadline reached; remaining connections closed", "drain_timeout", drain)
	}
}

func newProxyLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
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
