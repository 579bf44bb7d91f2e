package devca_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"latch.dev/latch/identity/devca"
)

const td = "devca.test"

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// newCA starts a CA that logs nothing and is closed when the test ends.
func newCA(t *testing.T, opts devca.Options) *devca.CA {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = discard()
	}
	ca, err := devca.New(td, opts)
	if err != nil {
		t.Fatalf("devca.New: %v", err)
	}
	t.Cleanup(func() {
		if err := ca.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return ca
}

func addWorkload(t *testing.T, ca *devca.CA, id string) string {
	t.Helper()
	addr, err := ca.AddWorkload(id)
	if err != nil {
		t.Fatalf("AddWorkload(%s): %v", id, err)
	}
	return addr
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// watcher records what the go-spiffe client receives over one
// WatchX509Context stream.
type watcher struct {
	updates chan *workloadapi.X509Context
	mu      sync.Mutex
	errs    []error
}

func (w *watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.updates <- c }
func (w *watcher) OnX509ContextWatchError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.errs = append(w.errs, err)
}

func (w *watcher) watchErrors() []error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]error(nil), w.errs...)
}

// watch opens a Workload API client on addr and streams X.509 contexts into
// the returned watcher until the test ends.
func watch(t testing.TB, addr string) *watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		cancel()
		t.Fatalf("workloadapi.New(%s): %v", addr, err)
	}
	w := &watcher{updates: make(chan *workloadapi.X509Context, 256)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = client.WatchX509Context(ctx, w)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		client.Close()
	})
	return w
}

// next waits for the watcher's next update.
func (w *watcher) next(t *testing.T) *workloadapi.X509Context {
	t.Helper()
	select {
	case c := <-w.updates:
		return c
	case <-time.After(10 * time.Second):
		t.Fatalf("no X.509 context update within 10s")
		return nil
	}
}

// until returns the first update satisfying ok, checking each one skipped with
// each (if not nil).
func (w *watcher) until(t *testing.T, ok func(*workloadapi.X509Context) bool, each func(*workloadapi.X509Context)) *workloadapi.X509Context {
	t.Helper()
	for {
		c := w.next(t)
		if each != nil {
			each(c)
		}
		if ok(c) {
			return c
		}
	}
}

func bundleOf(t *testing.T, c *workloadapi.X509Context) *x509bundle.Bundle {
	t.Helper()
	b, err := c.Bundles.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString(td))
	if err != nil {
		t.Fatalf("context has no bundle for %s: %v", td, err)
	}
	return b
}

func signedBy(svid *x509svid.SVID, ca *x509.Certificate) bool {
	return svid.Certificates[0].CheckSignatureFrom(ca) == nil
}

func TestWorkloadsGetTheirOwnSVIDs(t *testing.T) {
	ca := newCA(t, devca.Options{})
	ctx := testContext(t)
	ids := []string{
		"spiffe://devca.test/ns/shop/sa/frontend",
		"spiffe://devca.test/ns/shop/sa/backend",
	}
	serials := map[string]string{}
	for _, id := range ids {
		addr := addWorkload(t, ca, id)
		if !strings.HasPrefix(addr, "unix:///") || !strings.HasSuffix(addr, ".sock") {
			t.Errorf("AddWorkload(%s) = %q, want unix:///abs/path.sock", id, addr)
		}
		src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
		if err != nil {
			t.Fatalf("NewX509Source(%s): %v", addr, err)
		}
		t.Cleanup(func() { src.Close() })
		svid, err := src.GetX509SVID()
		if err != nil {
			t.Fatalf("GetX509SVID: %v", err)
		}
		if svid.ID.String() != id {
			t.Errorf("socket %s served %s, want %s", addr, svid.ID, id)
		}
		// Against the CA's bundle and against the bundle the workload itself got.
		for name, bundles := range map[string]x509bundle.Source{"CA": ca, "workload": src} {
			got, _, err := x509svid.Verify(svid.Certificates, bundles)
			if err != nil || got.String() != id {
				t.Errorf("Verify(%s) against %s bundle = %v, %v", id, name, got, err)
			}
		}
		serial := svid.Certificates[0].SerialNumber.String()
		if other, dup := serials[serial]; dup {
			t.Errorf("%s and %s share serial %s", id, other, serial)
		}
		serials[serial] = id

		client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
		if err != nil {
			t.Fatal(err)
		}
		bundles, err := client.FetchX509Bundles(ctx)
		client.Close()
		if err != nil {
			t.Fatalf("FetchX509Bundles: %v", err)
		}
		b, err := bundles.GetX509BundleForTrustDomain(ca.TrustDomain())
		if err != nil || !b.Equal(ca.Bundle()) {
			t.Errorf("FetchX509Bundles = %v, %v; want the CA's bundle", b, err)
		}
	}
	if st := ca.Status(); len(st.Workloads) != 2 {
		t.Errorf("Status lists %d workloads, want 2: %s", len(st.Workloads), st)
	}
}

func TestSVIDsFollowTheX509SVIDSpec(t *testing.T) {
	const ttl = 90 * time.Second
	ca := newCA(t, devca.Options{SVIDTTL: ttl})
	const id = "spiffe://devca.test/ns/x/sa/y"

	viaIssue, err := ca.Issue(id)
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	ctx := testContext(t)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addWorkload(t, ca, id)))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	viaAPI, err := client.FetchX509SVID(ctx)
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}

	for name, svid := range map[string]*x509svid.SVID{"Issue": viaIssue, "Workload API": viaAPI} {
		t.Run(name, func(t *testing.T) {
			if len(svid.Certificates) != 1 {
				t.Fatalf("chain has %d certificates, want the leaf only (signed by a root in the bundle)", len(svid.Certificates))
			}
			leaf := svid.Certificates[0]
			checks := []struct {
				what string
				ok   bool
			}{
				{"exactly one URI SAN", len(leaf.URIs) == 1},
				{"URI SAN is the ID", len(leaf.URIs) == 1 && leaf.URIs[0].String() == id},
				{"no DNS/IP/email SANs", len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) == 0},
				{"basic constraints present, not a CA", leaf.BasicConstraintsValid && !leaf.IsCA},
				{"key usage digitalSignature only", leaf.KeyUsage == x509.KeyUsageDigitalSignature},
				{"EKU serverAuth and clientAuth", len(leaf.ExtKeyUsage) == 2 &&
					leaf.ExtKeyUsage[0] == x509.ExtKeyUsageServerAuth && leaf.ExtKeyUsage[1] == x509.ExtKeyUsageClientAuth},
				{"lifetime is the TTL", leaf.NotAfter.Sub(leaf.NotBefore) >= ttl && leaf.NotAfter.Sub(leaf.NotBefore) <= ttl+2*time.Second},
				{"valid now", time.Now().After(leaf.NotBefore) || time.Now().Equal(leaf.NotBefore)},
				{"positive serial of 64+ bits", leaf.SerialNumber.Sign() > 0 && leaf.SerialNumber.BitLen() > 64},
				{"subject says not for production", strings.Contains(strings.Join(leaf.Subject.Organization, ""), "NOT FOR PRODUCTION")},
				{"authority key ID set", len(leaf.AuthorityKeyId) > 0},
				{"ECDSA P-256 key", isP256(leaf.PublicKey)},
			}
			for _, c := range checks {
				if !c.ok {
					t.Errorf("SVID: %s: no", c.what)
				}
			}
			// go-spiffe's own parser enforces the spec's MUSTs as well.
			certDER, keyDER, err := svid.MarshalRaw()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := x509svid.ParseRaw(certDER, keyDER); err != nil {
				t.Errorf("x509svid.ParseRaw rejects the SVID: %v", err)
			}
		})
	}

	cas := ca.Bundle().X509Authorities()
	if len(cas) != 1 {
		t.Fatalf("bundle has %d CAs, want 1", len(cas))
	}
	root := cas[0]
	if !root.IsCA || root.KeyUsage&x509.KeyUsageCertSign == 0 || !root.MaxPathLenZero || len(root.URIs) != 1 ||
		root.URIs[0].String() != "spiffe://"+td || !isP256(root.PublicKey) || len(root.SubjectKeyId) == 0 {
		t.Errorf("CA certificate not a path-length-0 P-256 signing CA for spiffe://%s: %+v", td, root)
	}
	if viaIssue.Certificates[0].SerialNumber.Cmp(viaAPI.Certificates[0].SerialNumber) == 0 {
		t.Error("two SVIDs share a serial")
	}
}

func isP256(pub any) bool {
	k, ok := pub.(*ecdsa.PublicKey)
	return ok && k.Curve == elliptic.P256()
}

// TestSecurityHeaderIsRequired calls the Workload API with a raw gRPC client,
// which, unlike go-spiffe's, sends only the metadata it is told to.
func TestSecurityHeaderIsRequired(t *testing.T) {
	ca := newCA(t, devca.Options{})
	addr := addWorkload(t, ca, "spiffe://devca.test/raw")
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	api := workloadpb.NewSpiffeWorkloadAPIClient(conn)

	headers := []struct {
		name string
		md   metadata.MD
		want codes.Code // for the X.509 methods; JWT methods answer Unimplemented when the header is right
	}{
		{"no header", nil, codes.InvalidArgument},
		{"header false", metadata.Pairs("workload.spiffe.io", "false"), codes.InvalidArgument},
		{"header empty", metadata.Pairs("workload.spiffe.io", ""), codes.InvalidArgument},
		{"header True (case matters)", metadata.Pairs("workload.spiffe.io", "True"), codes.InvalidArgument},
		{"header twice", metadata.Pairs("workload.spiffe.io", "true", "workload.spiffe.io", "true"), codes.InvalidArgument},
		{"other key", metadata.Pairs("workload-spiffe-io", "true"), codes.InvalidArgument},
		{"header true", metadata.Pairs("workload.spiffe.io", "true"), codes.OK},
	}
	methods := []struct {
		name  string
		call  func(context.Context) error
		right codes.Code // code with the right header
	}{
		{"FetchX509SVID", func(ctx context.Context) error {
			s, err := api.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
			if err != nil {
				return err
			}
			resp, err := s.Recv()
			if err == nil && (len(resp.Svids) != 1 || resp.Svids[0].SpiffeId != "spiffe://devca.test/raw") {
				return errors.New("wrong SVIDs in response")
			}
			return err
		}, codes.OK},
		{"FetchX509Bundles", func(ctx context.Context) error {
			s, err := api.FetchX509Bundles(ctx, &workloadpb.X509BundlesRequest{})
			if err != nil {
				return err
			}
			resp, err := s.Recv()
			if err == nil && len(resp.Bundles["spiffe://"+td]) == 0 {
				return errors.New("no bundle in response")
			}
			return err
		}, codes.OK},
		{"FetchJWTSVID", func(ctx context.Context) error {
			_, err := api.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"x"}})
			return err
		}, codes.Unimplemented},
		{"ValidateJWTSVID", func(ctx context.Context) error {
			_, err := api.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Audience: "x", Svid: "y"})
			return err
		}, codes.Unimplemented},
	}
	for _, m := range methods {
		for _, h := range headers {
			t.Run(m.name+"/"+h.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if h.md != nil {
					ctx = metadata.NewOutgoingContext(ctx, h.md)
				}
				want := h.want
				if want == codes.OK {
					want = m.right
				}
				err := m.call(ctx)
				if got := status.Code(err); got != want {
					t.Errorf("%s with %s: code %v (%v), want %v", m.name, h.name, got, err, want)
				}
			})
		}
	}
}

func TestAddWorkloadRefusesBadIDs(t *testing.T) {
	ca := newCA(t, devca.Options{})
	addWorkload(t, ca, "spiffe://devca.test/taken")
	for _, id := range []string{
		"",
		"spiffe://other.test/x",       // another trust domain
		"spiffe://devca.test/taken",   // registered already
		"https://devca.test/x",        // not SPIFFE
		"spiffe://devca.test/a//b",    // empty segment
		"spiffe://devca.test/a/../b",  // dot segment
		"spiffe://DEVCA.test/x",       // upper-case trust domain
		"spiffe://devca.test/x?q=1",   // query
		"spiffe://devca.test/x#frag",  // fragment
		"spiffe://devca.test/x y",     // space
		"spiffe://devca.test:8443/x",  // port
		"spiffe://user@devca.test/x",  // userinfo
		"spiffe://devca.test/\x00nul", // control byte
	} {
		if addr, err := ca.AddWorkload(id); err == nil {
			t.Errorf("AddWorkload(%q) = %q, want an error", id, addr)
		}
		if _, err := ca.Issue(id); err == nil && id != "spiffe://devca.test/taken" {
			t.Errorf("Issue(%q) succeeded, want an error", id)
		}
	}
	if n := len(ca.Status().Workloads); n != 1 {
		t.Errorf("%d workloads registered after refusals, want 1", n)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		td   string
		opts devca.Options
	}{
		{"empty trust domain", "", devca.Options{}},
		{"trust domain with path", "devca.test/x", devca.Options{}},
		{"trust domain with upper case", "DevCA.test", devca.Options{}},
		{"SVID TTL under a second", td, devca.Options{SVIDTTL: 500 * time.Millisecond}},
		{"negative SVID TTL", td, devca.Options{SVIDTTL: -time.Hour}},
		{"rotation not before expiry", td, devca.Options{SVIDTTL: time.Minute, RotateEvery: time.Minute}},
		{"negative rotation", td, devca.Options{RotateEvery: -time.Second}},
		{"negative overlap", td, devca.Options{CAOverlap: -time.Second}},
		{"CA outlived by its SVIDs", td, devca.Options{SVIDTTL: time.Hour, CATTL: time.Hour}},
		{"socket dir is a file", td, devca.Options{SocketDir: "/dev/null"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.Logger = discard()
			ca, err := devca.New(tc.td, tc.opts)
			if err == nil {
				ca.Close()
				t.Fatalf("New(%q, %+v) succeeded, want an error", tc.td, tc.opts)
			}
			if !strings.HasPrefix(err.Error(), "devca: ") {
				t.Errorf("error %q does not say where it comes from", err)
			}
		})
	}
}

func TestSocketPathTooLong(t *testing.T) {
	dir := t.TempDir() + "/" + strings.Repeat("d", 100)
	ca := newCA(t, devca.Options{SocketDir: dir})
	if _, err := ca.AddWorkload("spiffe://devca.test/x"); err == nil || !strings.Contains(err.Error(), "shorter SocketDir") {
		t.Errorf("AddWorkload with a %d-byte socket dir: %v, want a socket path length error", len(dir), err)
	}
}

// syncBuffer is a bytes.Buffer safe to log into from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func TestEveryLogLineSaysDevelopmentCA(t *testing.T) {
	var buf syncBuffer
	ca, err := devca.New(td, devca.Options{Logger: slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	addWorkload(t, ca, "spiffe://devca.test/logged")
	if err := ca.RotateNow(); err != nil {
		t.Fatal(err)
	}
	if err := ca.RollCA(devca.RollOverlap(0)); err != nil {
		t.Fatal(err)
	}
	if err := ca.Close(); err != nil {
		t.Fatal(err)
	}

	buf.mu.Lock()
	defer buf.mu.Unlock()
	lines := 0
	sc := bufio.NewScanner(io.Reader(&buf.b))
	for sc.Scan() {
		lines++
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("log line %d not JSON: %v", lines, err)
		}
		if rec["devca"] != true {
			t.Errorf("log line without devca=true: %s", sc.Bytes())
		}
		if lines == 1 && rec["msg"] != devca.Warning {
			t.Errorf("first log line is %q, want the warning %q", rec["msg"], devca.Warning)
		}
	}
	if lines < 5 {
		t.Errorf("only %d log lines for start, issue, rotate, roll and close", lines)
	}
}
