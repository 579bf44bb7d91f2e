package demo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"latch.dev/latch/identity"
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
	pc := rep.PolicyChange
	if pc.RevokedAfter <= 0 || pc.AdmittedAfter <= 0 {
		t.Errorf("policy change timings = %+v", pc)
	}
	if pc.FrontendNow.Class != string(identity.ClassNotAllowed) || !strings.Contains(pc.FrontendNow.Reason, FrontendID.String()) {
		t.Errorf("after the change the frontend's refusal = %+v", pc.FrontendNow)
	}
	t.Logf("policy propagation: revoked after %s, admitted after %s", pc.RevokedAfter, pc.AdmittedAfter)
	for _, want := range []string{"round trip", "intruder", "not_allowed", "policy change", "control plane", `"key_exchange_group"`, "DEVELOPMENT CA"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
