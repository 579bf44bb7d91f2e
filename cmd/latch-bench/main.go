// Command latch-bench measures a latch sidecar pair side by side with the
// same pair built from ghostunnel, HAProxy, nginx and stunnel (those
// available), with Go's own mTLS and with a direct connection, on loopback,
// and prints the comparison as Markdown. See docs/performance.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"latch.dev/latch/bench"
)

func main() {
	// A closed stdout or stderr (latch-bench | head) must not kill the
	// harness before it has stopped its sidecars: writes fail instead.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, context.Canceled):
		fmt.Fprintln(os.Stderr, "latch-bench: interrupted; every process it started is stopped and its temporary directory removed")
		os.Exit(130)
	default:
		fmt.Fprintln(os.Stderr, "latch-bench:", err)
		os.Exit(1)
	}
}

// listFlag collects a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		opts      bench.Options
		conns     = fs.String("conns", "1,8", "parallel connections of the bulk test, comma-separated")
		only      = fs.String("only", "", "run only these topologies, comma-separated (direct,go-mtls,latch,ghostunnel,haproxy,nginx,stunnel)")
		resumed   = fs.Bool("resumed", true, "also measure new connections with session resumption on, on a second pair of each proxy that can resume")
		counts    = fs.Bool("counts", true, "count system calls and context switches per round trip and per connection with perf stat, when perf is installed")
		jsonPath  = fs.String("json", "", "write the results as JSON to this file (default bench/results/latch-bench-<time>.json in the repository, which git ignores, or the temporary directory outside it; \"-\" for none)")
		latchArgs listFlag
		latchEnv  listFlag
		guEnv     listFlag
		curves    = fs.String("latch-curves", "", "narrow latch's key exchange groups, comma-separated (e.g. X25519); default the modern profile's")
	)
	fs.DurationVar(&opts.Duration, "duration", 3*time.Second, "length of each measurement, per topology and round")
	fs.IntVar(&opts.Rounds, "rounds", 3, "rounds; each runs every measurement over every topology, in rotated order; figures are the median of the rounds")
	fs.DurationVar(&opts.Rest, "rest", 2*time.Second, "pause after each measurement; the pair's CPU time is read at its end, so work deferred past the load counts")
	fs.IntVar(&opts.MessageSize, "size", 1024, "echo message size of the latency test, bytes")
	fs.IntVar(&opts.ConnectWorkers, "workers", 4, "concurrent clients of the new-connection test")
	fs.IntVar(&opts.IdleConns, "idle", 2000, "idle proxied connections held open for the memory test")
	fs.StringVar(&opts.LatchBinary, "latch", "", "latch binary to test (default: build ./cmd/latch with the release flags)")
	fs.StringVar(&opts.GhostunnelBinary, "ghostunnel", "", "ghostunnel binary (default: ghostunnel on PATH; built from github.com/ghostunnel/ghostunnel with go build -mod=vendor, its module is not on the Go module proxy)")
	fs.Var(&latchArgs, "latch-arg", "extra argument for each `latch proxy` (repeatable; {side} becomes out or in)")
	fs.Var(&latchEnv, "latch-env", "extra NAME=value in the latch sidecars' environment (repeatable)")
	fs.Var(&guEnv, "ghostunnel-env", "extra NAME=value in the ghostunnel sidecars' environment (repeatable)")
	fs.StringVar(&opts.ProfileDir, "profile", "", "record a CPU profile (Linux perf) of each pair under bulk and new-connection load and write the reports to this directory")
	fs.BoolVar(&opts.KeepDir, "keep", false, "keep the temporary directory with configs and logs")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for _, c := range strings.Split(*conns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 {
			return fmt.Errorf("-conns: %q is not a positive number", c)
		}
		opts.BulkConns = append(opts.BulkConns, n)
	}
	if *only != "" {
		for _, n := range strings.Split(*only, ",") {
			opts.Topologies = append(opts.Topologies, strings.TrimSpace(n))
		}
	}
	opts.LatchArgs, opts.LatchEnv, opts.GhostunnelEnv = latchArgs, latchEnv, guEnv
	opts.NoResumed, opts.NoCounts = !*resumed, !*counts
	if *curves != "" {
		for _, c := range strings.Split(*curves, ",") {
			opts.LatchCurves = append(opts.LatchCurves, strings.TrimSpace(c))
		}
	}
	opts.Progress = stderr

	res, err := bench.Run(ctx, opts)
	if err != nil {
		return err
	}
	res.WriteMarkdown(stdout)
	if *jsonPath == "-" {
		return nil
	}
	if *jsonPath == "" {
		wd, err := os.Getwd()
		if err != nil {
			return fmt.Errorf("finding where to write the results: %w", err)
		}
		*jsonPath = defaultResultsPath(wd, res.Started)
		if err := os.MkdirAll(filepath.Dir(*jsonPath), 0o755); err != nil {
			return fmt.Errorf("writing results: %w", err)
		}
	}
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding results: %w", err)
	}
	if err := os.WriteFile(*jsonPath, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing results: %w", err)
	}
	fmt.Fprintf(stderr, "results written to %s\n", *jsonPath)
	return nil
}

// resultsDir is where results go inside the repository; .gitignore lists it,
// so a run never leaves an untracked file in the working tree.
const resultsDir = "bench/results"

// defaultResultsPath is bench/results/latch-bench-<time>.json under the
// latch repository that holds wd, or the same name in the temporary
// directory when wd is outside it.
func defaultResultsPath(wd string, started time.Time) string {
	name := "latch-bench-" + started.Format("20060102-150405") + ".json"
	for dir := wd; ; dir = filepath.Dir(dir) {
		if mod, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil {
			if strings.HasPrefix(string(mod), "module latch.dev/latch\n") {
				return filepath.Join(dir, filepath.FromSlash(resultsDir), name)
			}
			break // another module: not latch's repository
		}
		if filepath.Dir(dir) == dir {
			break
		}
	}
	return filepath.Join(os.TempDir(), name)
}
