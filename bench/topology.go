package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/template"
	"time"

	"latch.dev/latch/internal/freeport"
)

// Topology is one way of putting a proxy pair between the load client and
// the backend.
type Topology interface {
	// Name is the short label used in tables and JSON ("latch", "haproxy").
	Name() string
	// Check reports why the topology cannot run on this machine (a binary
	// that is not installed), or nil.
	Check() error
	// Start launches the pair in env and returns once a byte has made the
	// round trip through it to the backend.
	Start(ctx context.Context, env *Env) (*Pair, error)
}

// Env is what every topology is started with.
type Env struct {
	// Dir is a scratch directory of the topology's own (configs, logs,
	// pid files), inside the run's temporary directory.
	Dir string
	// Backend is the host:port of the application.
	Backend string
	// PKI holds the pair's certificates as written from devca SVIDs.
	PKI *PKI
	// NamedPKI is the same shape of certificates with a DNS SAN added, for
	// peers that insist on checking a host name.
	NamedPKI *PKI
	// Workloads maps a SPIFFE ID to the Workload API address serving it,
	// for sidecars that fetch their identity themselves.
	Workloads map[string]string
	// MaxConns is the most proxied connections a pair must hold at once
	// (the idle-connection test plus slack); peers that preallocate per
	// connection are sized to it rather than to a round large number.
	MaxConns int
	// Resumption says whether the pair's client side (the outbound proxy)
	// may resume TLS sessions. Off, every new connection is a full
	// handshake, whatever the proxy's default.
	Resumption bool
	// started, when set, is told about every sidecar process started, so
	// the run can record it (see stale.go).
	started func(*Process)
}

// Pair is a running topology.
type Pair struct {
	// Entry is where the load client connects: the outbound proxy, or the
	// backend itself for the baselines.
	Entry string
	// In is the inbound proxy's mTLS listener, the address the outbound
	// proxy connects to; empty for the baselines.
	In string
	// Sidecars are the proxy processes, outbound first. Empty for direct.
	Sidecars []*Process
	// Version is what the proxy says it is.
	Version string
	// Notes say how the pair is configured where it differs from the others.
	Notes []string

	// dial opens a connection to Entry; nil means plain TCP.
	dial dialFunc
	// closers release what the topology started in this process (the Go
	// mTLS baseline's TLS backend).
	closers []func()
}

// Stop ends every sidecar.
func (p *Pair) Stop() {
	for _, s := range p.Sidecars {
		s.Stop(5 * time.Second)
	}
	for _, c := range p.closers {
		c()
	}
	p.closers = nil
}

// Dial returns how the load client connects to the pair.
func (p *Pair) Dial() dialFunc {
	if p.dial != nil {
		return p.dial
	}
	return plainDial(p.Entry)
}

// resumer is implemented by topologies whose client side cannot resume TLS
// sessions at all; the others resume when Env.Resumption says so.
type resumer interface {
	CanResume() bool
}

// canResume says whether t takes part in the comparison with resumption on.
func canResume(t Topology) bool {
	if r, ok := t.(resumer); ok {
		return r.CanResume()
	}
	return true
}

// Usage sums the sidecars' usage; per-sidecar figures come from each
// Process.
func (p *Pair) Usage() ([]Usage, error) {
	us := make([]Usage, len(p.Sidecars))
	for i, s := range p.Sidecars {
		u, err := s.Usage()
		if err != nil {
			return nil, fmt.Errorf("reading usage of %s: %w", s.Name, err)
		}
		us[i] = u
	}
	return us, nil
}

// direct is the baseline: the client talks to the backend.
type direct struct{}

func (direct) Name() string    { return "direct" }
func (direct) Check() error    { return nil }
func (direct) CanResume() bool { return false }
func (direct) Start(ctx context.Context, env *Env) (*Pair, error) {
	p := &Pair{Entry: env.Backend, Version: "-"}
	return p, waitReady(ctx, p)
}

// waitReady polls the pair with a one-byte echo until it answers, a sidecar
// exits, or 20 s pass.
func waitReady(ctx context.Context, p *Pair) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	var last error
	for {
		for _, s := range p.Sidecars {
			if exited, err := s.Exited(); exited {
				return fmt.Errorf("sidecar %s exited during start-up (%v):\n%s", s.Name, err, s.LogTail())
			}
		}
		if _, err := connectOnce(ctx, p.Dial()); err == nil {
			return nil
		} else {
			last = err
		}
		if err := waitCtx(ctx, 50*time.Millisecond); err != nil {
			tails := ""
			for _, s := range p.Sidecars {
				tails += fmt.Sprintf("\n--- %s log:\n%s", s.Name, s.LogTail())
			}
			return fmt.Errorf("pair never answered through %s: %w%s", p.Entry, last, tails)
		}
	}
}

// startSidecars starts one process per side from a config template rendered
// into dir, then waits for the pair to answer.
func startSidecars(ctx context.Context, p *Pair, env *Env, name string, sides []sideSpec) (*Pair, error) {
	for _, s := range sides {
		proc, err := startProcess(name+"-"+s.side, filepath.Join(env.Dir, name+"-"+s.side+".log"), s.argv, s.env)
		if err != nil {
			p.Stop()
			return nil, err
		}
		p.Sidecars = append(p.Sidecars, proc)
		if env.started != nil {
			env.started(proc)
		}
	}
	if err := waitReady(ctx, p); err != nil {
		p.Stop()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return p, nil
}

type sideSpec struct {
	side string // "out" or "in"
	argv []string
	env  []string
}

// pairPorts is the addresses of one pair, passed to config templates.
type pairPorts struct {
	Dir     string
	Out     string // outbound listener (client entry)
	In      string // inbound listener (mTLS)
	Backend string
	PKI     *PKI
}

func newPairPorts(env *Env, pki *PKI) (pairPorts, error) {
	out, err := freeport.Addr()
	if err != nil {
		return pairPorts{}, err
	}
	in, err := freeport.Addr()
	if err != nil {
		return pairPorts{}, err
	}
	return pairPorts{Dir: env.Dir, Out: out, In: in, Backend: env.Backend, PKI: pki}, nil
}

// render writes a config file from a template.
func render(path string, tmpl *template.Template, data any) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	if err := tmpl.Execute(f, data); err != nil {
		f.Close()
		return fmt.Errorf("rendering %s: %w", path, err)
	}
	return f.Close()
}

// lookBinary finds a peer's executable on PATH or in the sbin directories a
// Debian package puts it in (not always on a non-root PATH).
func lookBinary(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not installed (no %q on PATH or in /usr/sbin)", name, name)
}

// versionOf runs a peer's version flag and returns the first line of its
// output that contains match.
func versionOf(match string, argv ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	for line := range strings.SplitSeq(string(out), "\n") {
		if line = strings.TrimSpace(line); strings.Contains(line, match) {
			return line
		}
	}
	return "unknown"
}

var errNoPKI = errors.New("no certificates in the environment")
