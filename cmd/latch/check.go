package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/check"
	"latch.dev/latch/identity"
)

// usageError is a command line latch check cannot run; exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }
func (e usageError) ExitCode() int { return check.ExitUsage }

func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("workload-api", "", "SPIFFE Workload API socket (default $"+identity.SocketEnv+")")
	serverID := fs.String("server-id", "", "SPIFFE ID the server must prove (default: any workload of the local trust domain)")
	profile := fs.String("profile", identity.ProfileModern, "TLS profile to offer: modern (TLS 1.3) or intermediate (TLS 1.2 and 1.3)")
	timeout := fs.Duration("timeout", 5*time.Second, "time allowed for connecting, the handshake and the server's answer (per probe with --scan)")
	asJSON := fs.Bool("json", false, "print one JSON document instead of text")
	scan := fs.Bool("scan", false, "list which TLS versions, TLS 1.2 cipher suites and key exchange groups the server accepts")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: latch check [flags] HOST:PORT

Connects to HOST:PORT with this workload's X.509-SVID, as a latch sidecar
would, and prints what was negotiated: the reply of a latch TLS test endpoint,
or the same fields from our side for any other TLS server. On failure it names
the class of the problem and the fix, and exits with the class's code.

flags:
`)
		fs.PrintDefaults()
		fmt.Fprintf(fs.Output(), "\nexit codes:\n%s", check.ExitCodeTable())
	}
	// Flags may come before or after the address.
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	var addr string
	if fs.NArg() > 0 {
		addr = fs.Arg(0)
		if err := fs.Parse(fs.Args()[1:]); err != nil {
			return usageError{err}
		}
	}
	if addr == "" || fs.NArg() > 0 {
		fs.Usage()
		return usageError{errors.New("want exactly one HOST:PORT")}
	}
	opts := check.Options{Addr: addr, Timeout: *timeout}
	if *serverID != "" {
		id, err := spiffeid.FromString(*serverID)
		if err != nil {
			return usageError{fmt.Errorf("--server-id %q: %w", *serverID, err)}
		}
		opts.ServerID = id
	}
	p, err := identity.ProfileByName(*profile)
	if err != nil {
		return usageError{fmt.Errorf("--profile: %w", err)}
	}
	opts.Profile = p

	sctx, cancel := context.WithTimeout(ctx, *timeout)
	src, err := identity.NewWorkloadSource(sctx, *socket, slog.New(slog.DiscardHandler))
	cancel()
	if err != nil {
		return report(stdout, *asJSON, nil, &check.Error{Class: check.ClassNoLocalIdentity, Addr: addr, Stage: "identity", Err: err})
	}
	defer src.Close()
	opts.TLS = identity.NewTLS(src)

	if *scan {
		res, err := check.Scan(ctx, opts)
		if err != nil {
			return report(stdout, *asJSON, nil, err)
		}
		return printScan(stdout, *asJSON, res)
	}
	res, err := check.Run(ctx, opts)
	return report(stdout, *asJSON, res, err)
}

// checkJSON is the --json document of a check.
type checkJSON struct {
	OK       bool                     `json:"ok"`
	Addr     string                   `json:"addr"`
	Result   *check.Result            `json:"result,omitempty"`
	Class    check.Class              `json:"class,omitempty"`
	ExitCode int                      `json:"exit_code"`
	Stage    string                   `json:"stage,omitempty"`
	Error    string                   `json:"error,omitempty"`
	Fix      string                   `json:"fix,omitempty"`
	Seen     *identity.ConnectionInfo `json:"seen,omitempty"`
}

// report prints the outcome and returns err (whose ExitCode sets the
// status; main prints its one-line text on stderr).
func report(w io.Writer, asJSON bool, res *check.Result, err error) error {
	var ce *check.Error
	if err != nil && !errors.As(err, &ce) {
		ce = &check.Error{Class: check.ClassOther, Stage: "check", Err: err}
		err = ce
	}
	if asJSON {
		doc := checkJSON{OK: err == nil, Result: res}
		if res != nil {
			doc.Addr = res.Addr
		}
		if ce != nil {
			doc.Addr, doc.Class, doc.ExitCode, doc.Stage = ce.Addr, ce.Class, ce.ExitCode(), ce.Stage
			doc.Error, doc.Fix, doc.Seen = ce.Err.Error(), ce.Fix(), ce.Seen
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(doc); jerr != nil {
			return fmt.Errorf("writing the result: %w", jerr)
		}
		return err
	}
	if ce != nil {
		fmt.Fprintf(w, "FAIL %s: %s\n  class:  %s (exit %d)\n  stage:  %s\n  error:  %v\n", ce.Addr, ce.Class.Summary(), ce.Class, ce.ExitCode(), ce.Stage, ce.Err)
		if ce.Seen != nil {
			fmt.Fprintln(w, "  connection as far as it got:")
			printInfo(w, "    ", *ce.Seen)
		}
		fmt.Fprintf(w, "  fix:    %s\n", ce.Fix())
		return err
	}
	from := "as seen from this side"
	if res.Source == check.SourceTestEndpoint {
		from = "as reported by the latch TLS test endpoint"
	}
	fmt.Fprintf(w, "OK %s (%s)\n", res.Addr, from)
	printInfo(w, "  ", res.Connection)
	for _, n := range res.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
	return nil
}

func printInfo(w io.Writer, indent string, c identity.ConnectionInfo) {
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(w, "%s%-20s %s\n", indent, k, v)
		}
	}
	row("tls version", c.Version)
	row("cipher suite", c.CipherSuite)
	row("key exchange group", c.KeyExchangeGroup)
	row("server spiffe id", c.ServerSPIFFEID)
	row("client spiffe id", c.ClientSPIFFEID)
	row("sni", c.SNI)
	row("server cert sha256", c.ServerCertSHA256)
	row("server cert serial", c.ServerCertSerial)
	row("issuer", c.Issuer)
	if c.NotAfter != "" {
		row("expires", c.NotAfterASN1+" ("+c.NotAfter+")")
	}
}

func printScan(w io.Writer, asJSON bool, res *check.ScanResult) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return fmt.Errorf("writing the result: %w", err)
		}
		return nil
	}
	fmt.Fprintf(w, "scan of %s (each parameter tried alone; the server is not verified)\n", res.Addr)
	section := func(title string, ps []check.Probe) {
		fmt.Fprintf(w, "%s:\n", title)
		// A server refusing every probe the same way (a TLS 1.3-only
		// server and the TLS 1.2 suites) gets one line, not twenty.
		same := len(ps) > 1
		for _, p := range ps {
			same = same && !p.Accepted && p.Class == ps[0].Class
		}
		if same {
			fmt.Fprintf(w, "  none of %d accepted (%s)\n", len(ps), ps[0].Class)
			return
		}
		for _, p := range ps {
			mark := "no "
			if p.Accepted {
				mark = "yes"
			}
			extra := p.Negotiated
			if !p.Accepted {
				extra = string(p.Class)
			}
			if p.Accepted && p.OutsideProfile {
				extra += "  [outside latch's profiles]"
			}
			fmt.Fprintf(w, "  %s  %-48s %s\n", mark, p.Name, extra)
		}
	}
	section("TLS versions", res.Versions)
	section("TLS 1.2 cipher suites", res.CipherSuites)
	section("key exchange groups", res.Groups)
	return nil
}
