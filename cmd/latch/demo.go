package main

import (
	"context"
	"encoding/json"
	"flag"
	"io"

	"latch.dev/latch/demo"
)

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch demo", flag.ContinueOnError)
	keep := fs.Bool("keep-running", false, "leave the mesh up until interrupted")
	verbose := fs.Bool("v", false, "show the components' logs on stderr")
	asJSON := fs.Bool("json", false, "print only the report as JSON")
	fs.Usage = func() {
		io.WriteString(fs.Output(), "usage: latch demo [--keep-running] [-v] [--json]\n\n"+
			"Runs a complete latch mesh on loopback with a DEVELOPMENT CA (never for production):\n"+
			"a Workload API server, an echo app, a backend and a frontend sidecar and an intruder.\n\n")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	opts := demo.Options{Out: stdout, KeepRunning: *keep}
	if *verbose {
		opts.Logs = stderr
	}
	if *asJSON {
		opts.Out = nil
	}
	rep, err := demo.Run(ctx, opts)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return nil
}
