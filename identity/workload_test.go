package identity_test

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
)

func TestNewWorkloadSourceNeedsASocket(t *testing.T) {
	t.Setenv(identity.SocketEnv, "")
	_, err := identity.NewWorkloadSource(context.Background(), "", nil)
	if err == nil || !strings.Contains(err.Error(), "SPIFFE_ENDPOINT_SOCKET") || !strings.Contains(err.Error(), "socket address") {
		t.Fatalf("error %v does not name both the socket setting and SPIFFE_ENDPOINT_SOCKET", err)
	}
}

func TestNewWorkloadSourceGivesUpAtTheDeadline(t *testing.T) {
	socket := t.TempDir() + "/absent.sock"
	t.Setenv(identity.SocketEnv, socket) // a bare path, from the environment
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := identity.NewWorkloadSource(ctx, "", nil)
	if err == nil {
		t.Fatal("connected to a socket that does not exist")
	}
	if !strings.Contains(err.Error(), "waiting for the first X.509-SVID from the Workload API at unix://"+socket) {
		t.Errorf("error %q does not say what was being done", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("took %v, want about the 300ms deadline", time.Since(start))
	}
}

// Against a real Workload API server (devca): the source yields the SVID and
// bundle, latch handshakes with them, and a rotation pushed by the server is
// served from the next handshake on.
func TestWorkloadSourceEndToEnd(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ca, err := devca.New(trustDomain, devca.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	source := func(id string) *identity.WorkloadSource {
		addr, err := ca.AddWorkload(id)
		if err != nil {
			t.Fatal(err)
		}
		src, err := identity.NewWorkloadSource(ctx, addr, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { src.Close() })
		return src
	}
	serverSrc, clientSrc := source(serverID), source(clientID)
	serverTLS, clientTLS := identity.NewTLS(serverSrc), identity.NewTLS(clientSrc)
	srv := startServer(t, serverTLS.ServerConfig(identity.Modern(), allowOnly(clientID)))
	cfg := clientTLS.ClientConfig(identity.Modern(), mustID(serverID)).Clone()
	cfg.ClientSessionCache = nil

	_, h := dial(t, srv.addr, cfg)
	first := mustConnect(t, "client", h).PeerCertificates[0]
	if got := peerOf(t, mustConnect(t, "server", srv.next(t))); got != clientID {
		t.Errorf("server sees %s", got)
	}

	if err := ca.RotateNow(); err != nil {
		t.Fatal(err)
	}
	// Wait for the rotation to reach the server's source.
	for {
		svid, err := serverSrc.GetX509SVID()
		if err != nil {
			t.Fatal(err)
		}
		if !svid.Certificates[0].Equal(first) {
			break
		}
		if err := serverSrc.WaitUntilUpdated(ctx); err != nil {
			t.Fatalf("rotation never reached the source: %v", err)
		}
	}
	_, h = dial(t, srv.addr, cfg)
	if second := mustConnect(t, "client after rotation", h).PeerCertificates[0]; second.Equal(first) {
		t.Error("server still serves its old SVID after rotation")
	}
	mustConnect(t, "server after rotation", srv.next(t))
}
