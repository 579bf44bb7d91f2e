package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"latch.dev/latch/identity"
)

// identityWait is a daemon's wait for its first X.509-SVID. A SPIRE agent
// that is slow to start, a socket that is not mounted or a workload without
// a registration entry all look the same from inside the Workload API
// client: nothing arrives. So while it waits, the daemon's admin endpoint is
// already up (/healthz 200, so a liveness probe does not restart a sidecar
// for something a restart cannot fix; /readyz 503 with Problem), and the
// wait says every so often what it found at the socket and what to check.
type identityWait struct {
	addr  string // the Workload API address, as dialled
	log   *slog.Logger
	every time.Duration // how often the warning is repeated
	probe time.Duration // how often the socket is looked at

	mu        sync.Mutex
	since     time.Time
	diagnosis string
	done      bool
}

// Defaults of identityWait: the first warning after a second (a healthy
// agent answers in milliseconds), then every 30 s.
const (
	identityWaitFirstWarn = time.Second
	identityWaitRepeat    = 30 * time.Second
)

// newIdentityWait resolves the Workload API address from the flag or
// $SPIFFE_ENDPOINT_SOCKET; with neither there is nothing to wait for.
func newIdentityWait(socket string, log *slog.Logger) (*identityWait, error) {
	if socket == "" {
		socket = os.Getenv(identity.SocketEnv)
	}
	if socket == "" {
		return nil, errors.New("no SPIFFE Workload API socket: pass --workload-api (e.g. unix:///run/spire/agent.sock) or set " + identity.SocketEnv)
	}
	if strings.HasPrefix(socket, "/") {
		socket = "unix://" + socket
	}
	return &identityWait{addr: socket, log: log, every: identityWaitRepeat, probe: identityWaitFirstWarn, since: time.Now(), diagnosis: "connecting"}, nil
}

// run waits for the first SVID and bundle until ctx ends, and returns the
// source, which follows rotations until it is closed.
func (w *identityWait) run(ctx context.Context) (*identity.WorkloadSource, error) {
	type result struct {
		src *identity.WorkloadSource
		err error
	}
	got := make(chan result, 1)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		src, err := identity.NewWorkloadSource(wctx, w.addr, w.log)
		got <- result{src, err}
	}()
	probe := time.NewTicker(w.probe)
	defer probe.Stop()
	var lastWarn time.Time
	for {
		select {
		case r := <-got:
			w.mu.Lock()
			w.done = r.err == nil
			waited := time.Since(w.since)
			w.mu.Unlock()
			if r.err != nil {
				return nil, r.err
			}
			if !lastWarn.IsZero() {
				w.log.Info("got the first X.509-SVID from the Workload API", "socket", w.addr, "waited", waited.Round(time.Millisecond))
			}
			return r.src, nil
		case <-probe.C:
			d := diagnoseWorkloadAPI(w.addr)
			w.mu.Lock()
			w.diagnosis = d
			waited := time.Since(w.since)
			w.mu.Unlock()
			if time.Since(lastWarn) >= w.every {
				lastWarn = time.Now()
				w.log.Warn("waiting for the Workload API at "+w.addr, "socket", w.addr,
					"waited", waited.Round(time.Second), "found", d, "check", workloadAPIChecklist)
			}
		}
	}
}

// workloadAPIChecklist is what an operator should look at when no SVID comes.
const workloadAPIChecklist = "the socket path exists in this container (the SPIFFE CSI driver or hostPath volume is mounted there); " +
	"this user may connect to it; the SPIRE agent runs on this node; " +
	"a registration entry matches this workload (e.g. its Kubernetes namespace and service account)"

// Problem is nil once the SVID has arrived, and otherwise says what the
// wait is stuck on; it never dials (a readiness probe must be cheap).
func (w *identityWait) Problem() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return nil
	}
	return fmt.Errorf("waiting for the Workload API at %s for %s: %s", w.addr, time.Since(w.since).Round(time.Second), w.diagnosis)
}

// diagnoseWorkloadAPI says what is at a Workload API address: whether the
// socket exists, is a socket, accepts this process, and answers.
func diagnoseWorkloadAPI(addr string) string {
	path, ok := strings.CutPrefix(addr, "unix://")
	if !ok {
		if p, isUnix := strings.CutPrefix(addr, "unix:"); isUnix {
			path, ok = p, true
		}
	}
	if !ok {
		return "not a unix socket address; check that the agent listens at " + addr
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "no socket at " + path + " (is the SPIRE agent running, and is its socket mounted into this container there?)"
	case errors.Is(err, os.ErrPermission):
		return "permission denied looking up " + path + " (check the directory's mode against this user)"
	case err != nil:
		return fmt.Sprintf("cannot look at %s: %v", path, err)
	case fi.Mode()&os.ModeSocket == 0:
		return path + " exists but is not a socket"
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	switch {
	case errors.Is(err, syscall.EACCES):
		return "permission denied connecting to " + path + " (check the socket's mode against this user)"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "nothing listens on " + path + " (a stale socket: is the SPIRE agent running?)"
	case err != nil:
		return fmt.Sprintf("cannot connect to %s: %v", path, err)
	}
	c.Close()
	return "the agent accepts connections but has issued no SVID to this workload yet: check that a registration entry matches it, and the agent's log"
}
