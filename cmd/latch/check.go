package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/check"
	"latch.dev/latch/identity"
)

func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("latch check", flag.ContinueOnError)
	socket := workloadAPIFlag(fs)
	serverID := fs.String("server-id", "", "SPIFFE `ID` the server must prove (default: any workload of the local trust domain); an ID of a federated trust domain is verified against that trust domain's bundle")
	profile := fs.String("profile", identity.ProfileModern, "TLS profile to offer: modern (TLS 1.3) or intermediate (TLS 1.2 and 1.3)")
	timeout := fs.Duration("timeout", 5*time.Second, "time allowed for connecting, the handshake and the server's answer (per probe with --scan)")
	asJSON := fs.Bool("json", false, "print one JSON document instead of text")
	scan := fs.Bool("scan", false, "list which TLS versions, TLS 1.2 cipher suites and key exchange groups the server accepts; exits non-zero when it accepts none")
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
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	var addr string
	if fs.NArg() > 0 {
		addr = fs.Arg(0)
		if err := parseFlags(fs, fs.Args()[1:], stdout); err != nil {
			return err
		}
	}
	if addr == "" || fs.NArg() > 0 {
		if addr == "" && fs.NArg() == 0 {
			return usagef("want exactly one HOST:PORT, got none")
		}
		return usagef("want exactly one HOST:PORT, got %q", append([]string{addr}, fs.Args()...))
	}
	if err := checkAddr(addr); err != nil {
		return usageError{err}
	}
	opts := check.Options{Addr: addr, Timeout: *timeout}
	if *serverID != "" {
		id, err := spiffeid.FromString(*serverID)
		if err != nil {
			return usagef("--server-id %q: %w", *serverID, err)
		}
		opts.ServerID = id
	}
	p, err := identity.ProfileByName(*profile)
	if err != nil {
		return usagef("--profile: %w", err)
	}
	opts.Profile = p
	if *timeout <= 0 {
		return usagef("--timeout %s: must be positive", *timeout)
	}

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
		if err := printScan(stdout, *asJSON, res); err != nil {
			return err
		}
		if err := res.Err(); err != nil {
			// The table says what was refused and why; the summary line
			// goes to stderr, where a script piping the JSON still sees it.
			return err
		}
		return nil
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
// status) marked as reported, so main does not print it a second time.
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
		if err != nil {
			return reportedError{err}
		}
		return nil
	}
	if ce != nil {
		fmt.Fprintf(w, "FAIL %s: %s\n  class:  %s (exit %d)\n  stage:  %s\n  error:  %v\n", ce.Addr, ce.Class.Summary(), ce.Class, ce.ExitCode(), ce.Stage, ce.Err)
		if ce.Seen != nil {
			fmt.Fprintln(w, "  connection as far as it got:")
			printInfo(w, "    ", *ce.Seen)
		}
		fmt.Fprintf(w, "  fix:    %s\n", ce.Fix())
		return reportedError{err}
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

// checkAddr refuses an address latch check cannot dial as meant: without a
// port, a bare host would only fail later as "unreachable".
func checkAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want HOST:PORT (%w)", addr, err)
	}
	if host == "" || port == "" {
		return fmt.Errorf("%q: want HOST:PORT with both parts", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("%q: port %q is not a number from 1 to 65535", addr, port)
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
	if c.ServerBundle != "" {
		row("server verified by", "the bundle of "+c.ServerBundle)
	}
	row("client spiffe id", c.ClientSPIFFEID)
	if c.ClientBundle != "" {
		row("client verified by", "the bundle of "+c.ClientBundle)
	}
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
