package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"latch.dev/latch/admin"
	"latch.dev/latch/check"
	"latch.dev/latch/identity"
	"latch.dev/latch/identity/devca"
)

// TestCheckCommand runs `latch check` through main's run, against a real
// Workload API (devca) and real servers, and checks the exit status of each
// outcome.
func TestCheckCommand(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	quiet := slog.New(slog.DiscardHandler)
	ca, err := devca.New("mesh.test", devca.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	clientSock, err := ca.AddWorkload("spiffe://mesh.test/ns/ops/sa/checker")
	if err != nil {
		t.Fatal(err)
	}
	serverSock, err := ca.AddWorkload("spiffe://mesh.test/ns/web/sa/backend")
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srvSrc, err := identity.NewWorkloadSource(ctx, serverSock, quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer srvSrc.Close()
	ep, err := admin.ListenTestEndpoint(admin.TestEndpointOptions{
		Addr: "127.0.0.1:0", TLS: identity.NewTLS(srvSrc),
		TrustDomain: spiffeid.RequireTrustDomainFromString("mesh.test"), Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error)
	go func() { served <- ep.Serve(ctx) }()
	defer func() { cancel(); <-served }()

	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hi") }))
	defer plain.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()

	latch := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(append([]string{"check"}, args...), &out, &errb)
		return code, out.String(), errb.String()
	}
	api := "--workload-api=" + clientSock

	t.Run("test endpoint, JSON", func(t *testing.T) {
		code, out, errOut := latch(api, "--json", ep.Addr().String(), "--server-id", "spiffe://mesh.test/ns/web/sa/backend")
		if code != 0 {
			t.Fatalf("exit %d\n%s%s", code, out, errOut)
		}
		var doc struct {
			OK     bool         `json:"ok"`
			Result check.Result `json:"result"`
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			t.Fatalf("not JSON: %v\n%s", err, out)
		}
		requireSnakeCaseKeys(t, "latch check --json", []byte(out))
		svid, err := srvSrc.GetX509SVID()
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(svid.Certificates[0].Raw)
		c := doc.Result.Connection
		if !doc.OK || doc.Result.Source != check.SourceTestEndpoint || c.ServerCertSHA256 != hex.EncodeToString(sum[:]) ||
			c.ClientSPIFFEID != "spiffe://mesh.test/ns/ops/sa/checker" || c.KeyExchangeGroup != "X25519MLKEM768" {
			t.Errorf("result %+v", doc)
		}
	})
	t.Run("test endpoint, text", func(t *testing.T) {
		code, out, _ := latch(api, ep.Addr().String())
		if code != 0 || !strings.Contains(out, "OK "+ep.Addr().String()) || !strings.Contains(out, "X25519MLKEM768") {
			t.Errorf("exit %d\n%s", code, out)
		}
	})

	for _, tc := range []struct {
		name string
		args []string
		want check.Class
	}{
		{"plaintext server", []string{api, plain.Listener.Addr().String()}, check.ClassNotTLS},
		{"closed port", []string{api, closedAddr}, check.ClassUnreachable},
		{"wrong server ID", []string{api, "--server-id=spiffe://mesh.test/ns/web/sa/other", ep.Addr().String()}, check.ClassWrongServerID},
		{"intermediate profile, plaintext server", []string{api, "--profile=intermediate", plain.Listener.Addr().String()}, check.ClassNotTLS},
		{"no Workload API", []string{"--workload-api=unix:///nonexistent/latch-test.sock", "--timeout=500ms", ep.Addr().String()}, check.ClassNoLocalIdentity},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := latch(append(tc.args, "--timeout=3s")...)
			if code != tc.want.ExitCode() {
				t.Fatalf("exit %d, want %d (%s)\n%s%s", code, tc.want.ExitCode(), tc.want, out, errOut)
			}
			if !strings.Contains(out, "fix:") || !strings.Contains(out, string(tc.want)) {
				t.Errorf("output does not name the class and the fix:\n%s", out)
			}
		})
	}

	t.Run("scan", func(t *testing.T) {
		code, out, errOut := latch(api, "--scan", "--json", ep.Addr().String())
		if code != 0 {
			t.Fatalf("exit %d\n%s%s", code, out, errOut)
		}
		var res check.ScanResult
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatal(err)
		}
		requireSnakeCaseKeys(t, "latch check --scan --json", []byte(out))
		// The test endpoint runs the modern profile: TLS 1.3 only.
		for _, v := range res.Versions {
			if v.Accepted != (v.Name == "TLS 1.3") {
				t.Errorf("version %s accepted=%v", v.Name, v.Accepted)
			}
		}
	})

	t.Run("scan of a server that accepts nothing", func(t *testing.T) {
		code, out, errOut := latch(api, "--scan", "--json", plain.Listener.Addr().String())
		if code != check.ClassNotTLS.ExitCode() {
			t.Fatalf("exit %d, want %d (not_tls)\n%s%s", code, check.ClassNotTLS.ExitCode(), out, errOut)
		}
		var res check.ScanResult
		if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Versions) == 0 {
			t.Fatalf("the scan table is not printed: %v\n%s", err, out)
		}
		if strings.Count(errOut, "accepted none of the") != 1 {
			t.Errorf("stderr does not say once that nothing was accepted: %q", errOut)
		}
	})

	t.Run("a failure is printed once", func(t *testing.T) {
		code, out, errOut := latch(api, "--timeout=3s", closedAddr)
		if code != check.ClassUnreachable.ExitCode() || !strings.Contains(out, "FAIL") || errOut != "" {
			t.Errorf("exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
		}
	})
}
