package check

import (
	"context"
	"crypto/tls"
	"testing"
)

func accepted(ps []Probe) map[string]bool {
	m := map[string]bool{}
	for _, p := range ps {
		if p.Accepted {
			m[p.Name] = true
		}
	}
	return m
}

// TestScan runs against a server configured with a known, deliberately odd
// set of parameters and checks the scan lists exactly those.
func TestScan(t *testing.T) {
	w := newWorld(t)
	cfg := certConfig(w.ca.TLSCertificate(t, serverID))
	cfg.MinVersion = tls.VersionTLS12
	cfg.MaxVersion = tls.VersionTLS13
	cfg.CipherSuites = []uint16{
		tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, // outside latch's profiles
	}
	cfg.CurvePreferences = []tls.CurveID{tls.X25519MLKEM768, tls.CurveP384}
	addr := serveTLS(t, cfg)

	res, err := Scan(context.Background(), w.opts(addr))
	if err != nil {
		t.Fatal(err)
	}
	want := func(kind string, got map[string]bool, names ...string) {
		t.Helper()
		if len(got) != len(names) {
			t.Errorf("%s accepted: %v, want exactly %v", kind, got, names)
		}
		for _, n := range names {
			if !got[n] {
				t.Errorf("%s: %s not accepted (got %v)", kind, n, got)
			}
		}
	}
	want("versions", accepted(res.Versions), "TLS 1.2", "TLS 1.3")
	want("suites", accepted(res.CipherSuites), "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA")
	want("groups", accepted(res.Groups), "X25519MLKEM768", "P-384")
	for _, p := range res.CipherSuites {
		if p.Name == "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA" && !p.OutsideProfile {
			t.Errorf("CBC suite not marked outside latch's profile")
		}
		if !p.Accepted && p.Class == "" {
			t.Errorf("refused probe %s has no class", p.Name)
		}
	}
	for _, p := range res.Versions {
		if p.Name == "TLS 1.3" && p.Negotiated == "" {
			t.Errorf("TLS 1.3 probe: nothing negotiated reported")
		}
	}
}
