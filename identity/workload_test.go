package identity_test

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

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

// TestWorkloadSourceFederation: against two development CAs that federate
// with each other over the real Workload API, a workload of each trust
// domain admits the other's (each verified against the other's federated
// bundle), the source lists both bundles, announces the removal of one on
// Changed, and from then on the handshake is refused.
func TestWorkloadSourceFederation(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	newCA := func(td string) *devca.CA {
		ca, err := devca.New(td, devca.Options{Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ca.Close() })
		return ca
	}
	mesh, partnerCA := newCA(trustDomain), newCA(partnerTD)
	if err := mesh.FederateWith(partnerCA); err != nil {
		t.Fatal(err)
	}
	if err := partnerCA.FederateWith(mesh); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	source := func(ca *devca.CA, id string) *identity.WorkloadSource {
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
	serverSrc, clientSrc := source(mesh, serverID), source(partnerCA, partnerClient)
	waitBundles := func(src *identity.WorkloadSource, want ...string) {
		t.Helper()
		for {
			changed := src.Changed()
			var got []string
			for _, b := range src.X509Bundles() {
				got = append(got, b.TrustDomain().Name())
			}
			if strings.Join(got, " ") == strings.Join(want, " ") {
				return
			}
			select {
			case <-changed:
			case <-ctx.Done():
				t.Fatalf("bundles %v, want %v", got, want)
			}
		}
	}
	waitBundles(serverSrc, trustDomain, partnerTD)
	waitBundles(clientSrc, trustDomain, partnerTD) // ordered by name

	serverTLS := identity.NewTLS(serverSrc)
	srv := startServer(t, serverTLS.ServerConfig(identity.Modern(), allowOnly(partnerClient), identity.FederatesWith(partner)))
	cfg := identity.NewTLS(clientSrc).ClientConfig(identity.Modern(), mustID(serverID), identity.FederatesWith(spiffeid.RequireTrustDomainFromString(trustDomain)))
	cfg.ClientSessionCache = nil
	if _, h := dial(t, srv.addr, cfg); h.err != nil {
		t.Fatalf("federated client refused: %v", h.err)
	}
	if got := identity.DescribeConnection(mustConnect(t, "server", srv.next(t)), true).ClientBundle; got != partnerTD {
		t.Errorf("client verified by the bundle of %q", got)
	}

	mesh.RemoveFederatedBundle(partner)
	waitBundles(serverSrc, trustDomain)
	if err := serverTLS.TrustDomainUsable(partner); err == nil {
		t.Error("partner.test still usable after its bundle was removed")
	}
	dial(t, srv.addr, cfg)
	wantRefused(t, "server after the removal", srv.next(t), identity.ClassUnknownCA, `no bundle of trust domain "partner.test"`)
}

// TestWorkloadSourceRefusesFederatedBundleNamedLocal: the Workload API
// carries the local trust domain's bundle with the SVID and the federated
// ones in a map keyed by trust domain; go-spiffe merges the map over the
// SVID's bundle, so an entry named as the local trust domain (in either
// spelling) would replace the local bundle with whatever CA it holds. The
// source ignores such an entry, and a foreign trust domain listed twice
// under two spellings with different CAs (which one go-spiffe kept would
// change from update to update) is dropped whole.
func TestWorkloadSourceRefusesFederatedBundleNamedLocal(t *testing.T) {
	logs := &strings.Builder{}
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&mu, logs}, nil))
	newCA := func(td string) *devca.CA {
		ca, err := devca.New(td, devca.Options{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ca.Close() })
		return ca
	}
	mesh, partnerCA, otherCA := newCA(trustDomain), newCA(partnerTD), newCA("other.test")
	if err := mesh.FederateWith(partnerCA); err != nil {
		t.Fatal(err)
	}
	addr, err := mesh.AddWorkload(serverID)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := identity.NewWorkloadSource(ctx, addr, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	local := spiffeid.RequireTrustDomainFromString(trustDomain)
	cas := func(td spiffeid.TrustDomain) []string {
		b, err := src.GetX509BundleForTrustDomain(td)
		if err != nil {
			return nil
		}
		var out []string
		for _, c := range b.X509Authorities() {
			out = append(out, c.Subject.String())
		}
		return out
	}
	want := cas(local)
	if len(want) == 0 {
		t.Fatal("no local bundle")
	}
	for _, key := range []string{"spiffe://" + trustDomain, trustDomain} {
		changed := src.Changed()
		if err := mesh.SetFederatedBundleEntry(key, partnerCA.Bundle()); err != nil {
			t.Fatal(err)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatal("no update")
		}
		if got := cas(local); strings.Join(got, ";") != strings.Join(want, ";") {
			t.Errorf("federated entry %q: the local bundle holds %v, want the local CA's %v", key, got, want)
		}
		if err := mesh.SetFederatedBundleEntry(key, nil); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	if !strings.Contains(logs.String(), "federated bundle ignored") || !strings.Contains(logs.String(), "local trust domain") {
		t.Errorf("no WARN about the ignored entry: %s", logs.String())
	}
	mu.Unlock()

	// partner.test served twice, once with another CA under another
	// spelling: neither is used.
	changed := src.Changed()
	if err := mesh.SetFederatedBundleEntry(partnerTD, otherCA.Bundle()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("no update")
	}
	if got := cas(partner); got != nil {
		t.Errorf("partner.test listed twice with different CAs: the source holds %v", got)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
