package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// ghostunnel is the closest peer to latch: a Go TLS proxy doing the same
// SPIFFE mTLS job (github.com/ghostunnel/ghostunnel). Each side fetches its
// identity from its own Workload API socket of the run's devca, exactly as a
// latch sidecar does, verifies the other side's X.509-SVID against the
// bundle from it, and authorizes the SPIFFE ID (--allow-uri on the server,
// --verify-uri on the client): the same work latch does per handshake.
//
// ghostunnel's module is not on the Go module proxy, so the harness cannot
// build it: it takes a binary given with -ghostunnel, or one named
// ghostunnel on PATH, and runs without it otherwise. Build one from a
// checkout of the repository with `go build -mod=vendor`.
type ghostunnel struct {
	// binary is the executable; empty looks for ghostunnel on PATH.
	binary string
	// allowID and verifyID override the IDs the server side admits and
	// the client side expects (tests: a pair that must refuse).
	allowID, verifyID string
	// env is added to the sidecars' environment (GOMAXPROCS...).
	env []string
}

// ghostunnelHint says where ghostunnel comes from, for the line of a run
// that went without it.
const ghostunnelHint = "build it from github.com/ghostunnel/ghostunnel with `go build -mod=vendor` (its module is not on the Go module proxy) and pass -ghostunnel PATH or put it on PATH"

func (g ghostunnel) Name() string { return "ghostunnel" }

func (g ghostunnel) Check() error {
	_, err := g.path()
	return err
}

// CanResume is false: ghostunnel's client keeps no TLS session cache, so
// every connection it makes is a full handshake.
func (ghostunnel) CanResume() bool { return false }

func (g ghostunnel) path() (string, error) {
	if g.binary != "" {
		st, err := os.Stat(g.binary)
		if err != nil {
			return "", fmt.Errorf("ghostunnel binary: %w", err)
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return "", fmt.Errorf("ghostunnel binary %s is not an executable file", g.binary)
		}
		return g.binary, nil
	}
	p, err := exec.LookPath("ghostunnel")
	if err != nil {
		return "", errors.New("ghostunnel is not on PATH: " + ghostunnelHint)
	}
	return p, nil
}

func (g ghostunnel) Start(ctx context.Context, env *Env) (*Pair, error) {
	bin, err := g.path()
	if err != nil {
		return nil, err
	}
	ports, err := newPairPorts(env, env.PKI)
	if err != nil {
		return nil, err
	}
	allow, verify := or(g.allowID, clientID), or(g.verifyID, serverID)
	outSocket, ok := env.Workloads[clientID]
	if !ok {
		return nil, fmt.Errorf("no Workload API socket for %s", clientID)
	}
	inSocket, ok := env.Workloads[serverID]
	if !ok {
		return nil, fmt.Errorf("no Workload API socket for %s", serverID)
	}
	// Connection logs stay on: ghostunnel logs each connection's open and
	// close by default, as latch logs each close. Landlock stays on too
	// (best effort, the default).
	sides := []sideSpec{
		{side: "out", env: g.env, argv: []string{bin, "client",
			"--listen", ports.Out, "--target", ports.In,
			"--use-workload-api-addr", outSocket,
			"--verify-uri", verify}},
		{side: "in", env: g.env, argv: []string{bin, "server",
			"--listen", ports.In, "--target", ports.Backend,
			"--use-workload-api-addr", inSocket,
			"--allow-uri", allow}},
	}
	p := &Pair{Entry: ports.Out, In: ports.In, Version: ghostunnelVersion(bin)}
	return startSidecars(ctx, p, env, "ghostunnel", sides)
}

// ghostunnelVersion reads "rev v1.8.4 built with go1.26.8 ..." (or "rev
// master ...") from --version: the revision and the Go version.
func ghostunnelVersion(bin string) string {
	line := versionOf("rev ", bin, "--version")
	f := strings.Fields(line)
	if len(f) >= 5 && f[0] == "rev" && f[2] == "built" {
		return f[1] + " (" + f[4] + ")"
	}
	return line
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
