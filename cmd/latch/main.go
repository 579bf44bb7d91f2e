// Command latch is the mTLS sidecar proxy for SPIFFE identities and its
// companions: the control plane, the sidecar injector, the TLS checker and a
// self-contained demo. main only parses the subcommand and wires the parts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// command is one latch subcommand. run receives the arguments after the
// subcommand name and a context cancelled on SIGINT/SIGTERM.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"proxy", "run the sidecar (inbound mTLS termination, outbound mTLS origination)", runProxy},
		{"control-plane", "serve declarations as Envoy v3 resources over ADS to sidecars", runControlPlane},
		{"inject", "run the Kubernetes mutating admission webhook that adds the latch sidecar", runInject},
		{"check", "connect to a TLS endpoint with the local SVID and diagnose the result", runCheck},
		{"demo", "run a complete mesh on loopback with an embedded throwaway CA (not for production)", runDemo},
		{"version", "print the version", runVersion},
	}
}

// exitCoder lets a subcommand choose its exit status (latch check has one per
// diagnosis class).
type exitCoder interface{ ExitCode() int }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		err := c.run(ctx, args[1:], stdout, stderr)
		if err == nil {
			return 0
		}
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "latch %s: %v\n", c.name, err)
		var ec exitCoder
		if errors.As(err, &ec) {
			return ec.ExitCode()
		}
		return 1
	}
	fmt.Fprintf(stderr, "latch: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: latch <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-14s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'latch <command> -h' for the flags of a command.")
}

func runVersion(_ context.Context, _ []string, stdout, _ io.Writer) error {
	fmt.Fprintln(stdout, "latch", version)
	return nil
}
