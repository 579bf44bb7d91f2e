package identity_test

import (
	"crypto/tls"
	"strings"
	"testing"

	"latch.dev/latch/identity"
)

func TestNarrowNeverWidens(t *testing.T) {
	tests := []struct {
		name    string
		base    identity.Profile
		params  identity.Params
		wantErr string
	}{
		{"TLS 1.2 on modern", identity.Modern(), identity.Params{MinVersion: tls.VersionTLS12}, "minVersion TLS 1.2: outside profile modern"},
		{"TLS 1.0 on intermediate", identity.Intermediate(), identity.Params{MinVersion: tls.VersionTLS10}, "minVersion TLS 1.0"},
		{"CBC suite", identity.Intermediate(), identity.Params{CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}}, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA is not allowed"},
		{"RSA key exchange", identity.Intermediate(), identity.Params{CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}}, "is not allowed by profile intermediate"},
		{"P-384", identity.Modern(), identity.Params{Curves: []tls.CurveID{tls.CurveP384}}, "curves"},
		{"min above max", identity.Intermediate(), identity.Params{MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS12}, "above maxVersion"},
		{"TLS 1.3 only on intermediate", identity.Intermediate(), identity.Params{MinVersion: tls.VersionTLS13}, ""},
		{"one GCM suite", identity.Intermediate(), identity.Params{CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.base.Narrow(tt.params)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Narrow: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Narrow error = %v, want it to mention %q", err, tt.wantErr)
			}
		})
	}
}

// Whatever Profile reaches ServerConfig or ClientConfig, nothing weaker than
// the intermediate profile is configured: a hand-built Profile with TLS 1.0
// and CBC suites is clamped, and the zero Profile means modern.
func TestConfigsClampHandBuiltProfiles(t *testing.T) {
	w := newWorld(t)
	weak := identity.Profile{
		Name:         "hand-built",
		MinVersion:   tls.VersionTLS10,
		MaxVersion:   tls.VersionTLS12,
		CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA},
	}
	for name, cfg := range map[string]*tls.Config{
		"server": w.serverTL.ServerConfig(weak, allowOnly(clientID)),
		"client": w.clientTL.ClientConfig(weak, mustID(serverID)),
	} {
		if cfg.MinVersion < tls.VersionTLS12 {
			t.Errorf("%s: MinVersion %s", name, identity.VersionName(cfg.MinVersion))
		}
		for _, s := range cfg.CipherSuites {
			if strings.Contains(tls.CipherSuiteName(s), "CBC") || strings.HasPrefix(tls.CipherSuiteName(s), "TLS_RSA_") {
				t.Errorf("%s: weak suite %s configured", name, tls.CipherSuiteName(s))
			}
		}
		if cfg.MinVersion == tls.VersionTLS12 && len(cfg.CipherSuites) == 0 {
			t.Errorf("%s: TLS 1.2 on with Go's default suites", name)
		}
		if cfg.Renegotiation != tls.RenegotiateNever {
			t.Errorf("%s: renegotiation %v", name, cfg.Renegotiation)
		}
	}
	var zero identity.Profile
	if cfg := w.serverTL.ServerConfig(zero, allowOnly(clientID)); cfg.MinVersion != tls.VersionTLS13 || len(cfg.CurvePreferences) == 0 || cfg.CurvePreferences[0] != tls.X25519MLKEM768 {
		t.Errorf("zero profile: MinVersion %s, curves %v; want modern", identity.VersionName(cfg.MinVersion), cfg.CurvePreferences)
	}
}
