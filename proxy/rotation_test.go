package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
)

// devMesh is the usual mesh with both sidecars' identities coming from a
// real Workload API (identity/devca) that rotates them fast.
type devMesh struct {
	*mesh
	ca       *devca.CA
	frontend *identity.WorkloadSource
	backend  *identity.WorkloadSource
}

func newDevMesh(t *testing.T, opts devca.Options) *devMesh {
	t.Helper()
	opts.Logger = slog.New(slog.DiscardHandler)
	ca, err := devca.New(trustDomain, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	src := func(id string) *identity.WorkloadSource {
		addr, err := ca.AddWorkload(id)
		if err != nil {
			t.Fatal(err)
		}
		s, err := identity.NewWorkloadSource(t.Context(), addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	d := &devMesh{ca: ca, frontend: src(frontendID), backend: src(backendID)}
	// A handshake timeout well below the SVID lifetime, so that sessions
	// are resumed (see guardResumption) and resumption is part of the test.
	hs := 600 * time.Millisecond
	d.mesh = newMeshWith(t, echo, meshOptions{
		inbound:  func(in *Inbound) { in.HandshakeTimeout = hs },
		outbound: func(out *Outbound) { out.HandshakeTimeout = hs },
	}, identity.NewTLS(d.backend), identity.NewTLS(d.frontend), nil)
	return d
}

// traffic runs connections through the mesh until done says so. Each round
// opens a new connection through both sidecars (usually a resumed session
// between them), connects straight to the inbound listener with a full
// handshake (so both sides present and verify their current SVIDs and
// bundles), and uses one long-lived connection opened at the start. It
// returns the number of rounds and every failure.
func (d *devMesh) traffic(t *testing.T, done func() bool) (rounds int, failures []error) {
	t.Helper()
	long := d.dial(t)
	full := identity.NewTLS(d.frontend).ClientConfig(identity.Modern(), mustID(t, backendID))
	full.ClientSessionCache = nil
	deadline := time.Now().Add(3 * waitFor)
	for !done() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not reached after %d rounds; devca: %v", rounds, d.ca.Status())
		}
		rounds++
		c, err := net.Dial("tcp", addrOf(t, d.outbound, "backend"))
		if err == nil {
			err = roundTrip(c, fmt.Sprintf("new connection %d", rounds))
			c.Close()
		}
		if err != nil {
			failures = append(failures, fmt.Errorf("round %d, new connection: %w", rounds, err))
		}
		direct, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", addrOf(t, d.inbound, "web"), full)
		if err == nil {
			err = roundTrip(direct, fmt.Sprintf("full handshake %d", rounds))
			direct.Close()
		}
		if err != nil {
			failures = append(failures, fmt.Errorf("round %d, full handshake: %w", rounds, err))
		}
		if err := roundTrip(long, fmt.Sprintf("long-lived connection %d", rounds)); err != nil {
			failures = append(failures, fmt.Errorf("round %d, long-lived connection: %w", rounds, err))
		}
		if len(failures) > 5 {
			break
		}
	}
	return rounds, failures
}

func leaf(t *testing.T, s *identity.WorkloadSource) *x509.Certificate {
	t.Helper()
	svid, err := s.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	return svid.Certificates[0]
}

// TestRotationDuringTraffic: SVIDs rotating every second under continuous
// traffic cost no connection, new or live.
func TestRotationDuringTraffic(t *testing.T) {
	d := newDevMesh(t, devca.Options{SVIDTTL: 2 * time.Second, RotateEvery: time.Second})
	seen := map[string]bool{}
	rotations := func() bool {
		for _, s := range []*identity.WorkloadSource{d.frontend, d.backend} {
			seen[leaf(t, s).SerialNumber.String()] = true
		}
		// Two initial SVIDs, then at least two rotations of each.
		return len(seen) >= 6
	}
	rounds, failures := d.traffic(t, rotations)
	for _, err := range failures {
		t.Error(err)
	}
	resumed := d.logs.count("connection closed", map[string]string{"listener": "backend", "tls_resumed": "true"})
	t.Logf("%d rounds over %d distinct SVIDs, %d failures, %d resumed sessions", rounds, len(seen), len(failures), resumed)
	if n := d.logs.count("handshake refused", nil); n != 0 {
		t.Errorf("%d refused handshakes during rotation:\n%s", n, d.logs.dump())
	}
}

// TestCARolloverDuringTraffic: a CA rollover with overlap (new CA published,
// then signing, then the old one dropped) under continuous traffic costs no
// handshake.
func TestCARolloverDuringTraffic(t *testing.T) {
	d := newDevMesh(t, devca.Options{SVIDTTL: 2 * time.Second, RotateEvery: time.Second})
	oldCA := d.ca.Status().Active()
	if err := d.ca.RollCA(devca.RollOverlap(500 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	var newCA *x509.Certificate
	for _, a := range d.ca.Status().Authorities {
		if a.State == devca.AuthorityPending {
			newCA = a.Certificate
		}
	}
	if newCA == nil {
		t.Fatalf("no pending CA after RollCA: %v", d.ca.Status())
	}
	after := 0
	rolledOver := func() bool {
		for _, s := range []*identity.WorkloadSource{d.frontend, d.backend} {
			if leaf(t, s).CheckSignatureFrom(newCA) != nil {
				return false
			}
			b, err := s.GetX509BundleForTrustDomain(d.ca.TrustDomain())
			if err != nil {
				t.Fatal(err)
			}
			if b.HasX509Authority(oldCA) {
				return false
			}
		}
		// Some more rounds with the old CA gone from every bundle.
		after++
		return after > 20
	}
	rounds, failures := d.traffic(t, rolledOver)
	for _, err := range failures {
		t.Error(err)
	}
	resumed := d.logs.count("connection closed", map[string]string{"listener": "backend", "tls_resumed": "true"})
	t.Logf("%d rounds through the rollover, %d failures, %d resumed sessions", rounds, len(failures), resumed)
	if n := d.logs.count("handshake refused", nil); n != 0 {
		t.Errorf("%d refused handshakes during the rollover:\n%s", n, d.logs.dump())
	}
}
