// Command latch is the mTLS sidecar proxy for SPIFFE identities and its
// companions: the control plane, the sidecar injector, the TLS checker and a
// self-contained demo. main only parses the subcommand and wires the parts.
//
// Every subcommand follows the same command-line habits: -h/--help prints
// the usage on stdout and exits 0; a command line that cannot run (an
// unknown flag, a missing or malformed argument) prints one line on stderr
// and exits 2; a failure while running exits 1 (latch check has one code per
// diagnosis class). An error is printed once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...". A build
// without it (go build, go install, go run) reports what the Go toolchain
// recorded in the binary instead: see buildVersion.
var version string

// exitUsage is the exit status of a command line that cannot run.
const exitUsage = 2

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

// usageError is a command line that cannot run: exit status 2, and a
// pointer to -h after the message.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }
func (e usageError) ExitCode() int { return exitUsage }

// usagef returns a usageError with a formatted message.
func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// reportedError is a failure the subcommand has already described on its
// output (latch check's FAIL report): main sets the exit status from it and
// prints nothing more, so the error appears once.
type reportedError struct{ err error }

func (e reportedError) Error() string { return e.err.Error() }
func (e reportedError) Unwrap() error { return e.err }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return 0
	case "-version", "--version":
		args[0] = "version"
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return exitStatus(c.name, c.run(ctx, args[1:], stdout, stderr), stderr)
	}
	fmt.Fprintf(stderr, "latch: unknown command %q\nRun 'latch --help' for the commands.\n", args[0])
	return exitUsage
}

// exitStatus prints err once (unless the subcommand already reported it)
// and maps it to the exit status.
func exitStatus(name string, err error, stderr io.Writer) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var (
		ue       usageError
		reported reportedError
		ec       exitCoder
	)
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "latch %s: %v\nRun 'latch %s -h' for usage.\n", name, err, name)
	case errors.As(err, &reported):
	default:
		fmt.Fprintf(stderr, "latch %s: %v\n", name, err)
	}
	if errors.As(err, &ec) {
		return ec.ExitCode()
	}
	return 1
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: latch <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-14s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'latch <command> -h' for the flags of a command, 'latch --version' for the version.")
}

// parseFlags parses args into fs the way every latch subcommand does: -h
// prints fs.Usage on stdout and returns flag.ErrHelp (exit 0); a flag that
// does not parse is a usageError, printed once by main (the flag package's
// own message and usage dump are suppressed). Positional arguments after the
// flags are left in fs.Args().
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stdout)
		fs.Usage()
		return err
	}
	if err != nil {
		return usageError{err}
	}
	return nil
}

// noArgs refuses positional arguments left after the flags.
func noArgs(fs *flag.FlagSet) error {
	if fs.NArg() > 0 {
		return usagef("unexpected arguments %q", fs.Args())
	}
	return nil
}

func runVersion(_ context.Context, args []string, stdout, _ io.Writer) error {
	if len(args) > 0 {
		return usagef("unexpected arguments %q", args)
	}
	fmt.Fprintln(stdout, "latch", versionLine())
	return nil
}

// buildVersion is the version latch reports in logs, metrics and /status.
func buildVersion() string {
	bi, _ := debug.ReadBuildInfo()
	return versionFrom(version, bi)
}

// versionLine is what latch --version prints.
func versionLine() string {
	bi, _ := debug.ReadBuildInfo()
	return versionLineOf(version, bi)
}

// versionFrom is the -X main.version of a release build (ldflags), or else the
// main module's version the Go toolchain recorded in the binary (a tag, or a
// pseudo-version naming the commit, "+dirty" for uncommitted changes), or
// else the VCS revision. bi may be nil.
func versionFrom(ldflags string, bi *debug.BuildInfo) string {
	if ldflags != "" && ldflags != "dev" {
		return ldflags
	}
	if bi == nil {
		return "unknown"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	rev, modified := vcsInfo(bi)
	if rev == "" {
		return "(devel)"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if modified {
		rev += "+dirty"
	}
	return "(devel) " + rev
}

// versionLineOf is the version followed by the full VCS revision and the
// toolchain, as far as the binary records them.
func versionLineOf(ldflags string, bi *debug.BuildInfo) string {
	s := versionFrom(ldflags, bi)
	goVersion := runtime.Version()
	extra := ""
	if bi != nil {
		goVersion = bi.GoVersion
		if rev, modified := vcsInfo(bi); rev != "" {
			extra = "revision " + rev
			if modified {
				extra += " (modified)"
			}
			extra += ", "
		}
	}
	return s + " (" + extra + goVersion + " " + runtime.GOOS + "/" + runtime.GOARCH + ")"
}

func vcsInfo(bi *debug.BuildInfo) (revision string, modified bool) {
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	return revision, modified
}
