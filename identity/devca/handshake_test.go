package devca_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"latch.dev/latch/identity/devca"
)

// TestRolloverCostsNoHandshake runs mutual-TLS handshakes back to back between
// two workloads, each using what its own Workload API socket gives it, through
// SVID rotations and a whole timed CA rollover. Not one handshake may fail.
func TestRolloverCostsNoHandshake(t *testing.T) {
	t.Parallel() // waits on wall-clock expiry, not CPU
	ca := newCA(t, devca.Options{
		SVIDTTL:     time.Second,
		RotateEvery: 300 * time.Millisecond,
		CAOverlap:   500 * time.Millisecond,
		CATTL:       3 * time.Second,
	})
	events, stop := ca.Subscribe(4096)
	t.Cleanup(stop)
	ctx := testContext(t)

	serverID := spiffeid.RequireFromString("spiffe://devca.test/server")
	clientID := spiffeid.RequireFromString("spiffe://devca.test/client")
	source := func(id spiffeid.ID) *workloadapi.X509Source {
		src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addWorkload(t, ca, id.String()))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { src.Close() })
		return src
	}
	serverSrc, clientSrc := source(serverID), source(clientID)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serverConf := tlsconfig.MTLSServerConfig(serverSrc, serverSrc, tlsconfig.AuthorizeID(clientID))
	clientConf := tlsconfig.MTLSClientConfig(clientSrc, clientSrc, tlsconfig.AuthorizeID(serverID))

	var serverFailures atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := lis.Accept()
			if err != nil {
				return // listener closed
			}
			tc := tls.Server(conn, serverConf)
			if err := tc.HandshakeContext(ctx); err != nil {
				serverFailures.Add(1)
				t.Logf("server handshake: %v", err)
			}
			tc.Close()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		wg.Wait()
	})

	handshake := func() error {
		conn, err := net.Dial("tcp", lis.Addr().String())
		if err != nil {
			return err
		}
		defer conn.Close()
		tc := tls.Client(conn, clientConf)
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := tc.HandshakeContext(hctx); err != nil {
			return err
		}
		// Read the server's close so its side of the handshake is counted
		// before ours is.
		var b [1]byte
		_, _ = tc.Read(b[:])
		return nil
	}

	var (
		handshakes int
		failures   []error
		seen       = map[devca.EventKind]int{}
	)
	deadline := time.After(15 * time.Second)
	// Until the old CA is gone and both workloads have rotated once more
	// since, so handshakes also run on the far side of the drop.
	issuedAfterDrop := 0
	for issuedAfterDrop < 2 {
		select {
		case e := <-events:
			seen[e.Kind]++
			if e.Kind == devca.EventSVIDIssued && seen[devca.EventCADropped] > 0 {
				issuedAfterDrop++
			}
			continue
		case <-deadline:
			t.Fatalf("no full rollover within 15s: events %v", seen)
		default:
		}
		if err := handshake(); err != nil {
			failures = append(failures, fmt.Errorf("handshake %d: %w", handshakes, err))
		}
		handshakes++
	}
	t.Logf("%d handshakes through %d SVID issuances and a full CA rollover", handshakes, seen[devca.EventSVIDIssued])
	if len(failures) > 0 || serverFailures.Load() > 0 {
		t.Errorf("%d client and %d server handshake failures, want none; first: %v", len(failures), serverFailures.Load(), failures)
	}
	if handshakes < 20 || seen[devca.EventSVIDIssued] < 6 {
		t.Errorf("only %d handshakes over %d issuances: the test did not exercise rotation", handshakes, seen[devca.EventSVIDIssued])
	}
}
