package check

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
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

// TestScanLegacyServer: a server that still speaks TLS 1.0 and 1.1 with a
// CBC suite is reported as such, each marked outside latch's profiles.
func TestScanLegacyServer(t *testing.T) {
	w := newWorld(t)
	cfg := certConfig(w.ca.TLSCertificate(t, serverID))
	cfg.MinVersion = tls.VersionTLS10
	cfg.MaxVersion = tls.VersionTLS12
	cfg.CipherSuites = []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}
	res, err := Scan(context.Background(), w.opts(serveTLS(t, cfg)))
	if err != nil {
		t.Fatal(err)
	}
	got := accepted(res.Versions)
	if !got["TLS 1.0"] || !got["TLS 1.1"] || !got["TLS 1.2"] || got["TLS 1.3"] {
		t.Errorf("versions accepted: %v", got)
	}
	for _, p := range res.Versions {
		if p.Accepted && (p.Name == "TLS 1.0" || p.Name == "TLS 1.1") && !p.OutsideProfile {
			t.Errorf("%s not marked outside latch's profiles", p.Name)
		}
	}
}

func TestScanUnreachable(t *testing.T) {
	w := newWorld(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = Scan(context.Background(), w.opts(addr))
	if ce, ok := errors.AsType[*Error](err); !ok || ce.Class != ClassUnreachable {
		t.Errorf("scan of a closed port: %v, want unreachable", err)
	}
}
