package demo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/identity"
	"latch.dev/latch/xds/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestDemo runs the whole demo as `latch demo` does and checks what it
// claims against what really happened.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, logs bytes.Buffer
	start := time.Now()
	rep, err := Run(ctx, Options{Out: &out, Logs: &logs})
	if err != nil {
		t.Fatalf("demo failed: %v\noutput:\n%s\nlogs:\n%s", err, out.String(), logs.String())
	}
	t.Logf("demo took %s", time.Since(start))

	if rep.RoundTrip.Bytes != 64<<10 || len(rep.RoundTrip.SHA256) != 64 {
		t.Errorf("round trip = %+v", rep.RoundTrip)
	}
	if rep.IntruderDenied.Class != string(identity.ClassNotAllowed) {
		t.Errorf("intruder denial class = %q, want %q (reason %q)", rep.IntruderDenied.Class, identity.ClassNotAllowed, rep.IntruderDenied.Reason)
	}
	if !strings.Contains(rep.IntruderDenied.Reason, IntruderID.String()) {
		t.Errorf("denial reason %q does not name the intruder", rep.IntruderDenied.Reason)
	}
	tlsInfo := rep.TLS
	if tlsInfo.Version != "TLS 1.3" {
		t.Errorf("version = %q", tlsInfo.Version)
	}
	if tlsInfo.KeyExchangeGroup != "X25519MLKEM768" {
		t.Errorf("group = %q, want the post-quantum hybrid by default", tlsInfo.KeyExchangeGroup)
	}
	if tlsInfo.ServerSPIFFEID != BackendID.String() || tlsInfo.ClientSPIFFEID != FrontendID.String() {
		t.Errorf("ids = server %q client %q", tlsInfo.ServerSPIFFEID, tlsInfo.ClientSPIFFEID)
	}
	if b, err := hex.DecodeString(tlsInfo.ServerCertSHA256); err != nil || len(b) != sha256.Size {
		t.Errorf("fingerprint %q is not a hex SHA-256", tlsInfo.ServerCertSHA256)
	}
	fed := rep.Federation
	if fed.PeerID != PartnerID.String() || fed.ServerBundle != TrustDomain || fed.ClientBundle != PartnerTrustDomain {
		t.Errorf("federated call: %+v", fed)
	}
	if a := fed.App; a.PeerID != PartnerID.String() || a.TLSVersion != "TLSv1.3" || len(a.CertSHA256) != 64 || !strings.HasPrefix(a.Source, "127.0.0.1:") {
		t.Errorf("what the whoami app read from the PROXY header: %+v", a)
	}
	if fed.Refused.Class != string(identity.ClassWrongTrustDomain) || !strings.Contains(fed.Refused.Reason, PartnerID.String()) {
		t.Errorf("the partner on the listener that does not federate: %+v", fed.Refused)
	}
	pc := rep.PolicyChange
	if pc.RevokedAfter <= 0 || pc.AdmittedAfter <= 0 {
		t.Errorf("policy change timings = %+v", pc)
	}
	if pc.FrontendNow.Class != string(identity.ClassNotAllowed) || !strings.Contains(pc.FrontendNow.Reason, FrontendID.String()) {
		t.Errorf("after the change the frontend's refusal = %+v", pc.FrontendNow)
	}
	t.Logf("policy propagation: revoked after %s, admitted after %s", pc.RevokedAfter, pc.AdmittedAfter)
	for _, want := range []string{"round trip", "intruder", "not_allowed", "policy change", "control plane", `"key_exchange_group"`, "DEVELOPMENT CA", "federation", "PROXY v2", "wrong_trust_domain"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// TestExamplesAreTheDemo: examples/declarations holds the declarations the
// demo writes, but for the ports and the app's address.
func TestExamplesAreTheDemo(t *testing.T) {
	opts := policy.Options{TrustDomains: []spiffeid.TrustDomain{BackendID.TrustDomain()}}
	read := func(dir string) map[string]policy.Declaration {
		t.Helper()
		files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
		if err != nil || len(files) == 0 {
			t.Fatalf("no declarations in %s: %v", dir, err)
		}
		out := map[string]policy.Declaration{}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			decls, err := policy.Parse(f, data, opts)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range decls {
				// What differs on purpose: where things listen.
				d.File, d.Line = filepath.Base(d.File), 0
				for i := range d.Inbound {
					d.Inbound[i].Port, d.Inbound[i].App = 0, ""
				}
				for i := range d.Outbound {
					d.Outbound[i].Port, d.Outbound[i].Endpoints = 0, nil
				}
				out[d.Name] = d
			}
		}
		return out
	}
	demoDir := t.TempDir()
	d := declarations{Dir: demoDir, App: "127.0.0.1:1", BackendIn: "127.0.0.1:2", FrontendOut: "127.0.0.1:3", IntruderOut: "127.0.0.1:4", WhoamiApp: "127.0.0.1:5", BackendWhoami: "127.0.0.1:6"}
	if err := d.write(FrontendID); err != nil {
		t.Fatal(err)
	}
	examples, demo := read(filepath.Join("..", "examples", "declarations")), read(demoDir)
	if !reflect.DeepEqual(examples, demo) {
		t.Errorf("examples/declarations and the demo's declarations differ:\nexamples: %+v\ndemo:     %+v", examples, demo)
	}
	for _, id := range []spiffeid.ID{BackendID, FrontendID, IntruderID} {
		if _, ok := examples[path.Base(id.Path())]; !ok {
			t.Errorf("examples lack %s", id)
		}
	}
}

// TestKeepRunningAdvice runs the demo with KeepRunning and follows its last
// words: the port it says reaches the app does, the one it says is reset is.
func TestKeepRunningAdvice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		_, err := Run(ctx, Options{Out: out, KeepRunning: true})
		done <- err
	}()
	admitted := regexp.MustCompile(`plain TCP to (\S+) \(the intruder's outbound\) reaches the echo app`)
	reset := regexp.MustCompile(`plain TCP to (\S+) \(the frontend's outbound\) is reset`)
	var ok, refusedAddr string
	for deadline := time.Now().Add(50 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		s := out.String()
		if m, r := admitted.FindStringSubmatch(s), reset.FindStringSubmatch(s); m != nil && r != nil {
			ok, refusedAddr = m[1], r[1]
			break
		}
		select {
		case err := <-done:
			t.Fatalf("demo ended before keeping the mesh up: %v\n%s", err, s)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no keep-running advice:\n%s", s)
		}
	}
	if _, err := roundTrip(ctx, ok, 1024); err != nil {
		t.Errorf("%s was said to reach the app: %v", ok, err)
	}
	if err := refused(ctx, refusedAddr); err != nil {
		t.Errorf("%s was said to be reset: %v", refusedAddr, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("demo: %v", err)
	}
}

// syncBuffer is a bytes.Buffer the demo writes to while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
